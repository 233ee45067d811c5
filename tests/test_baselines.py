"""Baseline explainers behind one API: shape and range in 2D and 3D, per-sample targets, Captum equality, RISE, RELAX."""
from __future__ import annotations

import pytest
import torch
from captum import attr as ca
from torch import nn

from nemt.explainers import available, get_explainer
from nemt.explainers.base import _REGISTRY as EXPLAINERS
from nemt.explainers.attribution import grid_segments
from nemt.explainers.perturbation import RandomMasks
from nemt.models import Classifier, build_model

# small budgets: the tests check the definitions, not the quality
FAST = {
    "saliency": {}, "gradcam": {}, "gradcam++": {},
    "ig": {"n_steps": 8, "batch_size": 16},
    "gradshap": {"n_samples": 4},
    "lime": {"n_samples": 24, "cell": 8},
    "kernelshap": {"n_samples": 24, "cell": 8},
    "occlusion": {"window": 8, "stride": 4, "batch_size": 16},
    "rise": {"n_masks": 64, "batch_size": 32},
    "extremal": {"steps": 5},
    "inpainting": {"steps": 5},
    "random": {}, "input": {}, "sobel": {}, "gaussian": {},
}
# every registered method with one map per target that needs no fit: a new explainer is tested without an edit
# here (FAST only shortens the budgets of slow ones)
CLASSIFIER_METHODS = [m for m in available() if EXPLAINERS[m].targeted and not hasattr(EXPLAINERS[m], "load")
                      and getattr(EXPLAINERS[m], "model_arch", None) is None]  # not the methods of one architecture


def _clf(dims=2, size=32, task="multiclass", n=3):
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=dims, in_channels=1, out_channels=n, width=4)
    names = [f"l{i}" for i in range(n)]
    return Classifier.from_module(net, spatial_dims=dims, in_channels=1, input_size=(size,) * dims,
                                  task=task, label_names=names, arch="smallcnn").eval()


def test_registry_lists_every_baseline():
    for name in ["gradcam", "gradcam++", "saliency", "ig", "gradshap", "occlusion", "lime", "kernelshap",
                 "rise", "relax", "u-relax", "random", "sobel", "input", "gaussian", "nemt", "nem"]:
        assert name in available()


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
@pytest.mark.parametrize("dims", [2, 3])
def test_shape_range_and_per_sample_targets(name, dims):
    size = 16
    clf = _clf(dims, size)
    params = dict(FAST.get(name, {}))
    ex = get_explainer(name, clf, **params)
    x = torch.randn(3, 1, *(size,) * dims)
    t = torch.tensor([2, 0, 1])
    batch = ex.explain(x, target=t)
    assert batch.shape == (3, 1, *(size,) * dims)
    assert torch.isfinite(batch).all()
    assert float(batch.min()) >= 0 and float(batch.max()) <= 1
    # per-sample targets: the batch's maps are each image's own, compared in float64. In float32 a batched and
    # a single convolution round differently (about 1e-7), and the optimisers (inpainting, extremal) carry that
    # through Adam's normalised steps: 2e-5 to 4e-4 apart on a Zen 3 CPU for 5-step inpainting, whose maps for
    # the wrong target differ by as little (3e-4: its 5 steps barely move the mask of this untrained model). In
    # float64 the rounding is 1e-16 and the same amplification leaves < 1e-12, so 1e-9 separates it from a
    # wrong target (>= 5e-5 for every method here)
    ex64, x64 = get_explainer(name, clf.to(torch.float64), **params), x.double()
    b64 = ex64.explain(x64, target=t)
    s64 = torch.cat([ex64.explain(x64[i:i + 1], target=int(t[i])) for i in range(3)])
    clf.to(torch.float32)
    atol = 1e-9 if b64.dtype == torch.float64 else 1e-5  # some methods compute in float32 whatever they get
    assert torch.allclose(b64.double(), s64.double(), atol=atol), float((b64 - s64).abs().max())
    both = ex.explain(x, target="all")
    assert both.shape == (3, 3, *(size,) * dims)


def _captum_call(name, clf, x, t):
    seg = grid_segments(tuple(x.shape[2:]), 8, 1)
    x = x.clone().requires_grad_(True)
    if name == "saliency":
        return ca.Saliency(clf).attribute(x, target=t, abs=True)
    if name == "ig":
        return ca.IntegratedGradients(clf).attribute(x, target=t, baselines=0.0, n_steps=8, internal_batch_size=16)
    torch.manual_seed(0)  # our random methods explain each sample under seed 0
    if name == "gradshap":
        return ca.GradientShap(clf).attribute(x, baselines=torch.zeros_like(x), n_samples=4, stdevs=0.1, target=t)
    if name == "lime":
        return ca.Lime(clf).attribute(x, target=t, feature_mask=seg, baselines=0.0, n_samples=24,
                                      perturbations_per_eval=64)
    if name == "kernelshap":
        return ca.KernelShap(clf).attribute(x, target=t, feature_mask=seg, baselines=0.0, n_samples=24,
                                            perturbations_per_eval=64)
    raise KeyError(name)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name", ["saliency", "ig", "gradshap", "lime", "kernelshap"])
def test_captum_backed_methods_equal_captum(name, fast):
    """Exactly Captum's output; with the folded inference copy, equal to float rounding."""
    clf = _clf(2, 16)
    x = torch.randn(1, 1, 16, 16)
    ours = get_explainer(name, clf, fast=fast, **FAST[name]).attribute(x, target=1)  # (1, 1, C, H, W)
    theirs = _captum_call(name, clf, x, 1)
    tol = {"atol": 1e-6, "rtol": 1e-5} if not fast else {"atol": 1e-5, "rtol": 1e-3}
    assert torch.allclose(ours[:, 0], theirs, **tol), float((ours[:, 0] - theirs).abs().max())


@pytest.mark.parametrize("fast", [False, True])
def test_occlusion_equals_captum(fast):
    clf = _clf(2, 20)  # 20 is not a multiple of the stride: the last window is clipped, as in Captum
    x = torch.randn(2, 1, 20, 20)
    t = torch.tensor([0, 2])
    ours = get_explainer("occlusion", clf, window=6, stride=4, baseline=0.5, batch_size=7, fast=fast)
    theirs = ca.Occlusion(clf).attribute(x, target=t, sliding_window_shapes=(1, 6, 6), strides=(1, 4, 4),
                                         baselines=0.5, perturbations_per_eval=5)
    assert torch.allclose(ours.attribute(x, t)[:, 0], theirs[:, 0], atol=1e-5)


class _Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.images = net, 0, 0

    def forward(self, x):
        self.calls += 1
        self.images += x.shape[0]
        return self.net(x)


def test_rise_reproducible_and_all_labels_from_the_same_passes():
    torch.manual_seed(0)
    net = _Counting(build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=5, width=4))
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multilabel",
                                 label_names=list("abcde")).eval()
    net.images = 0  # from_module's probe batch (2 images) is not the explanation's
    x = torch.randn(2, 1, 16, 16)
    ex = get_explainer("rise", clf, n_masks=50, batch_size=16, seed=3, fast=False)
    a = ex.explain(x, target="all")
    assert net.images == 2 * 50  # five labels, one set of passes
    b = get_explainer("rise", clf, n_masks=50, batch_size=33, seed=3, fast=False).explain(x, target="all")
    assert torch.equal(a, b) or torch.allclose(a, b, atol=1e-6)  # batch size is a memory bound only
    c = get_explainer("rise", clf, n_masks=50, seed=4, fast=False).explain(x, target="all")
    assert not torch.allclose(a, c)
    assert len({tuple(m.flatten().tolist()[:40]) for m in a[0]}) == 5  # five distinct maps


class _RegionScore(nn.Module):
    """Output c = mean intensity inside square c: a model whose answer is known."""

    def __init__(self, size=16):
        super().__init__()
        regions = torch.zeros(2, size, size)
        regions[0, :6, :6] = 1
        regions[1, 10:, 10:] = 1
        self.register_buffer("regions", regions)

    def forward(self, x):
        return (x[:, :1] * self.regions).flatten(2).sum(-1) / self.regions.flatten(1).sum(-1)


@pytest.mark.parametrize("name", ["occlusion", "rise"])
def test_perturbation_methods_find_the_region_that_drives_the_score(name):
    clf = Classifier.from_module(_RegionScore(), spatial_dims=2, in_channels=1, input_size=(16, 16),
                                 task="multilabel", label_names=["v0", "v1"]).eval()
    x = torch.ones(1, 1, 16, 16)
    params = {"occlusion": {"window": 4, "stride": 2}, "rise": {"n_masks": 500, "grid": 4, "score": "logit"}}[name]
    maps = get_explainer(name, clf, fast=False, **params).explain(x, target="all")
    inside = _RegionScore().regions.bool()
    for c in range(2):
        m = maps[0, c]
        assert float(m[inside[c]].mean()) > 3 * float(m[~inside[c]].mean())


def test_random_masks_are_smooth_shifted_and_have_probability_p():
    masks = RandomMasks(400, (28, 28), grid=7, p=0.3, seed=0)
    m = masks.chunk(range(400))
    assert m.shape == (400, 1, 28, 28) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert abs(float(m.mean()) - 0.3) < 0.03
    assert torch.equal(masks.chunk([5, 9]), m[[5, 9]])
    assert len(set(map(tuple, masks.shifts))) > 1


class _Encoder(nn.Module):
    """Representation = the mean of each quadrant: masking a quadrant changes exactly one coordinate."""

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_relax_importance_uncertainty_and_u_relax():
    enc = _Encoder()
    x = torch.rand(2, 1, 16, 16) + 0.5
    ex = get_explainer("relax", enc, n_masks=300, grid=4, seed=0, fast=False)
    r, u = ex.importance_and_uncertainty(x)
    assert r.shape == u.shape == (2, 1, 16, 16)
    assert float(u.min()) >= 0
    assert float(r.max()) <= 1 + 1e-6  # weighted means of cosine similarities
    maps = get_explainer("u-relax", enc, n_masks=300, grid=4, seed=0, fast=False).explain(x)
    assert maps.shape == (2, 1, 16, 16)
    high = u > u.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    assert float(maps[high].abs().max()) == 0.0  # U-RELAX drops the uncertain half
    again = get_explainer("relax", enc, n_masks=300, grid=4, seed=0, fast=False).importance_and_uncertainty(x)
    assert torch.equal(again[0], r)


def test_relax_on_3d_encoder_and_a_layer_of_a_classifier():
    clf = _clf(3, 16)
    maps = get_explainer("relax", clf, n_masks=40, grid=3, layer="stage2").explain(torch.randn(2, 1, 16, 16, 16))
    assert maps.shape == (2, 1, 16, 16, 16) and float(maps.min()) >= 0 and float(maps.max()) <= 1


def test_inference_copy_matches_the_model_and_leaves_it_alone():
    from nemt.explainers.fast import InferenceCopy
    clf = build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=3).eval()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    fast = InferenceCopy(clf)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(fast(x), clf(x), atol=1e-4)
    assert fast.folded
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())


def test_grid_segments_2d_and_3d():
    s = grid_segments((5, 4), 2, 1)
    assert s.shape == (1, 1, 5, 4)
    assert s[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3], [4, 4, 5, 5]]
    assert int(grid_segments((4, 4, 4), 2, 2).max()) == 7


@pytest.mark.parametrize("name", ["gradcam", "ig", "occlusion", "rise", "lime"])
def test_internal_batch_size_is_only_a_memory_bound(name):
    clf = _clf(2, 16)
    x = torch.randn(5, 1, 16, 16)
    t = torch.tensor([0, 1, 2, 1, 0])
    params = {k: v for k, v in FAST[name].items() if k != "batch_size"}
    big = get_explainer(name, clf, batch_size=64, **params).explain(x, t)
    small = get_explainer(name, clf, batch_size=3, **params).explain(x, t)
    assert torch.allclose(big, small, atol=1e-5)


@pytest.mark.parametrize("name", ["gradcam", "gradcam++"])
def test_gradcam_on_the_folded_copy_equals_the_model(name):
    """The fast path taps the leaf that makes the stage's output (ResNet: the block's in-place ReLU)."""
    torch.manual_seed(0)
    net = build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=3)
    # 96 px: layer4 is 3 x 3, so it is the default layer (at 64 px its 2 x 2 grid is skipped for layer3)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(96, 96), task="multiclass",
                                 label_names=["a", "b", "c"]).eval()
    fast = get_explainer(name, clf)
    assert fast.net is not clf and fast.tap_name == "net.layer4.1.act"
    x = torch.randn(3, 1, 96, 96)
    a = fast.explain(x, target="all")
    b = get_explainer(name, clf, fast=False).explain(x, target="all")
    assert torch.allclose(a, b, atol=1e-4)


def test_count_parameters_below_one_are_refused_before_the_method_is_built():
    from nemt.errors import NemtError
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(2, 3))
    for name, kw in (("rise", {"n_masks": -5}), ("rise", {"batch_size": 0}), ("gradshap", {"n_samples": 2.5}),
                     ("occlusion", {"window": (8, 0)}), ("ig", {"n_steps": "ten"})):
        with pytest.raises(NemtError, match=f"{next(iter(kw))} must be a whole number >= 1"):
            get_explainer(name, net, **kw)
    get_explainer("occlusion", net, window=(8, 4), stride=4.0)  # a window per axis; 4.0 is a whole number


@pytest.mark.parametrize("name", ["lime", "kernelshap"])
def test_surrogates_need_two_superpixels(name):
    """A 12^3 volume in cells of 16 is one superpixel: KernelSHAP failed inside Captum (NaN weights) and LIME
    returned a map of one value; both now ask for a smaller cell, and work with it."""
    net = nn.Sequential(nn.Conv3d(1, 4, 3, stride=2), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.rand(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="makes one superpixel; at least 2 are needed for a map: lower cell"):
        get_explainer(name, net, n_samples=8).explain(x, target=0)
    maps = get_explainer(name, net, n_samples=8, cell=6).explain(x, target=0)
    assert maps.shape == (1, 1, 12, 12, 12) and torch.isfinite(maps).all()
