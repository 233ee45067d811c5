"""Fixes of the audit of the baseline explainers: dtypes, Captum baselines, the fast Grad-CAM path, stale weights,
untargeted maps through the CLI, near-constant maps, bad layers and encoders, memory bounds, postprocess=,
out-of-range values, and the caller's torch.inference_mode(). One test (or more) per finding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from captum import attr as ca
from torch import nn

from nemt.explainers import available, get_explainer
from nemt.explainers.fast import InferenceCopy
from nemt.models import Classifier, build_model
from nemt.ops import ParameterError, normalise_maps, postprocess

LABELS = ["a", "b", "c"]
# small budgets: the tests check behaviour, not quality
SMALL = {"ig": {"n_steps": 4}, "gradshap": {"n_samples": 2}, "lime": {"n_samples": 8, "cell": 8},
         "kernelshap": {"n_samples": 8, "cell": 8}, "occlusion": {"window": 8, "stride": 8},
         "rise": {"n_masks": 8}, "relax": {"n_masks": 8}, "u-relax": {"n_masks": 8},
         "extremal": {"steps": 2, "mask_stride": 4}, "inpainting": {"steps": 2, "mask_stride": 4}}


def _clf(dtype=torch.float32):
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                                 label_names=LABELS).eval()
    return clf.to(dtype)


def _x(b=2, dtype=torch.float32):
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(1)).to(dtype)


# ------------------------------------------------------------------ 1: float64 models


def test_rise_runs_on_a_float64_model():
    maps64 = get_explainer("rise", _clf(torch.float64), n_masks=16).explain(_x(dtype=torch.float64), target=0)
    maps32 = get_explainer("rise", _clf(), n_masks=16).explain(_x(), target=0)
    assert maps64.dtype == torch.float64 and torch.allclose(maps64.float(), maps32, atol=1e-4)


# methods that genuinely cannot take this model, and the words of their refusal
CANNOT = {"nemt": "fits float32 models", "nem": "fits float32 models", "prototypes": "need a Pantypes model"}


@pytest.mark.parametrize("name", available())
def test_every_method_runs_on_a_float64_model_or_refuses_clearly(name):
    clf, x = _clf(torch.float64), _x(dtype=torch.float64)
    if name in CANNOT:
        with pytest.raises(ParameterError, match=CANNOT[name]):
            get_explainer(name, clf, **SMALL.get(name, {})).explain(x, target=0)
        return
    maps = get_explainer(name, clf, **SMALL.get(name, {})).explain(x, target=0)
    assert maps.shape == (2, 1, 16, 16) and torch.isfinite(maps).all()


def test_prototypes_run_on_a_float64_pantypes_model():
    from nemt.models.pantypes import Pantypes
    net = Pantypes(out_channels=2, latent_dim=16, seed=0).double().eval()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    for kind in ("decoded", "contribution"):
        assert get_explainer("prototypes", net, kind=kind).explain(x, "all").shape == (2, 2, 28, 28)


# ------------------------------------------------------------------ 2: IG's "min"/"mean" baselines on a batch


@pytest.mark.parametrize("baseline", ["min", "mean"])
def test_ig_min_and_mean_baselines_on_a_batch_equal_captum_per_image(baseline):
    clf, x = _clf(), _x(3)
    t = torch.tensor([0, 2, 1])
    ours = get_explainer("ig", clf, baseline=baseline, n_steps=8, batch_size=16, fast=False).attribute(x, t)
    for i in range(3):
        xi = x[i:i + 1]
        fill = xi.amin() if baseline == "min" else xi.flatten(2).mean(2).view(1, 1, 1, 1)
        theirs = ca.IntegratedGradients(clf).attribute(xi.clone().requires_grad_(True), target=int(t[i]),
                                                       baselines=fill.expand_as(xi).contiguous(), n_steps=8)
        assert torch.allclose(ours[i, 0], theirs[0], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ 3: Grad-CAM's fast path and a BatchNorm


def _conv_then_outside_bn():
    """The audit's model, with a conv/BN pair in front that the fast path should still fold: stage "4" ends in a
    conv that a BatchNorm outside the stage follows."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        for bn in (net[1], net[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return net.eval()


@pytest.mark.parametrize("name", ["gradcam", "gradcam++"])
def test_gradcam_fast_path_taps_a_conv_followed_by_an_outside_batchnorm(name):
    net, x = _conv_then_outside_bn(), _x(3)
    fast = get_explainer(name, net, layer="4")
    a = fast.explain(x, target="all")
    assert isinstance(fast.net, InferenceCopy) and fast.tap_name == "4.2"  # still the fast path
    bns = [m for m in fast.net.net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1  # only the BatchNorm after the tapped conv is kept: the first pair is folded
    b = get_explainer(name, net, layer="4", fast=False).explain(x, target="all")
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_gradcam_fast_path_taps_a_stage_that_ends_in_a_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[1][1].running_mean.uniform_(-1, 1)
        net[1][1].bias.uniform_(-1, 1)
    x = _x(2)
    fast = get_explainer("gradcam", net, layer="1")
    a = fast.explain(x, target=1)
    assert isinstance(fast.net, InferenceCopy) and fast.tap_name == "1.1"  # the BatchNorm is not folded away
    b = get_explainer("gradcam", net, layer="1", fast=False).explain(x, target=1)
    assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------ 4: weights changed in place


def _scramble(model):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)


@pytest.mark.parametrize("name", ["saliency", "ig", "gradshap", "lime", "kernelshap"])
def test_attribute_follows_weights_changed_in_place(name):
    clf, x = _clf(), _x()
    ex = get_explainer(name, clf, **SMALL.get(name, {}))
    before = ex.attribute(x, target=0)
    _scramble(clf)
    after = ex.attribute(x, target=0)
    fresh = get_explainer(name, clf, **SMALL.get(name, {})).attribute(x, target=0)
    assert not torch.allclose(after, before) and torch.allclose(after, fresh, atol=1e-6)


def test_relax_importance_and_uncertainty_follow_weights_changed_in_place():
    clf, x = _clf(), _x()
    ex = get_explainer("relax", clf, n_masks=16)
    before = ex.importance_and_uncertainty(x)
    _scramble(clf)
    after = ex.importance_and_uncertainty(x)
    fresh = get_explainer("relax", clf, n_masks=16).importance_and_uncertainty(x)
    assert not torch.allclose(after[0], before[0])
    assert all(torch.allclose(a, f, atol=1e-6) for a, f in zip(after, fresh))


@pytest.mark.parametrize("name", ["gradcam", "gradcam++"])
def test_gradcam_fast_path_follows_weights_changed_in_place(name):
    """The folded copy is rebuilt before the hook goes on it (the hook was on the old copy: KeyError)."""
    clf, x = _clf(), _x()
    ex = get_explainer(name, clf)
    assert isinstance(ex.net, InferenceCopy)
    ex.explain(x, target=0)
    _scramble(clf)
    assert torch.allclose(ex.explain(x, target=0), get_explainer(name, clf).explain(x, target=0), atol=1e-5)


# ------------------------------------------------------------------ 5: untargeted methods through the CLI


@pytest.mark.parametrize("method", ["relax", "u-relax"])
def test_cli_writes_one_map_named_for_an_untargeted_method(tmp_path, method):
    from typer.testing import CliRunner

    from nemt.cli import app
    from nemt.data import write_phantom_dataset

    write_phantom_dataset(tmp_path / "data", 2, 16, seed=0)
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=4)
    Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                           label_names=["normal", "nodule", "opacity", "cyst"], arch="smallcnn").save(tmp_path / "m")
    img = sorted((tmp_path / "data" / "images").glob("*.png"))[0]
    res = CliRunner().invoke(app, ["explain", str(img), "--model", str(tmp_path / "m"), "--method", method,
                                   "--param", "n_masks=8", "--target", "all", "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output[res.output.index("["):])[0]
    assert rec["targets"] == [] and rec["files"] == [f"{img.stem}__{method}"]
    written = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert written == sorted(f"{f}{ext}" for f in rec["files"] for ext in (".npy", ".png"))
    m = np.load(tmp_path / "x" / f"{img.stem}__{method}.npy")
    assert m.shape == (16, 16)


# ------------------------------------------------------------------ 6: near-constant maps, layers of one cell


def test_maps_constant_up_to_float_rounding_normalise_like_constant_maps():
    base = torch.full((1, 1, 8, 8), 6.1e-4)
    noisy = base + 1e-10 * torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for how in ("minmax", "abs", "positive", "mask"):
        assert torch.equal(postprocess(noisy, how, 2), postprocess(base, how, 2))
        assert torch.equal(postprocess(base, how, 2), torch.zeros_like(base))
    # the bound is float rounding of the map's own dtype: the same spread is signal in float64
    assert float(normalise_maps(noisy.double(), 2).max()) == 1.0
    real = base.clone()
    real[..., 0, 0] += 1e-6  # a spread of 1.6e-3 of the magnitude: kept
    assert float(normalise_maps(real, 2).max()) == 1.0


def test_gradcam_refuses_a_layer_of_one_cell():
    with pytest.raises(ParameterError, match=r"'pool' outputs \(2, 32, 1, 1\): fewer than 2 cells"):
        get_explainer("gradcam", _clf(), layer="pool").explain(_x(), 0)


# ------------------------------------------------------------------ 7: Grad-CAM and RELAX layers


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.aux, self.h = nn.Conv2d(1, 4, 3, stride=2), nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.h(self.c(x).mean((2, 3)))


@pytest.mark.parametrize("name", ["gradcam", "gradcam++"])
def test_gradcam_refuses_a_layer_that_is_not_spatial_or_never_runs(name):
    with pytest.raises(ParameterError, match=r"layer 'fc' outputs shape \(2, 3\)"):
        get_explainer(name, _clf(), layer="fc").explain(_x(), 0)
    with pytest.raises(ParameterError, match="layer 'aux' never runs in the model's forward pass"):
        get_explainer(name, _Unused(), layer="aux").explain(_x(), 0)


def test_relax_refuses_a_layer_that_never_runs():
    with pytest.raises(ParameterError, match="layer 'aux' never runs in the model's forward pass"):
        get_explainer("relax", _Unused(), layer="aux", n_masks=4).explain(_x())


# ------------------------------------------------------------------ 8: RELAX on encoders of another output form


class _TupleEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())

    def forward(self, x):
        h = self.f(x)
        return h, h[:, :2]


class _VectorEncoder(_TupleEncoder):
    def forward(self, x):
        return self.f(x).sum(1)


@pytest.mark.parametrize("name", ["relax", "u-relax"])
def test_relax_refuses_a_tuple_or_a_vector_output_as_the_other_methods_do(name):
    with pytest.raises(ParameterError, match="the model returned a tuple; nemt needs a module"):
        get_explainer(name, _TupleEncoder(), n_masks=4).explain(_x())
    with pytest.raises(ParameterError, match=r"returned shape \(2,\) for 2 inputs"):
        get_explainer(name, _VectorEncoder(), n_masks=4).explain(_x())
    with pytest.raises(ParameterError, match="the model returned a tuple"):  # as RISE says it
        get_explainer("rise", _TupleEncoder(), n_masks=4).explain(_x())


# ------------------------------------------------------------------ 9: batch_size bounds every model call


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                 nn.Linear(64, 3))
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.net(x)


BOUNDED = {"saliency": {}, "ig": {"n_steps": 5}, "gradshap": {"n_samples": 7}, "lime": {"n_samples": 10, "cell": 8},
           "kernelshap": {"n_samples": 10, "cell": 8}, "occlusion": {"window": 8, "stride": 8},
           "rise": {"n_masks": 10}, "relax": {"n_masks": 10}, "gradcam": {"layer": "0"},
           "gradcam++": {"layer": "0"}, "extremal": {"steps": 2, "mask_stride": 4},
           "inpainting": {"steps": 2, "mask_stride": 4, "inpainter": "diffusion"}}


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_batch_size_bounds_the_inputs_of_every_model_call(name):
    model = _Counting().eval()
    ex = get_explainer(name, model, batch_size=3, fast=False, **BOUNDED[name])
    model.sizes.clear()
    maps = ex.explain(_x(7), target=0)
    assert maps.shape[0] == 7 and model.sizes and max(model.sizes) <= 3, model.sizes


# ------------------------------------------------------------------ 10: postprocess= reaches every method


@pytest.mark.parametrize("name", ["extremal", "inpainting"])
def test_postprocess_reaches_the_mask_optimisations(name):
    clf, x = _clf(), _x()
    ex = get_explainer(name, clf, postprocess="none", **SMALL[name])
    assert ex.postprocess == "none"
    assert torch.equal(ex.explain(x, 0), ex.raw(x, 0))
    from nemt.explainers import CounterfactualInpainting, ExtremalPerturbation
    cls = {"extremal": ExtremalPerturbation, "inpainting": CounterfactualInpainting}[name]
    assert cls(clf, postprocess="signed", **SMALL[name]).postprocess == "signed"


# ------------------------------------------------------------------ 11: out-of-range values


@pytest.mark.parametrize("name,params,words", [
    ("gaussian", {"area": 0.0}, "area must be a number in (0, 1)"),
    ("gaussian", {"area": -1.0}, "area must be a number in (0, 1)"),
    ("gaussian", {"area": 1.0}, "area must be a number in (0, 1)"),
    ("extremal", {"blur_sigma": -3.0}, "blur_sigma must be a finite number > 0"),
    ("extremal", {"blur_sigma": 0.0}, "blur_sigma must be a finite number > 0"),
    ("extremal", {"lr": float("inf")}, "lr must be a finite number > 0"),
    ("extremal", {"lr": float("nan")}, "lr must be a finite number > 0"),
    ("inpainting", {"lr": 0.0}, "lr must be a finite number > 0"),
    ("inpainting", {"sigma": -2.0}, "sigma must be a finite number > 0"),
    ("inpainting", {"area_weight": -1.0}, "area_weight must be a finite number >= 0"),
    ("ig", {"method": "simpson"}, "method must be one of Captum's"),
    ("gradshap", {"stdevs": -0.1}, "stdevs must be a finite number >= 0"),
    ("gradshap", {"stdevs": float("inf")}, "stdevs must be a finite number >= 0"),
])
def test_out_of_range_values_are_refused_at_construction(name, params, words):
    with pytest.raises(ParameterError, match=words.replace("(", r"\(").replace(")", r"\)")):
        get_explainer(name, _clf(), **params)


def test_edges_of_the_ranges_are_accepted():
    clf = _clf()
    get_explainer("inpainting", clf, area_weight=0.0)
    get_explainer("gradshap", clf, stdevs=0.0)
    get_explainer("ig", clf, method="riemann_trapezoid")
    get_explainer("gaussian", clf, area=0.5)


def test_count_parameters_are_checked_when_a_class_is_built_directly():
    from nemt.explainers import RISE, URELAX, GradCAM, IntegratedGradients, Occlusion
    clf = _clf()
    for build, key in ((lambda: RISE(clf, n_masks=-5), "n_masks"), (lambda: IntegratedGradients(clf, batch_size=0),
                                                                       "batch_size"),
                       (lambda: Occlusion(clf, window=(8, 0)), "window"), (lambda: GradCAM(clf, "stage2", None, 0),
                                                                           "batch_size"),
                       (lambda: URELAX(clf, n_masks=0), "n_masks")):
        with pytest.raises(ParameterError, match=f"{key} must be a whole number >= 1"):
            build()


# ------------------------------------------------------------------ 12: the caller's torch.inference_mode()


GRADIENT_METHODS = ["saliency", "ig", "gradshap", "gradcam", "gradcam++", "extremal", "inpainting"]


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_refuse_inference_mode_and_run_under_no_grad(name):
    clf, x = _clf(), _x()
    ex = get_explainer(name, clf, **SMALL.get(name, {}))
    with torch.inference_mode(), pytest.raises(ParameterError, match=r"cannot run under torch.inference_mode\(\)"):
        ex.explain(x, 0)
    if hasattr(ex, "attribute"):
        with torch.inference_mode(), pytest.raises(ParameterError, match="inference_mode"):
            ex.attribute(x, 0)
    with torch.no_grad():
        assert ex.explain(x, 0).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("name", ["occlusion", "rise", "lime", "relax", "random", "sobel"])
def test_forward_only_methods_run_under_inference_mode(name):
    clf, x = _clf(), _x()
    with torch.inference_mode():
        assert get_explainer(name, clf, **SMALL.get(name, {})).explain(x, 0).shape == (2, 1, 16, 16)


def test_methods_that_never_run_the_model_check_its_channels():
    """Reference maps (sobel, input, random) need no model call, so a channel-last or other-channel input went
    through and gave maps of the wrong shape (audit of 1D/3D)."""
    from nemt.models import Classifier, build_model
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                                 label_names=["a", "b", "c"]).eval()
    for name in ("sobel", "input", "random"):
        with pytest.raises(ValueError, match="1-channel inputs.*channel-last"):
            get_explainer(name, clf).explain(torch.rand(2, 16, 16, 1))
        with pytest.raises(ValueError, match="1-channel inputs"):
            get_explainer(name, clf).explain(torch.rand(2, 3, 16, 16))
