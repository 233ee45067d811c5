"""nemt.metrics: hand-made cases where the definition gives the number, equality with Quantus, NaN handling, 3D."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nemt.errors import NemtError
import nemt.metrics as M
from nemt.metrics import (DIRECTIONS, cc, complexity, deletion_auc, emd_score, energy_pointing_game,
                          faithfulness_estimate, fixations_to_heatmap, importance_mass_accuracy, insertion_auc,
                          kl_divergence, linear_imputation, model_parameter_randomisation, nss, pointing_game,
                          random_logit, relevance_mass, relevance_rank, road, similarity, sparseness, ssim,
                          summarise, top_k_intersection, top_k_precision)

torch.set_num_threads(1)


def grid4() -> torch.Tensor:
    """A (1, 1, 4, 4) map with values 0 … 15 in raster order (min-max: v / 15)."""
    return torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)


def mask4(*pixels) -> torch.Tensor:
    m = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    for i, j in pixels:
        m[0, 0, i, j] = True
    return m


# ---------------------------------------------------------------- directions

def test_every_metric_has_a_direction():
    for name in ["relevance_mass", "relevance_rank", "pointing_game", "pointing_game_expected", "top_k_intersection",
                 "energy_pointing_game",
                 "complexity", "sparseness", "faithfulness_estimate", "deletion_auc", "insertion_auc", "road",
                 "model_parameter_randomisation", "random_logit", "kl_divergence", "nss", "cc", "similarity",
                 "top_k_precision", "emd_score", "importance_mass_accuracy"]:
        fn = getattr(M, name)
        assert DIRECTIONS[name] == fn.direction in ("higher", "lower")
        assert fn.__doc__ and len(fn.__doc__) > 80
    assert DIRECTIONS["complexity"] == "lower" and DIRECTIONS["kl_divergence"] == "lower"
    assert DIRECTIONS["deletion_auc"] == "lower" and DIRECTIONS["insertion_auc"] == "higher"


def test_registry_describes_every_metric():
    reg = M.registry()
    assert set(reg) == set(DIRECTIONS) and len(reg) == 22  # 20 + pointing_game_expected + max_box_acc_v2 (dataset-level)
    for name, spec in reg.items():
        assert spec.name == name and spec.fn is getattr(M, name) and M.get_metric(name) is spec
        assert spec.direction == DIRECTIONS[name] == spec.fn.direction
        assert set(spec.inputs) <= set(M.INPUTS)
    assert M.get_metric("relevance_mass").inputs == ("maps", "gt") and M.get_metric("relevance_mass").needs_gt
    assert M.get_metric("complexity").inputs == ("maps",)
    assert M.get_metric("road").inputs == ("model", "x", "maps", "target")
    assert M.get_metric("nss").inputs == ("maps", "fixations")
    assert M.get_metric("random_logit").inputs == ("model", "x", "explain", "target")
    assert M.available_metrics(("maps",)) == ["complexity", "sparseness"]
    assert M.available_metrics() == sorted(reg)
    from nemt.errors import NemtError
    with pytest.raises(NemtError, match="unknown metric 'nope'"):
        M.get_metric("nope")
    with pytest.raises(ValueError, match="direction"):
        M.metric("best", inputs=("maps",))
    with pytest.raises(ValueError, match="unknown input"):
        M.metric("higher", inputs=("maps", "mask"))
    with pytest.raises(ValueError, match="already registered"):
        M.metric("higher", inputs=("maps",), name="complexity")(lambda maps: maps)
    with pytest.raises(TypeError):
        DIRECTIONS["complexity"] = "higher"  # a read-only view of the registry
    with pytest.raises(NemtError, match="needs gt"):
        M.get_metric("relevance_mass").call({"maps": grid4()})
    assert M.get_metric("relevance_mass").call({"maps": grid4(), "gt": mask4((3, 3))}).item() == \
        relevance_mass(grid4(), mask4((3, 3))).item()


# ---------------------------------------------------------------- localisation by definition

def test_localisation_by_definition():
    a = grid4()
    tl = mask4((0, 0), (0, 1), (1, 0), (1, 1))  # values 0, 1, 4, 5
    assert relevance_mass(a, tl).item() == pytest.approx(10 / 120, abs=1e-6)
    assert energy_pointing_game(a, tl).item() == pytest.approx(10 / 120, abs=1e-6)
    # k = |GT| = 4; the top 4 are 15, 14, 13, 12 (bottom row); two of them in GT
    gt = mask4((3, 3), (3, 2), (0, 0), (0, 1))
    assert relevance_rank(a, gt).item() == 0.5
    assert pointing_game(a, gt).item() == 1.0
    assert pointing_game(a, tl).item() == 0.0
    assert pointing_game(a, mask4((2, 2)), tolerance=1).item() == 1.0
    assert pointing_game(a, mask4((1, 1)), tolerance=1).item() == 0.0
    bottom = mask4((3, 0), (3, 1), (3, 2), (3, 3))
    assert top_k_intersection(a, bottom, k=3).item() == 1.0
    assert top_k_intersection(a, mask4((3, 3)), k=3).item() == pytest.approx(1 / 3)
    assert top_k_intersection(a, mask4((3, 3)), k=3, concept_influence=True).item() == pytest.approx(16 / 3)
    # abs: with normalise="max", |a| decides; -15 becomes the largest
    neg = -a
    assert pointing_game(neg, mask4((3, 3)), normalise="max", abs=True).item() == 1.0
    assert pointing_game(neg, mask4((0, 0))).item() == 1.0  # min-max: -0 is the maximum


def test_rank_ties_broken_by_position():
    a = torch.zeros(1, 1, 4, 4)
    a[0, 0, 0, :2] = 1.0  # two tied maxima
    a[0, 0, 2, 2] = 0.5
    # k = 1: the first tied maximum (0, 0) is the top pixel
    assert relevance_rank(a, mask4((0, 0))).item() == 1.0
    assert relevance_rank(a, mask4((0, 1))).item() == 0.0
    # k = 2: both maxima
    assert relevance_rank(a, mask4((0, 1), (3, 3))).item() == 0.5
    # ties in a large k: zeros after 3 nonzero pixels, first by position
    assert relevance_rank(a, mask4((0, 0), (0, 2), (2, 2), (3, 3))).item() == 0.75


def test_empty_masks_give_nan_and_summarise_counts_them():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(5, 2, 8, 8, generator=g)
    masks = torch.zeros(5, 1, 8, 8, dtype=torch.bool)
    masks[:3, :, 2:5, 2:5] = True  # images 3 and 4 have empty GT (normal cases)
    for fn in (relevance_mass, relevance_rank, pointing_game, top_k_intersection, energy_pointing_game,
               top_k_precision, importance_mass_accuracy, emd_score):
        v = fn(maps, masks)
        assert v.shape == (5, 2)
        assert torch.isnan(v[3:]).all() and not torch.isnan(v[:3]).any(), fn.__name__
        s = summarise(v)
        assert s["n"] == 6 and s["n_excluded"] == 4
        assert s["mean"] == pytest.approx(float(v[:3].mean()), abs=1e-6)
    gaze = torch.zeros(5, 1, 8, 8)
    gaze[:2, :, 3, 3] = 1.0
    for fn in (kl_divergence, nss, cc, similarity):
        v = fn(maps, gaze)
        assert torch.isnan(v[2:]).all() and not torch.isnan(v[:2]).any(), fn.__name__


def test_summarise():
    s = summarise(torch.tensor([1.0, 2.0, 3.0, float("nan")]))
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} · s / sqrt(n)
    assert s["mean"] == 2.0 and s["n"] == 3 and s["n_excluded"] == 1
    assert s["ci_low"] == pytest.approx(2 - half) and s["ci_high"] == pytest.approx(2 + half)
    b = summarise([1.0, 2.0, 3.0, 4.0], method="bootstrap")
    assert 1.0 <= b["ci_low"] < 2.5 < b["ci_high"] <= 4.0
    e = summarise([float("nan")] * 2)
    assert e["n"] == 0 and e["n_excluded"] == 2 and math.isnan(e["mean"])
    one = summarise([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["ci_low"])


def test_summarise_binary_values_get_the_wilson_interval():
    # 8 hits of 10, z = 1.959964: centre (p + z²/2n)/(1 + z²/n), half z/(1 + z²/n)·sqrt(p(1-p)/n + z²/4n²)
    z, n, p = 1.959963984540054, 10, 0.8
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    s = summarise([1.0] * 8 + [0.0] * 2 + [float("nan")])
    assert s["mean"] == 0.8 and s["n"] == 10 and s["n_excluded"] == 1
    assert s["ci_low"] == pytest.approx(centre - half) and s["ci_high"] == pytest.approx(centre + half)
    # all hits: the t-interval collapses to [1, 1]; Wilson stays informative and inside [0, 1]
    allhit = summarise([1.0] * 5)
    assert allhit["ci_high"] == pytest.approx(1.0) and 0.4 < allhit["ci_low"] < 0.6
    t = summarise([1.0] * 5, method="t")
    assert t["ci_low"] == t["ci_high"] == 1.0
    # few hits: the t-interval goes below 0, Wilson does not
    few = [1.0] + [0.0] * 9
    assert summarise(few, method="t")["ci_low"] < 0 <= summarise(few)["ci_low"]
    with pytest.raises(ValueError, match="0 or 1"):
        summarise([0.5, 1.0], method="wilson")


# ---------------------------------------------------------------- complexity and sparseness by definition

def test_complexity_and_sparseness_by_definition():
    two = torch.zeros(1, 1, 4, 4)
    two[0, 0, 0, 0] = two[0, 0, 1, 1] = 1.0
    assert complexity(two).item() == pytest.approx(math.log(2), abs=1e-6)
    assert complexity(torch.ones(1, 1, 4, 4), normalise=None).item() == pytest.approx(math.log(16), abs=1e-5)
    # a constant map is the uniform distribution (min-max turns it into zeros, where Quantus gives 0/0 = NaN)
    assert complexity(torch.ones(1, 1, 4, 4)).item() == pytest.approx(math.log(16), abs=1e-9)
    one = torch.zeros(1, 1, 4, 4)
    one[0, 0, 2, 3] = 1.0
    assert complexity(one).item() == pytest.approx(0.0, abs=1e-6)
    assert sparseness(one).item() == pytest.approx(15 / 16, abs=1e-5)
    assert sparseness(torch.ones(1, 1, 4, 4), normalise=None).item() == pytest.approx(0.0, abs=1e-6)
    # Gini of (0, 1/3, 2/3, 1): Σ(2i-n-1)a / (n Σa) = (−3·0 −1·1/3 + 1·2/3 + 3·1) / (4·2) = (10/3)/8
    ramp = torch.arange(4.0).view(1, 1, 2, 2)
    assert sparseness(ramp).item() == pytest.approx((10 / 3) / 8, abs=1e-5)


# ---------------------------------------------------------------- 3D

def test_3d_equals_flattened_2d():
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(3, 2, 4, 5, 6, generator=g)
    masks = torch.zeros(3, 1, 4, 5, 6, dtype=torch.bool)
    masks[0, :, 1:3, 1:4, 2:5] = True
    masks[1, :, 0, 0, 0] = True
    masks[2, :, 2:, :, 3:] = True
    flat_maps, flat_masks = maps.reshape(3, 2, 20, 6), masks.reshape(3, 1, 20, 6)
    for fn in (relevance_mass, relevance_rank, pointing_game, top_k_intersection, energy_pointing_game,
               top_k_precision, importance_mass_accuracy):
        assert torch.allclose(fn(maps, masks), fn(flat_maps, flat_masks), atol=1e-6), fn.__name__
    for fn in (complexity, sparseness):
        v = fn(maps)
        assert v.shape == (3, 2) and torch.allclose(v, fn(flat_maps), atol=1e-6)
    gaze = masks.float()
    for fn in (kl_divergence, nss, cc, similarity):
        assert torch.allclose(fn(maps, gaze), fn(flat_maps, flat_masks.float()), atol=1e-5, equal_nan=True)
    # pointing game tolerance grows the mask in 3D
    vol = torch.zeros(1, 1, 5, 5, 5)
    vol[0, 0, 2, 2, 2] = 1.0
    gt = torch.zeros(1, 1, 5, 5, 5, dtype=torch.bool)
    gt[0, 0, 3, 3, 3] = True
    assert pointing_game(vol, gt).item() == 0.0 and pointing_game(vol, gt, tolerance=1).item() == 1.0
    # emd in 3D: all mass one voxel away from GT along one axis
    a = torch.zeros(1, 1, 3, 3, 3)
    a[0, 0, 0, 0, 1] = 1.0
    gt = torch.zeros(1, 1, 3, 3, 3, dtype=torch.bool)
    gt[0, 0, 0, 0, 0] = True
    assert emd_score(a, gt).item() == pytest.approx(1 - 1 / math.sqrt(12), abs=1e-6)


# ---------------------------------------------------------------- equality with Quantus

def _minmax_np(a, **_):
    ax = tuple(range(1, a.ndim))
    lo, hi = a.min(axis=ax, keepdims=True), a.max(axis=ax, keepdims=True)
    return (a - lo) / np.maximum(hi - lo, 1e-12)


@pytest.fixture(scope="module")
def random_case():
    g = torch.Generator().manual_seed(0)
    b, s = 8, 28
    maps = torch.randn(b, 1, s, s, generator=g)
    x = torch.randn(b, 1, s, s, generator=g)
    masks = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for i in range(b):
        h, w = torch.randint(3, 15, (2,), generator=g).tolist()
        y0, x0 = torch.randint(0, s - 15, (2,), generator=g).tolist()
        masks[i, 0, y0:y0 + h, x0:x0 + w] = True
    return maps, x, masks


#: (nemt's name, Quantus' class, keyword arguments) of the localisation metrics compared with Quantus
QUANTUS_LOCALISATION = [
    ("relevance_mass", "RelevanceMassAccuracy", {}),
    ("relevance_rank", "RelevanceRankAccuracy", {}),
    ("pointing_game", "PointingGame", {}),
    ("top_k_intersection", "TopKIntersection", {"k": 50}),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name, cls, kw", QUANTUS_LOCALISATION)
def test_localisation_equals_quantus(random_case, name, cls, kw):
    quantus = pytest.importorskip("quantus")
    maps, x, masks = random_case
    args = dict(model=None, x_batch=x.numpy(), y_batch=np.zeros(len(x), dtype=int), a_batch=maps.numpy(),
                s_batch=masks.numpy().astype(np.float32))
    ours = getattr(M, name)
    # METHODS.md normalisation (per-map min-max) on both sides
    q = np.asarray(getattr(quantus, cls)(normalise_func=_minmax_np, disable_warnings=True, **kw)(**args), float)
    np.testing.assert_allclose(ours(maps, masks, **kw).squeeze(1).numpy(), q, atol=1e-5)
    # Quantus' own defaults (normalise by max, abs=False) against normalise="max"
    q = np.asarray(getattr(quantus, cls)(disable_warnings=True, **kw)(**args), float)
    np.testing.assert_allclose(ours(maps, masks, normalise="max", **kw).squeeze(1).numpy(), q, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_quantus_pointing_game_empty_mask_defect(random_case):
    """Quantus 0.6.0 scores an empty mask as a hit (NaN written into a bool array); we give NaN."""
    quantus = pytest.importorskip("quantus")
    maps, x, masks = random_case
    masks = masks.clone()
    masks[2] = False
    q = quantus.PointingGame(disable_warnings=True)(model=None, x_batch=x.numpy(), y_batch=np.zeros(8, dtype=int),
                                                    a_batch=maps.numpy(), s_batch=masks.numpy().astype(np.float32))
    assert q[2] == 1
    assert math.isnan(pointing_game(maps, masks)[2, 0].item())


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name, cls", [("complexity", "Complexity"), ("sparseness", "Sparseness")])
def test_complexity_equals_quantus(random_case, name, cls):
    quantus = pytest.importorskip("quantus")
    maps, x, _ = random_case
    ours = getattr(M, name)
    args = dict(model=None, x_batch=x.numpy(), y_batch=np.zeros(len(x), dtype=int))
    # METHODS.md's min-max first: Quantus takes |a| after its normaliser, where it changes nothing (abs=False here)
    q = getattr(quantus, cls)(normalise_func=_minmax_np, disable_warnings=True)(a_batch=maps.numpy().copy(), **args)
    np.testing.assert_allclose(ours(maps, abs=False).squeeze(1).numpy(), np.asarray(q, float), atol=1e-5)
    # our abs=True (the default) takes |a| before the min-max: Quantus given the min-max of |a|
    q = getattr(quantus, cls)(normalise_func=lambda a, **_: _minmax_np(np.abs(a)), disable_warnings=True)(
        a_batch=maps.numpy().copy(), **args)
    np.testing.assert_allclose(ours(maps).squeeze(1).numpy(), np.asarray(q, float), atol=1e-5)
    q = getattr(quantus, cls)(disable_warnings=True)(a_batch=maps.numpy().copy(), **args)  # abs=True, by max
    np.testing.assert_allclose(ours(maps, normalise="max").squeeze(1).numpy(), np.asarray(q, float), atol=1e-5)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name, cls", [("complexity", "Complexity"), ("sparseness", "Sparseness")])
def test_complexity_and_sparseness_are_accumulated_in_float64(name, cls):
    """Issue 12, item 5: float32 maps at 224 px equal Quantus to 1e-5 (the README's claim), and Quantus run in
    float64 on the same maps to 1e-9: no float32 rounding is left in the sums (it was ~1e-6 at 224 px, more
    on other CPUs and pixel counts)."""
    quantus = pytest.importorskip("quantus")
    g = torch.Generator().manual_seed(0)
    b, s = 16, 224
    maps = torch.randn(b, 1, s, s, generator=g)
    maps[: b // 2] = maps[: b // 2].mul(2).exp()  # heavy-tailed maps too, as attributions often are
    args = dict(model=None, x_batch=np.zeros((b, 1, s, s), np.float32), y_batch=np.zeros(b, dtype=int))
    ours = getattr(M, name)(maps, abs=False).squeeze(1)  # Quantus' order: min-max, then a no-op |a|
    assert maps.dtype == torch.float32 and ours.dtype == torch.float64
    q32 = getattr(quantus, cls)(normalise_func=_minmax_np, disable_warnings=True)(a_batch=maps.numpy().copy(),
                                                                                  **args)
    np.testing.assert_allclose(ours.numpy(), np.asarray(q32, float), rtol=0, atol=1e-5)
    q64 = getattr(quantus, cls)(normalise_func=_minmax_np, disable_warnings=True)(
        a_batch=maps.numpy().astype(np.float64), **args)
    np.testing.assert_allclose(ours.numpy(), np.asarray(q64, float), rtol=0, atol=1e-9)


def tiny_cnn(out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, out)).eval()


@pytest.mark.filterwarnings("ignore")
def test_faithfulness_estimate_equals_quantus(random_case):
    quantus = pytest.importorskip("quantus")
    maps, x, _ = random_case
    net = tiny_cnn()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    q = quantus.FaithfulnessEstimate(features_in_step=28, perturb_baseline="black", normalise_func=_minmax_np,
                                     abs=False, disable_warnings=True)(
        model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy())
    ours = faithfulness_estimate(net, x, maps, y, features_in_step=28, baseline="min", batch_size=100)
    np.testing.assert_allclose(ours.squeeze(1).numpy(), np.asarray(q, float), atol=1e-5)


# ---------------------------------------------------------------- faithfulness by definition

class PixelModel(nn.Module):
    """Class 0 logit = weighted pixel sum (weights w), class 1 logit = 0."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.eval()

    def forward(self, x):
        z = (x[:, 0] * self.w).flatten(1).sum(1)
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_faithfulness_estimate_by_definition():
    g = torch.Generator().manual_seed(3)
    w = torch.rand(4, 4, generator=g) + 0.1
    model = PixelModel(w)
    x = torch.rand(2, 1, 4, 4, generator=g) + 0.5
    x[:, 0, 0, 0] = 0.0  # baseline = image minimum = 0, so removing pixel i drops the logit by w_i x_i
    exact = (w * x[:, 0]).unsqueeze(1)  # the exact contribution of each pixel
    t = torch.zeros(2, dtype=torch.long)
    v = faithfulness_estimate(model, x, exact, t, features_in_step=1)
    assert torch.allclose(v, torch.ones(2, 1), atol=1e-5)
    assert torch.allclose(faithfulness_estimate(model, x, -exact, t, features_in_step=1), -torch.ones(2, 1), atol=1e-5)
    # groups of 4, and groups of 5 (the last one smaller): group sums still match the drops exactly
    assert torch.allclose(faithfulness_estimate(model, x, exact, t, features_in_step=4), torch.ones(2, 1), atol=1e-5)
    assert torch.allclose(faithfulness_estimate(model, x, exact, t, features_in_step=5), torch.ones(2, 1), atol=1e-5)
    # two channels and a blurred baseline: all channels of a pixel are replaced by the blurred image
    from nemt.metrics._common import gaussian_blur
    x2 = torch.cat([x, torch.rand(2, 1, 4, 4, generator=g)], 1)
    contrib = (w * (x2 - gaussian_blur(x2, 5.0, radius=5))[:, 0]).unsqueeze(1)
    v = faithfulness_estimate(model, x2, contrib, t, features_in_step=3, baseline="blur", normalise=None)
    assert torch.allclose(v, torch.ones(2, 1), atol=1e-5)


def test_faithfulness_3d_and_errors():
    g = torch.Generator().manual_seed(5)
    w = torch.rand(3, 4, 5, generator=g) + 0.1
    model = PixelModel(w)
    x = torch.rand(2, 1, 3, 4, 5, generator=g) + 0.5
    x[:, 0, 0, 0, 0] = 0.0
    exact = (w * x[:, 0]).unsqueeze(1)
    assert torch.allclose(faithfulness_estimate(model, x, exact, 0, features_in_step=6), torch.ones(2, 1), atol=1e-5)
    d = deletion_auc(model, x, exact, 0, steps=6, output="logit")
    i = insertion_auc(model, x, exact, 0, steps=6, output="logit")
    r = deletion_auc(model, x, -exact, 0, steps=6, output="logit")
    assert d.shape == i.shape == (2, 1) and (d < r).all()  # the right order deletes the logit faster
    with pytest.raises(Exception, match="targets per sample"):
        faithfulness_estimate(model, x, exact, torch.zeros(2, 2, dtype=torch.long))
    # a model left in training mode is scored in eval mode for the call and handed back in training mode
    model.train()
    assert torch.equal(deletion_auc(model, x, exact, 0, steps=6, output="logit"), d) and model.training


def test_deletion_and_insertion_by_definition():
    w = torch.zeros(4, 4)
    w[0, 0] = 1.0  # the logit is the value of pixel (0, 0)
    model = PixelModel(w)
    x = torch.ones(1, 1, 4, 4)
    good = torch.zeros(1, 1, 4, 4)
    good[0, 0, 0, 0] = 1.0
    # steps = 4 (4 pixels a step): deletion curve 1, 0, 0, 0, 0 -> (1 - 1/2) / 4
    d = deletion_auc(model, x, good, 0, steps=4, baseline="zero", output="logit")
    assert d.item() == pytest.approx(0.125)
    i = insertion_auc(model, x, good, 0, steps=4, baseline="zero", output="logit")
    assert i.item() == pytest.approx(0.875)  # 0, 1, 1, 1, 1 -> (4 - 1/2) / 4
    bad = 1 - good  # (0, 0) ranked last: deleted at the last step only
    assert deletion_auc(model, x, bad, 0, steps=4, baseline="zero", output="logit").item() == pytest.approx(0.875)
    auc, curve = deletion_auc(model, x, good, 0, steps=4, baseline="zero", output="logit", return_curve=True)
    assert curve.shape == (1, 1, 5) and curve[0, 0].tolist() == [1, 0, 0, 0, 0]
    # probabilities: softmax of (1, 0) at the start
    p = deletion_auc(model, x, bad, 0, steps=4, baseline="zero", return_curve=True)[1]
    assert p[0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-6)


def test_linear_imputation_reproduces_a_ramp_and_matches_quantus():
    yy, xx = torch.meshgrid(torch.arange(9.0), torch.arange(10.0), indexing="ij")
    img = (yy + 2 * xx).unsqueeze(0).numpy()  # a linear ramp (C=1)
    unknown = np.zeros((9, 10), dtype=bool)
    unknown[2:6, 3:8] = True
    out = linear_imputation(img, unknown)
    np.testing.assert_allclose(out, img, atol=1e-9)  # interior: the weighted mean of a linear function is exact
    pytest.importorskip("quantus")
    from quantus.functions.perturb_func import noisy_linear_imputation
    g = np.random.default_rng(0)
    img = g.normal(size=(2, 12, 11))
    unknown = g.random((12, 11)) < 0.4  # touching the borders too
    ref = noisy_linear_imputation(arr=img, indices=np.flatnonzero(unknown), noise=0.0)
    np.testing.assert_allclose(linear_imputation(img, unknown), ref, atol=1e-8)


def test_road():
    model = PixelModel(torch.ones(6, 6))  # class 0 logit = pixel sum; stays > 0 for positive images
    x = torch.rand(2, 1, 6, 6) + 1.0
    maps = torch.rand(2, 1, 6, 6)
    v, curve = road(model, x, maps, 0, percentages=[10, 50, 90], noise=0.0, return_curve=True)
    assert v.shape == (2, 1) and torch.equal(v, torch.ones(2, 1)) and curve.shape == (2, 1, 3)
    v = road(model, x, maps, 1, percentages=[10, 50], noise=0.01)  # class 1 is never the arg-max
    assert torch.equal(v, torch.zeros(2, 1))


# ---------------------------------------------------------------- randomisation

def _grad_explain(model, x, t):
    x = x.clone().requires_grad_(True)
    out = model(x)
    maps = []
    for j in range(t.shape[1]):
        g, = torch.autograd.grad(out.gather(1, t[:, j:j + 1]).sum(), x, retain_graph=True)
        maps.append(g.abs().sum(1))
    return torch.stack(maps, 1)


def test_model_parameter_randomisation():
    net = tiny_cnn()
    x = torch.randn(3, 1, 12, 12)
    t = torch.tensor([0, 1, 2])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    # an explanation that ignores the model stays identical: similarity 1 for every layer
    same = model_parameter_randomisation(net, x, lambda m, xx, tt: xx.expand(-1, tt.shape[1], -1, -1), t)
    assert list(same) == ["7", "3", "0"]  # top-down: Linear, second Conv, first Conv
    for v in same.values():
        assert v.shape == (3, 1) and torch.allclose(v, torch.ones(3, 1), atol=1e-6)
    r = model_parameter_randomisation(net, x, _grad_explain, t)
    assert all(torch.isfinite(v).all() for v in r.values()) and r["0"].mean() < 0.9
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # the model is untouched
    r2 = model_parameter_randomisation(net, x, _grad_explain, t)
    assert all(torch.equal(r[k], r2[k]) for k in r)  # seeded


def test_random_logit():
    net = tiny_cnn(out=2)
    x = torch.randn(2, 1, 12, 12)
    ramp = torch.arange(144.0).view(1, 1, 12, 12)
    # map for class c is ramp * (-1)^c: the other class is always the reversed map -> Spearman -1
    flip = lambda m, xx, tt: ramp * (1 - 2 * tt.float()).view(*tt.shape, 1, 1)  # noqa: E731
    v = random_logit(net, x, flip, torch.tensor([0, 1]), similarity="spearman")
    assert torch.allclose(v, -torch.ones(2, 1), atol=1e-6)
    v = random_logit(net, x, lambda m, xx, tt: ramp.expand(2, tt.shape[1], -1, -1), torch.tensor([0, 1]))
    assert torch.allclose(v, torch.ones(2, 1), atol=1e-6)  # class-independent maps: SSIM 1


def test_ssim_equals_skimage_2d_and_3d():
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(4)
    for shape in [(2, 1, 16, 18), (1, 1, 8, 9, 10)]:
        a = torch.rand(*shape, generator=g)
        b = a + 0.3 * torch.rand(*shape, generator=g)
        ours = ssim(a, b)
        for i in range(shape[0]):
            ai, bi = a[i, 0].double().numpy(), b[i, 0].double().numpy()
            rng = max(ai.max(), bi.max()) - min(ai.min(), bi.min())
            assert ours[i, 0].item() == pytest.approx(structural_similarity(ai, bi, data_range=rng), abs=1e-6)


# ---------------------------------------------------------------- gaze

def test_gaze_metrics_by_definition():
    s = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # z-scores -1, 1, -1, 1
    fix = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    assert nss(s, fix).item() == pytest.approx(1.0)
    assert nss(s, torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])).item() == pytest.approx(0.0)
    assert cc(s, s).item() == pytest.approx(1.0) and cc(s, 1 - s).item() == pytest.approx(-1.0)
    with pytest.warns(M.UndefinedMetricWarning, match="cc: 1 of 1 maps score NaN"):
        assert math.isnan(cc(torch.ones(1, 1, 2, 2), s).item())  # constant map: no spread to correlate
    g = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    assert similarity(s, g).item() == pytest.approx(0.5)  # min((0, .5, 0, .5), (0, .5, .5, 0))
    assert similarity(s, s).item() == pytest.approx(1.0)
    assert kl_divergence(s, s).item() == pytest.approx(0.0, abs=1e-6)
    eps = np.finfo(np.float64).eps
    expected = 0.5 * math.log(eps + 0.5 / (0.5 + eps)) + 0.5 * math.log(eps + 0.5 / eps)  # G=(0,.5,.5,0), S=(0,.5,0,.5)
    assert kl_divergence(s, g).item() == pytest.approx(expected, rel=1e-5)


def test_fixations_to_heatmap():
    h = fixations_to_heatmap([[1.5, 0.2], [3.9, 2.0, ]], (3, 4), sigma=0)  # (x, y): pixels (0, 1) and (2, 3)
    expected = torch.zeros(3, 4)
    expected[0, 1] = expected[2, 3] = 0.5
    assert torch.equal(h, expected)
    h = fixations_to_heatmap([[0.5, 1.5, 3.0], [2.5, 1.5, 1.0], [9, 9, 5.0]], (3, 4), sigma=0, order="ij")
    expected = torch.zeros(3, 4)
    expected[0, 1], expected[2, 1] = 0.75, 0.25  # durations 3 and 1; the third is outside
    assert torch.allclose(h, expected)
    b = fixations_to_heatmap(np.array([[10.0, 10.0]]), (21, 21), sigma=2.0)
    assert b.sum().item() == pytest.approx(1.0) and b.argmax().item() == 10 * 21 + 10
    assert torch.allclose(b, b.T) and torch.allclose(b, b.flip(0))
    assert fixations_to_heatmap(np.zeros((0, 2)), (4, 4), sigma=1.0).sum() == 0
    assert fixations_to_heatmap([[1, 2, 3]], (4, 5, 6), sigma=1.0).shape == (4, 5, 6)


# ---------------------------------------------------------------- ground truth (XAI-TRIS)

def test_ground_truth_metrics_by_definition():
    a = torch.zeros(1, 1, 4, 4)
    a[0, 0, 0, 0] = -5.0  # large |a| inside GT
    a[0, 0, 0, 1] = 2.0
    a[0, 0, 3, 3] = 3.0
    gt = mask4((0, 0), (0, 1))
    assert top_k_precision(a, gt).item() == 0.5  # top-2 |a|: (0,0) and (3,3)
    assert importance_mass_accuracy(a, gt).item() == pytest.approx(7 / 10)
    only = torch.zeros(1, 1, 4, 4)
    only[0, 0, 0, 0] = 1.0
    assert top_k_precision(only, mask4((0, 0), (0, 1), (1, 1))).item() == pytest.approx(1 / 3)  # zeros never hit
    assert top_k_precision(only, mask4((1, 1), (0, 1))).item() == 0.0
    assert emd_score(gt.float(), gt).item() == pytest.approx(1.0)
    far = torch.zeros(1, 1, 4, 4)
    far[0, 0, 3, 3] = 1.0
    assert emd_score(far, mask4((0, 0))).item() == pytest.approx(0.0, abs=1e-9)  # moved by the diagonal
    side = torch.zeros(1, 1, 4, 4)
    side[0, 0, 0, 3] = 1.0
    assert emd_score(side, mask4((0, 0))).item() == pytest.approx(1 - 3 / (3 * math.sqrt(2)), abs=1e-6)
    assert emd_score(torch.zeros(1, 1, 4, 4), mask4((0, 0))).item() == 0.0
    # half the mass on GT, half one pixel away: EMD = 0.5
    half = torch.zeros(1, 1, 4, 4)
    half[0, 0, 0, 0] = half[0, 0, 1, 0] = 1.0
    assert emd_score(half, mask4((0, 0))).item() == pytest.approx(1 - 0.5 / (3 * math.sqrt(2)), abs=1e-6)


def test_emd_score_pooled_for_large_maps():
    gt = torch.zeros(1, 1, 128, 128, dtype=torch.bool)
    gt[0, 0, 40:60, 30:50] = True
    assert emd_score(gt.float(), gt).item() == pytest.approx(1.0)
    shifted = torch.zeros(1, 1, 128, 128)
    shifted[0, 0, 40:60, 50:70] = 1.0  # moved 20 px to the right
    assert emd_score(shifted, gt).item() == pytest.approx(1 - 20 / (127 * math.sqrt(2)), abs=1e-6)


def test_chunked_equals_one_call(monkeypatch):
    import nemt.metrics._common as common
    g = torch.Generator().manual_seed(6)
    maps = torch.randn(7, 2, 9, 10, generator=g)
    masks = torch.rand(7, 1, 9, 10, generator=g) > 0.6
    masks[5] = False
    whole = {f.__name__: f(maps, masks) for f in (relevance_mass, relevance_rank, pointing_game, top_k_intersection,
                                                 top_k_precision, importance_mass_accuracy, nss, cc)}
    whole["complexity"], whole["sparseness"] = complexity(maps), sparseness(maps)
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 200)  # one sample per slice
    torch.set_num_threads(2)
    try:
        for workers in (0, 2):  # serial in this thread (the default), then over worker threads
            with M.parallel_chunks(workers):
                for name, v in whole.items():
                    f = getattr(M, name)
                    got = f(maps) if name in ("complexity", "sparseness") else f(maps, masks)
                    assert torch.equal(torch.isnan(got), torch.isnan(v)), name
                    assert torch.allclose(got, v, equal_nan=True), name
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_chunked_metrics_leave_torch_threads_alone(monkeypatch):
    """By default chunked metrics run their slices serially in the calling thread, never touching torch's
    (process-wide) thread count; parallel_chunks opts in to worker threads, with identical results."""
    import threading

    import nemt.metrics._common as common
    g = torch.Generator().manual_seed(11)
    maps = torch.randn(9, 1, 512, 512, generator=g)  # large maps: 3 slices of CHUNK_ELEMENTS
    masks = torch.rand(9, 1, 512, 512, generator=g) > 0.7
    masks[3] = False
    assert max(1, common.CHUNK_ELEMENTS // maps[0].numel()) < maps.shape[0]
    seen = []  # (thread, torch threads) of every slice's call

    def spy(fn):
        def inner(*a, **kw):
            seen.append((threading.get_ident(), torch.get_num_threads()))
            return fn(*a, **kw)
        return inner

    def scores():
        out = {f.__name__: f(maps, masks) for f in (relevance_mass, relevance_rank, pointing_game, top_k_precision)}
        out["complexity"] = complexity(maps)
        return out

    wrapped = common.chunked(spy(relevance_mass.__wrapped__))  # the same metric, its slices watched
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n, _set=torch.set_num_threads: (calls.append(n), _set(n)))
    assert torch.get_num_threads() == 1
    serial = scores()  # serial, single-threaded operations: what each worker thread computes
    torch.set_num_threads(2)  # a multi-threaded caller: the old code set 1 process-wide while its workers ran
    calls.clear()
    try:
        serial2 = scores()
        wrapped(maps, masks)
        assert calls == [] and torch.get_num_threads() == 2
        assert seen == [(threading.get_ident(), 2)] * 3  # 3 slices, in this thread, torch's threads untouched
        with M.parallel_chunks(3):
            assert common.chunk_workers() == 3
            par = scores()
            seen.clear()
            wrapped(maps, masks)
        assert common.chunk_workers() == 0 and torch.get_num_threads() == 2
        assert len(seen) == 3 and threading.get_ident() not in {t for t, _ in seen}  # over worker threads
        assert {n for _, n in seen} == {1}  # each running single-threaded operations
    finally:
        torch.set_num_threads(1)
    for name, v in serial.items():
        assert torch.equal(torch.isnan(par[name]), torch.isnan(v)), name
        assert torch.equal(par[name].nan_to_num(), v.nan_to_num()), name  # bit-identical
        # with 2 intra-op threads a float sum may round differently in its last bits, as any torch reduction
        assert torch.allclose(serial2[name], v, rtol=1e-12, atol=0, equal_nan=True), name


def test_pointing_game_ties_expected_is_share_of_tied_maxima():
    """A plateau of 4 maxima with 1 in GT: Quantus' rule says hit (1), the tie-fair rule 1/4; a single maximum: equal."""
    maps = torch.zeros(2, 1, 6, 6)
    maps[0, 0, 0:2, 0:2] = 1.0                      # plateau of 4 tied maxima
    maps[1, 0, 4, 4] = 1.0                          # one maximum, inside GT
    maps[1, 0, 0, 0] = 0.5
    masks = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    masks[0, 0, 1, 1] = True                        # GT touches one plateau pixel
    masks[1, 0, 3:6, 3:6] = True
    assert pointing_game(maps, masks)[:, 0].tolist() == [1.0, 1.0]
    assert pointing_game(maps, masks, ties="expected")[:, 0].tolist() == [0.25, 1.0]
    assert M.pointing_game_expected(maps, masks)[:, 0].tolist() == [0.25, 1.0]
    masks[0] = False
    assert math.isnan(M.pointing_game_expected(maps, masks)[0, 0].item())   # empty GT: NaN as the pointing game
    with pytest.raises(NemtError, match="ties"):
        pointing_game(maps, masks, ties="first")


def test_a_nan_map_is_refused_not_scored():
    """A NaN map scored NaN, which every summary reads as "no lesion, excluded" (or, for the pointing game,
    a miss): each metric that reads maps now refuses it, naming how many maps and the first ones."""
    from nemt.errors import NemtError
    from nemt.metrics import complexity, pointing_game, relevance_mass, relevance_rank, sparseness

    maps = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    maps[1, 1, 2, 3] = float("nan")
    maps[2, 0, 0, 0] = float("inf")
    gt = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    gt[:, :, 2:5, 2:5] = True
    for f, args in ((relevance_mass, (gt,)), (relevance_rank, (gt,)), (pointing_game, (gt,)), (sparseness, ()),
                    (complexity, ())):
        with pytest.raises(NemtError, match=r"2 NaN or infinite values, in 2 of 6 maps \(first \[image, target\]: "
                                            r"\[\[1, 1\], \[2, 0\]\]\)"):
            f(maps, *args)
        ok = f(torch.nan_to_num(maps, nan=0.0, posinf=1.0), *args)
        assert torch.isfinite(ok).all()


def test_square_three_axis_maps_warn_that_they_are_read_as_signals():
    """(B, H, W) maps (a 2D map without the target axis) are legal 1D input (B, T, L) and were scored per row
    without a word; a square one now warns and says how to pass 2D maps. 1D maps of other shapes stay quiet."""
    import warnings as w

    from nemt.metrics import relevance_mass

    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[:, 4:8, 4:8] = True
    with pytest.warns(UserWarning, match=r"read as \(B, T, L\): 16 maps of 1D signals.*\(B, 1, H, W\)"):
        assert relevance_mass(maps, gt).shape == (2, 16)
    assert relevance_mass(maps[:, None], gt[:, None]).shape == (2, 1)
    with w.catch_warnings():
        w.simplefilter("error")
        relevance_mass(torch.rand(2, 1, 100), torch.ones(2, 1, 100, dtype=torch.bool))  # a signal: no warning
