"""nemt.metrics and nemt.visualize refuse input they cannot score, with one clear error naming the argument,
what was found and what is expected; maps a metric is undefined for are said, and counted apart in summaries.

Findings of a user audit of the metrics Python API, one test (or more) each. Floats are compared with
tolerances, never bit for bit: the values go through float32/float64 sums whose last bits depend on the
reduction order (thread count, chunking), which is not what these tests are about.
"""
from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import nemt.metrics as M
from nemt.errors import NemtError
from nemt.metrics import (cc, complexity, deletion_auc, faithfulness_estimate, insertion_auc, kl_divergence,
                          max_box_acc_v2, model_parameter_randomisation, nss, pointing_game, random_logit,
                          relevance_mass, road, similarity, sparseness, ssim, summarise, top_k_intersection)
from nemt.metrics._common import UndefinedMetricWarning


class PixelModel(nn.Module):
    """Two outputs: a weighted sum of channel 0's pixels, and 0."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        z = (x[:, 0] * self.w).flatten(1).sum(1)
        return torch.stack([z, torch.zeros_like(z)], 1)


def _case(seed: int = 0, size: int = 6):
    g = torch.Generator().manual_seed(seed)
    model = PixelModel(torch.rand(size, size, generator=g) + 0.1)
    x = torch.rand(2, 1, size, size, generator=g) + 1.0
    maps = torch.rand(2, 1, size, size, generator=g)
    return model, x, maps


#: the metrics that run the model on x, with a small budget each
MODEL_METRICS = [
    (faithfulness_estimate, {"features_in_step": 4}),
    (deletion_auc, {"steps": 4}),
    (insertion_auc, {"steps": 4}),
    (road, {"percentages": (10, 50), "noise": 0.0}),
]
MODEL_IDS = [f.__name__ for f, _ in MODEL_METRICS]


# ---------------------------------------------------------------- 1. x and the target of the model metrics

@pytest.mark.parametrize("fn, kw", MODEL_METRICS, ids=MODEL_IDS)
def test_model_metrics_refuse_bad_x_naming_it(fn, kw):
    model, x, maps = _case()
    nan_x = x.clone()
    nan_x[1, 0, 2, 3] = float("nan")
    inf_x = x.clone()
    inf_x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^x has 1 NaN or infinite values, in 1 of its 2 images: a metric of "
                                         r"such an input means nothing$"):
        fn(model, nan_x, maps, 0, **kw)
    with pytest.raises(ValueError, match=r"^x has 1 NaN or infinite values, in 1 of its 2 images"):
        fn(model, inf_x, maps, 0, **kw)
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor \(B, C, \*spatial\), got ndarray$"):
        fn(model, x.numpy(), maps, 0, **kw)
    with pytest.raises(ValueError, match=r"^x must be a floating tensor, got torch.int64$"):
        fn(model, (x * 10).long(), maps, 0, **kw)
    with pytest.raises(ValueError, match=r"^x holds no image \(shape \(0, 1, 6, 6\)\)$"):
        fn(model, x[:0], maps[:0], 0, **kw)  # x is checked first: its own words, not the maps'
    with pytest.raises(ValueError, match=r"^x must be \(B, C, \*spatial\) with 1 to 3 spatial axes, got shape "
                                         r"\(2, 36\)$"):
        fn(model, x.flatten(1), maps, 0, **kw)


@pytest.mark.parametrize("fn, kw", MODEL_METRICS, ids=MODEL_IDS)
def test_model_metrics_cast_float64_x_to_the_models_dtype(fn, kw):
    """A float64 x (from NumPy) met a float32 convolution: torch's "Input type (double) and bias type (float)".
    Now cast to the model's dtype, as the explainers do; the numbers agree with float32 x up to the float32
    rounding of x (hence the tolerance, not bit equality)."""
    torch.manual_seed(0)  # the layers' initial weights (the test's own seeding, not the library's)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _, x, maps = _case(1)
    x64 = x.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        got = fn(model, x64, maps, 0, **kw)
        want = fn(model, x, maps, 0, **kw)
    assert got.shape == want.shape == (2, 1)
    assert torch.allclose(got.double(), want.double(), atol=1e-5, rtol=1e-5, equal_nan=True)
    assert x64.dtype == torch.float64  # the caller's x is left as it is


@pytest.mark.parametrize("fn, kw", MODEL_METRICS, ids=MODEL_IDS)
def test_model_metrics_refuse_a_target_out_of_range(fn, kw):
    """ROAD scored target 5 of a 2-output model (never the arg-max: 0 for every map); the others failed with
    torch's "index out of bounds". Now the explainers' words (nemt.ops.resolve_targets)."""
    model, x, maps = _case(2)
    with pytest.raises(ValueError, match=r"^target 5 out of range: the model has 2 outputs$"):
        fn(model, x, maps, 5, **kw)
    with pytest.raises(ValueError, match=r"^target indices out of range 0\.\.1$"):
        fn(model, x, maps, torch.tensor([0, 3]), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # output 1 is constant: faithfulness is undefined
        assert fn(model, x, maps, torch.tensor([0, 1]), **kw).shape == (2, 1)  # in range: scored


def test_randomisation_tests_check_x_and_the_target_too():
    model, x, maps = _case(3)

    def explain(m, xx, t):
        return xx[:, :1].expand(-1, t.shape[1], -1, -1).clone() * m.w

    with pytest.raises(ValueError, match=r"^x has 1 NaN"):
        bad = x.clone()
        bad[0, 0, 1, 1] = float("nan")
        random_logit(model, bad, explain, 0)
    with pytest.raises(ValueError, match=r"^target 2 out of range: the model has 2 outputs$"):
        model_parameter_randomisation(model, x, explain, 2)


# ---------------------------------------------------------------- 2. constant (collapsed) maps

def test_complexity_of_a_constant_map_is_the_uniform_entropy():
    """A constant map gives every pixel the same relevance: the uniform distribution, entropy log n, whatever
    the constant and the normalisation (it was NaN after min-max, which summaries then dropped)."""
    n = 16
    const = torch.stack([torch.full((1, 4, 4), 0.3), torch.zeros(1, 4, 4), torch.full((1, 4, 4), -2.0)])
    for normalise in ("minmax", "max", "sum", None):
        v = complexity(const, normalise=normalise)
        assert torch.allclose(v, torch.full((3, 1), math.log(n), dtype=v.dtype), atol=1e-9), normalise
    # the maximum of the metric: any map with differences is below it (1e-12 in the log: tolerance)
    mixed = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    assert (complexity(mixed) <= math.log(n) + 1e-9).all()
    # and consistent with sparseness, which already read a constant map as uniform (Gini 0)
    assert sparseness(const).abs().max().item() < 1e-6


def test_faithfulness_estimate_warns_once_about_constant_maps_and_keeps_nan():
    """A correlation with a constant side is undefined: NaN stays, but one warning per call says how many
    maps and why (it used to be a silent NaN that summaries counted as 'no lesion')."""
    model, x, maps = _case(4)
    maps[1] = 0.5  # collapsed explainer
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        v = faithfulness_estimate(model, x, maps, 0, features_in_step=4)
    assert math.isnan(v[1, 0].item()) and not math.isnan(v[0, 0].item())
    ours = [w for w in rec if issubclass(w.category, UndefinedMetricWarning)]
    assert len(ours) == 1
    assert str(ours[0].message) == (
        "faithfulness_estimate: 1 of 2 maps score NaN (undefined: 1 constant (collapsed) maps, equal attribution "
        "in every group); nemt.metrics.summarise(values, metric='faithfulness_estimate') counts them as "
        "undefined, not as excluded")
    assert ours[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all for maps that all score
        faithfulness_estimate(model, x, torch.rand(2, 1, 6, 6), 0, features_in_step=4)


def test_summarise_counts_undefined_nan_apart_from_excluded():
    v = torch.tensor([0.5, float("nan"), 0.7, float("nan")])
    plain = summarise(v)  # without knowing the metric: every NaN is excluded (unchanged)
    assert plain["n"] == 2 and plain["n_excluded"] == 2 and plain["n_undefined"] == 0
    by_name = summarise(v, metric="faithfulness_estimate")  # no ground truth: its NaN are undefined
    assert by_name["n"] == 2 and by_name["n_excluded"] == 0 and by_name["n_undefined"] == 2
    assert by_name["mean"] == pytest.approx(0.6)
    gt_metric = summarise(v, metric="relevance_mass")  # a ground-truth metric: NaN means no lesion
    assert gt_metric["n_excluded"] == 2 and gt_metric["n_undefined"] == 0
    marked = summarise(v, undefined=torch.tensor([False, True, False, False]))
    assert marked["n_excluded"] == 1 and marked["n_undefined"] == 1
    assert summarise(v, undefined=1)["n_undefined"] == 1
    with pytest.raises(ValueError, match="not NaN"):
        summarise(v, undefined=torch.tensor([True, True, False, False]))
    with pytest.raises(ValueError, match="boolean mask"):
        summarise(v, undefined=[1.0, 0.0])
    assert summarise([float("nan")], metric="complexity")["n_undefined"] == 1


def test_ssim_of_two_equal_constant_maps_is_one():
    """Identical images have SSIM 1 for any positive K1, K2; with data range 0 (both maps one constant) the
    formula was 0/0 = NaN. Other maps: unchanged (compared with a tolerance: float sums)."""
    const = torch.full((1, 1, 8, 8), 0.25)
    assert ssim(const, const).item() == pytest.approx(1.0)
    a = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim(a, a), torch.ones(2, 1, dtype=torch.float64), atol=1e-12)


# ---------------------------------------------------------------- 3. top_k_intersection's k

def test_top_k_intersection_refuses_k_outside_1_to_n():
    maps = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    gt = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    gt[:, :, 2:5, 2:5] = True
    for k in (65, 1000, 0, -1, 2.5):
        with pytest.raises(ValueError, match=r"^top_k_intersection: k must be a whole number from 1 to the number "
                                             r"of pixels per map \(64, spatial size \(8, 8\)\), got "):
            top_k_intersection(maps, gt, k=k)
    assert torch.allclose(top_k_intersection(maps, gt, k=64), torch.full((2, 1), 9 / 64, dtype=maps.dtype))
    # the default (k=None) is Quantus' 1000, or on a map of at most 1000 pixels Quantus' share at 224 px (2 %:
    # every pixel would score |GT| / n whatever the map): 2 of 64 here
    assert torch.allclose(top_k_intersection(maps, gt), top_k_intersection(maps, gt, k=2))
    signal = torch.zeros(1, 1, 1000)
    signal[..., 100:120] = 1
    hit = torch.zeros(1, 1, 1000, dtype=torch.bool)
    hit[..., 100:130] = True
    assert top_k_intersection(signal + 0.01 * torch.rand(1, 1, 1000), hit).item() == 1.0  # k = 20: all inside
    assert top_k_intersection(signal.flip(-1) + 0.01 * torch.rand(1, 1, 1000), hit).item() == 0.0
    assert torch.allclose(top_k_intersection(maps, gt, k=np.int64(3)), top_k_intersection(maps, gt, k=3))


# ---------------------------------------------------------------- 4. NaN/inf in max_box_acc_v2 and gaze inputs

def test_max_box_acc_and_gaze_metrics_refuse_nonfinite_maps():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 2, 8, 8, generator=g)
    maps[1, 1, 2, 3] = float("nan")
    maps[2, 0, 0, 0] = float("inf")
    gt = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    gt[:, :, 2:5, 2:5] = True
    gaze = torch.rand(3, 1, 8, 8, generator=g)
    words = r"^maps hold 2 NaN or infinite values, in 2 of 6 maps \(first \[image, target\]: \[\[1, 1\], \[2, 0\]\]\)"
    for f, other in ((max_box_acc_v2, gt), (kl_divergence, gaze), (nss, gaze > 0.5), (cc, gaze),
                     (similarity, gaze)):
        with pytest.raises(ValueError, match=words):
            f(maps, other)
    ok = torch.rand(3, 2, 8, 8, generator=g)
    bad_gaze = gaze.clone()
    bad_gaze[0, 0, 1, 1] = float("nan")
    bad_gaze[2, 0, 1, 1] = -float("inf")
    for f in (kl_divergence, cc, similarity):
        with pytest.raises(ValueError, match=r"^gaze hold 2 NaN or infinite values, in 2 of 3 maps \(first "
                                             r"\[image, target\]: \[\[0, 0\], \[2, 0\]\]\); a metric of such a map "
                                             r"means nothing$"):
            f(ok, bad_gaze)
    with pytest.raises(ValueError, match=r"^fixations hold 2 NaN or infinite values"):
        nss(ok, bad_gaze)
    assert torch.isfinite(kl_divergence(ok, gaze)).all()


# ---------------------------------------------------------------- 5. empty batches

@pytest.mark.parametrize("shape", [(0, 1, 8, 8), (2, 0, 8, 8)])
def test_an_empty_batch_of_maps_is_refused(shape):
    maps = torch.zeros(shape)
    masks = torch.zeros(shape[0], 1, 8, 8, dtype=torch.bool)
    words = (rf"^maps hold no map \(shape \({shape[0]}, {shape[1]}, 8, 8\)\): a metric needs at least one image "
             r"and one target, \(B, T, \*spatial\) with B, T >= 1$")
    for f in (relevance_mass, pointing_game, top_k_intersection, max_box_acc_v2):
        with pytest.raises(ValueError, match=words):
            f(maps, masks)
    for f in (complexity, sparseness):
        with pytest.raises(ValueError, match=words):
            f(maps)
    with pytest.raises(ValueError, match=words):
        kl_divergence(maps, masks.float())
    with pytest.raises(ValueError, match=r"^maps have no pixels"):
        complexity(torch.zeros(2, 1, 0, 8))


# ---------------------------------------------------------------- 6. channel-last maps

def test_channel_last_maps_are_named_with_the_fix():
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(2, 1, 8, 8, generator=g)
    gt = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    gt[:, :, 2:5, 2:5] = True
    last = maps.permute(0, 2, 3, 1)  # (B, H, W, 1)
    hint = (r"maps look channel-last \(B, \*spatial, 1\): nemt wants channel-first \(B, T, \*spatial\); use "
            r"maps.movedim\(-1, 1\) \(or .permute\(0, 3, 1, 2\)\)$")
    for f, other in ((relevance_mass, gt), (pointing_game, gt), (kl_divergence, gt.float()),
                     (max_box_acc_v2, gt)):
        with pytest.raises(ValueError, match=r"^maps \(2, 8, 8, 1\) do not fit \w+ \(2, 1, 8, 8\); " + hint):
            f(last, other)
    model, x, _ = _case(5, size=8)
    with pytest.raises(ValueError, match=r"^x \(2, 1, 8, 8\) and maps \(2, 8, 8, 1\) must share batch and spatial "
                                         r"size; " + hint):
        deletion_auc(model, x, last, 0, steps=4)
    with pytest.raises(ValueError, match=r"x looks channel-last \(B, \*spatial, 1\): nemt wants channel-first "
                                         r"\(B, C, \*spatial\); use x.movedim\(-1, 1\)"):
        deletion_auc(model, x.permute(0, 2, 3, 1), maps, 0, steps=4)
    # channel-last masks: the masks are named, with the same fix
    with pytest.raises(ValueError, match=r"^masks must be \(B, 1 or T, \*spatial\) matching maps \(2, 1, 8, 8\), "
                                         r"got \(2, 8, 8, 1\); masks look channel-last"):
        relevance_mass(maps, gt.permute(0, 2, 3, 1))
    assert torch.allclose(relevance_mass(last.movedim(-1, 1), gt), relevance_mass(maps, gt))


# ---------------------------------------------------------------- 7. save_overlay

def test_save_overlay_refuses_maps_of_another_size_and_unpaired_titles(tmp_path):
    from nemt.visualize import save_overlay

    img = np.zeros((16, 16))
    with pytest.raises(ValueError, match=r"^maps\[1\] of shape \(8, 8\) does not fit the image of shape \(16, 16\): "
                                         r"each map must have the image's spatial size \(16, 16\)"):
        save_overlay(tmp_path / "a.png", img, [np.ones((16, 16)), np.ones((8, 8))], ["a", "b"])
    with pytest.raises(ValueError, match=r"^1 titles for 2 maps: give one title per map"):
        save_overlay(tmp_path / "b.png", img, [np.ones((16, 16)), np.ones((16, 16))], ["a"])
    with pytest.raises(ValueError, match=r"^3 titles for 2 maps"):
        save_overlay(tmp_path / "b.png", img, [np.ones((16, 16))] * 2, ["a", "b", "c"])
    with pytest.raises(TypeError, match=r"^titles must be a sequence of strings"):
        save_overlay(tmp_path / "c.png", img, [np.ones((16, 16))], "a")
    with pytest.raises(ValueError, match=r"the image looks channel-last \(H, W, C\)"):
        save_overlay(tmp_path / "d.png", np.zeros((16, 16, 3)), [np.ones((16, 16))], ["a"])
    assert not list(tmp_path.iterdir())  # nothing written for refused input
    assert save_overlay(tmp_path / "ok.png", np.zeros((3, 16, 16)), [np.ones((16, 16))] * 2, ["a", "b"]).exists()
    assert save_overlay(tmp_path / "sig.png", np.zeros((2, 40)), [np.ones(40)], ["a"]).exists()


# ---------------------------------------------------------------- the caller's state

def test_metrics_leave_the_callers_state_alone():
    """Global RNGs (Python, NumPy, torch), warnings filters, torch's thread count and matplotlib's backend are
    the same after the metrics (including ROAD's noisy imputation and the randomisation tests) and an overlay,
    and so are the models' training flags and requires_grad. The randomisation tests run on a model with
    layers to re-initialise (on PixelModel, which has none, the parameter randomisation test did nothing: its
    RNG check was vacuous; it is now refused)."""
    import matplotlib

    from nemt.visualize import save_overlay

    model, x, maps = _case(6, size=8)  # SSIM (random_logit's similarity) needs 7 pixels a side
    maps[1] = 0.0  # a constant map: the warning path too
    torch.manual_seed(0)  # the layers' initial weights (the test's own seeding)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3))
    net[0].bias.requires_grad_(False)  # a caller's frozen parameter stays frozen
    model.train(), net.train()  # left in training mode by the caller: handed back so
    grads = lambda: [p.requires_grad for m in (model, net) for p in m.parameters()]  # noqa: E731
    flags = lambda: [m.training for mm in (model, net) for m in mm.modules()]  # noqa: E731
    grads_before, flags_before = grads(), flags()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(), list(warnings.filters),
              torch.get_num_threads(), matplotlib.get_backend())

    def explain(m, xx, t):
        return xx[:, :1].expand(-1, t.shape[1], -1, -1).clone() * m.w

    def grad_explain(m, xx, t):  # the input gradient: depends on every layer's weights
        xx = xx.clone().requires_grad_(True)
        g, = torch.autograd.grad(m(xx).gather(1, t[:, :1]).sum(), xx)
        return g[:, :1].expand(-1, t.shape[1], -1, -1)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        inner = list(warnings.filters)
        road(model, x, maps, 0, percentages=(10, 50), noise=0.01)
        faithfulness_estimate(model, x, maps, 0, features_in_step=4)
        r = model_parameter_randomisation(net, x, grad_explain, 0)
        assert list(r) == ["3", "0"]  # both layers re-initialised, under their own seeds
        random_logit(net, x, grad_explain, 0)
        random_logit(model, x, explain, 0)
        complexity(maps), top_k_intersection(maps, maps > 0.5, k=5)
        assert warnings.filters == inner
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        save_overlay(f"{d}/o.png", np.zeros((8, 8)), [np.ones((8, 8))], ["m"])
    after = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(), list(warnings.filters),
             torch.get_num_threads(), matplotlib.get_backend())
    assert after[0] == before[0] and np.array_equal(after[1], before[1]) and torch.equal(after[2], before[2])
    assert after[3:] == before[3:]
    assert grads() == grads_before and flags() == flags_before


def test_errors_are_nemt_errors_too():
    """One type for the CLI to catch: every refusal above is a NemtError as well as a ValueError/TypeError."""
    with pytest.raises(NemtError):
        complexity(torch.zeros(0, 1, 4, 4))
    with pytest.raises(NemtError):
        top_k_intersection(torch.rand(1, 1, 4, 4), torch.ones(1, 1, 4, 4, dtype=torch.bool), k=17)
    assert M.summarise is summarise
