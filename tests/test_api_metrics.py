"""nemt.metrics: findings of an audit of the evaluation metrics, one test (or more) per finding.

Each test failed before its fix. Floats are compared with tolerances where they go through sums whose last
bits depend on the reduction order.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import nemt.metrics as M
from nemt.metrics import UndefinedMetricWarning
from nemt.ops import ParameterError
from test_metric_inputs import PixelModel  # two outputs, no module with reset_parameters
from test_metrics import QUANTUS_LOCALISATION

torch.set_num_threads(1)




def _case(seed: int = 0, size: int = 8, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    model = PixelModel(torch.rand(size, size, generator=g) + 0.1)
    x = torch.rand(b, 1, size, size, generator=g) + 1.0
    maps = torch.rand(b, 1, size, size, generator=g)
    return model, x, maps


def _net(out: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # the layers' initial weights (the test's own seeding)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, out)).eval()


def _grad_explain(m, xx, t):
    xx = xx.clone().requires_grad_(True)
    out = m(xx)
    maps = [torch.autograd.grad(out.gather(1, t[:, j:j + 1]).sum(), xx, retain_graph=True)[0][:, 0]
            for j in range(t.shape[1])]
    return torch.stack(maps, 1)


def _undefined(rec) -> list[str]:
    return [str(w.message) for w in rec if issubclass(w.category, UndefinedMetricWarning)]


# ---------------------------------------------------------------- 1. NumPy masks in sliced batches

def test_numpy_masks_and_fixations_are_sliced_with_the_maps(monkeypatch):
    """A batch large enough to be cut into slices failed with NumPy masks ("matching maps (16, ...)"): only
    torch tensors were sliced. Now arrays become tensors first; the values equal the torch inputs'."""
    import nemt.metrics._common as common

    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 4 * 256)  # 4 maps of 16x16 per slice: 10 slices
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(40, 1, 16, 16, generator=g)
    gt = torch.zeros(40, 1, 16, 16, dtype=torch.bool)
    gt[:, :, 4:10, 5:12] = True
    fix = (torch.rand(40, 1, 16, 16, generator=g) > 0.9).float()
    assert common.CHUNK_ELEMENTS // maps[0].numel() < maps.shape[0]
    for fn, other in ((M.relevance_mass, gt), (M.pointing_game, gt), (M.nss, fix)):
        want = fn(maps, other)
        got = fn(maps, other.numpy())
        assert got.shape == (40, 1) and torch.allclose(got, want, atol=1e-6), fn.__name__
        assert torch.allclose(fn(maps.numpy(), other.numpy()), want, atol=1e-6), fn.__name__
    # NumPy views with negative strides (np.flip) too
    flipped = np.flip(gt.numpy(), axis=-1)
    assert torch.allclose(M.relevance_mass(maps, flipped), M.relevance_mass(maps, gt.flip(-1)), atol=1e-6)


# ---------------------------------------------------------------- 2. ROAD's output and percentages

def test_road_refuses_unknown_output_and_percentages_outside_0_100():
    model, x, maps = _case(1)
    for output in ("logit", "acc", "prob"):
        with pytest.raises(ParameterError, match=rf"^road: output must be 'accuracy' or 'probability', got "
                                                 rf"'{output}'$"):
            M.road(model, x, maps, 0, percentages=(25,), noise=0.0, output=output)
    with pytest.raises(ParameterError, match=r"^road: percentages must be a non-empty sequence"):
        M.road(model, x, maps, 0, percentages=(), noise=0.0)
    for bad in ((-5,), (10, 101), (100,), (float("nan"),), ("10",)):
        with pytest.raises(ParameterError, match=r"^road: percentages must be numbers in \[0, 100\)"):
            M.road(model, x, maps, 0, percentages=bad, noise=0.0)
    ok = M.road(model, x, maps, 0, percentages=np.array([0, 50.0, 99.9]), noise=0.0, output="probability")
    assert ok.shape == (2, 1) and torch.isfinite(ok).all()


# ---------------------------------------------------------------- 3. randomisation similarities

def test_randomisation_similarities_refuse_maps_of_other_shapes_or_nonfinite():
    """Two map sets of different shapes broadcast (one map compared with every other); NaN maps scored NaN."""
    g = torch.Generator().manual_seed(2)
    m = torch.rand(2, 1, 8, 8, generator=g)
    with pytest.raises(ParameterError, match=r"^a \(2, 1, 8, 8\) and b \(1, 1, 8, 8\) must have the same shape"):
        M.similarity_of(m, m[:1])
    with pytest.raises(ParameterError, match=r"^a \(2, 1, 8, 8\) and b \(1, 1, 8, 8\) must have the same shape"):
        M.ssim(m, m[:1])
    bad = m.clone()
    bad[1, 0, 2, 2] = float("nan")
    for f in (M.similarity_of, M.ssim):
        with pytest.raises(ParameterError, match=r"^b hold 1 NaN or infinite values"):
            f(m, bad)
    net = _net()
    x = torch.rand(2, 1, 8, 8, generator=g)
    with pytest.raises(ParameterError, match=r"^maps \(1, 1, 8, 8\) and explain\(model with 3 randomised, x, "
                                             r"target\) \(2, 1, 8, 8\) must have the same shape"):
        M.model_parameter_randomisation(net, x, _grad_explain, 0, maps=m[:1])
    with pytest.raises(ParameterError, match=r"^maps \(1, 1, 8, 8\) and explain\(model, x, other class\) "
                                             r"\(2, 1, 8, 8\) must have the same shape"):
        M.random_logit(net, x, _grad_explain, 0, maps=m[:1])
    for f in (M.model_parameter_randomisation, M.random_logit):
        with pytest.raises(ParameterError, match=r"^maps hold 1 NaN or infinite values"):
            f(net, x, _grad_explain, 0, maps=bad)


# ---------------------------------------------------------------- 4. constant maps localise nothing

def test_constant_maps_score_nan_with_one_warning_per_call(monkeypatch):
    """An all-zero map scored a perfect pointing game and a raster-order rank; now NaN, said once per call
    (even when the batch is cut into slices)."""
    import nemt.metrics._common as common

    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 16)  # one map per slice
    maps = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    maps[1] = 0.0
    maps[2] = 0.3
    top = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    top[..., 0, :] = True
    top[3] = False  # no ground truth: NaN, excluded, not counted as undefined
    for fn, kw in ((M.pointing_game, {}), (M.pointing_game_expected, {}), (M.relevance_rank, {}),
                   (M.top_k_intersection, {"k": 4}), (M.relevance_mass, {}), (M.energy_pointing_game, {})):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            v = fn(maps, top, **kw)
        assert not math.isnan(v[0, 0].item()) and torch.isnan(v[1:]).all(), fn.__name__
        said = _undefined(rec)
        assert len(said) == 1, (fn.__name__, said)
        assert said[0].startswith(f"{fn.__name__}: 2 of 4 maps score NaN (undefined: 2 constant (collapsed) maps, "
                                  "all pixels equal)")
        assert rec[0].filename == __file__  # the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for maps that all score
        M.pointing_game(maps[:1], top[:1])
    # abs=True makes a +-1 map constant: it is judged on what is ranked
    pm = torch.ones(1, 1, 4, 4)
    pm[..., ::2, :] = -1.0
    with pytest.warns(UndefinedMetricWarning, match="1 of 1 maps"):
        assert math.isnan(M.pointing_game(pm, top[:1], abs=True).item())


# ---------------------------------------------------------------- 5. SIM as the MIT benchmark's similarity.m

def _mit_similarity(s: np.ndarray, g: np.ndarray) -> float:
    """A direct transcription of the MIT saliency benchmark's similarity.m (maps of the same size)."""
    map1, map2 = s.astype(np.float64), g.astype(np.float64)
    if map1.any():
        map1 = (map1 - map1.min()) / (map1.max() - map1.min())
        map1 = map1 / map1.sum()
    if map2.any():
        map2 = (map2 - map2.min()) / (map2.max() - map2.min())
        map2 = map2 / map2.sum()
    return float(np.minimum(map1, map2).sum())


def test_similarity_min_maxes_the_gaze_map_too_as_mit():
    g = torch.Generator().manual_seed(7)
    s = torch.rand(3, 1, 9, 9, generator=g)
    gaze = torch.rand(3, 1, 9, 9, generator=g) + 0.5  # a density with a floor: min-max moves it
    for normalise in ("minmax", None):
        got = M.similarity(s, gaze, normalise=normalise)
        want = [_mit_similarity(s[i, 0].numpy(), gaze[i, 0].numpy()) for i in range(3)]
        np.testing.assert_allclose(got[:, 0].numpy(), want, atol=1e-6)


# ---------------------------------------------------------------- 6. EMD of maps that require grad

def test_emd_score_takes_maps_that_require_grad():
    gt = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    gt[..., 0, 0] = True
    a = torch.zeros(1, 1, 4, 4)
    a[..., 0, 3] = 1.0
    got = M.emd_score(a.clone().requires_grad_(True), gt)
    assert got.item() == pytest.approx(M.emd_score(a, gt).item()) == pytest.approx(1 - 3 / (3 * math.sqrt(2)))


# ---------------------------------------------------------------- 7. random draws independent of the batch

def test_random_logit_and_road_give_a_sample_the_same_value_in_any_batch_position():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    whole = M.random_logit(net, x, _grad_explain, y, similarity="spearman")
    alone = torch.cat([M.random_logit(net, x[i:i + 1], _grad_explain, y[i:i + 1], similarity="spearman")
                       for i in range(3)])
    rev = M.random_logit(net, x.flip(0), _grad_explain, y.flip(0), similarity="spearman").flip(0)
    assert torch.allclose(whole, alone, atol=1e-6) and torch.allclose(whole, rev, atol=1e-6)

    g = torch.Generator().manual_seed(2)
    xr, ar = torch.randn(3, 1, 6, 6, generator=g), torch.rand(3, 1, 6, 6, generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).eval()
    kw = dict(percentages=(30, 60), noise=0.3, output="probability")
    whole = M.road(model, xr, ar, 0, **kw)
    alone = torch.cat([M.road(model, xr[i:i + 1], ar[i:i + 1], 0, **kw) for i in range(3)])
    rev = M.road(model, xr.flip(0), ar.flip(0), 0, **kw).flip(0)
    assert torch.allclose(whole, alone, atol=1e-6) and torch.allclose(whole, rev, atol=1e-6)


# ---------------------------------------------------------------- 8. abs before normalising

def test_abs_is_taken_before_the_min_max():
    """abs=True did nothing under the default min-max (min-max first made every value >= 0)."""
    s = torch.zeros(1, 1, 4, 4)
    s[..., 0, 0] = -5.0
    s[..., 3, 3] = 1.0
    gt = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    gt[..., 0, 0] = True
    assert M.pointing_game(s, gt, abs=True).item() == 1.0 == M.pointing_game(s.abs(), gt).item()
    assert M.pointing_game(s, gt).item() == 0.0
    assert M.relevance_mass(s, gt, abs=True).item() == pytest.approx(M.relevance_mass(s.abs(), gt).item())
    assert M.relevance_rank(s, gt, abs=True).item() == 1.0
    assert M.complexity(s).item() == pytest.approx(M.complexity(s.abs()).item())  # abs=True is its default
    model = PixelModel(torch.rand(4, 4) + 0.1)
    x = torch.rand(1, 1, 4, 4) + 1.0
    assert torch.allclose(M.faithfulness_estimate(model, x, s, 0, features_in_step=2, abs=True),
                          M.faithfulness_estimate(model, x, s.abs(), 0, features_in_step=2), atol=1e-6)
    assert "abs=True" in M.model_parameter_randomisation.__doc__ and "before" in \
        M.model_parameter_randomisation.__doc__


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name, cls, kw", QUANTUS_LOCALISATION)
def test_abs_true_on_signed_maps_equals_quantus(name, cls, kw):
    """Quantus takes |a| after its default normaliser (division by max |a|): the same numbers as |a| first.
    The rank-based metrics also equal it under our default min-max (a monotone rescaling of |a|)."""
    quantus = pytest.importorskip("quantus")
    g = torch.Generator().manual_seed(0)
    b, s = 8, 28
    maps = torch.randn(b, 1, s, s, generator=g)
    x = torch.randn(b, 1, s, s, generator=g)
    masks = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for i in range(b):
        y0, x0 = torch.randint(0, s - 12, (2,), generator=g).tolist()
        masks[i, 0, y0:y0 + 10, x0:x0 + 8] = True
    args = dict(model=None, x_batch=x.numpy(), y_batch=np.zeros(b, dtype=int), a_batch=maps.numpy().copy(),
                s_batch=masks.numpy().astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = np.asarray(getattr(quantus, cls)(abs=True, disable_warnings=True, **kw)(**args), float)
    ours = getattr(M, name)
    np.testing.assert_allclose(ours(maps, masks, normalise="max", abs=True, **kw)[:, 0].numpy(), q, atol=1e-5)
    if name != "relevance_mass":
        np.testing.assert_allclose(ours(maps, masks, abs=True, **kw)[:, 0].numpy(), q, atol=1e-5)


# ---------------------------------------------------------------- 9. negative gaze, label masks, signed maps

def test_negative_gaze_label_masks_and_signed_complexity_are_refused():
    g = torch.Generator().manual_seed(9)
    maps = torch.rand(2, 1, 8, 8, generator=g)
    gaze = torch.rand(2, 1, 8, 8, generator=g)
    gaze[1, 0, 0, 0] = -0.2
    for f in (M.kl_divergence, M.cc, M.similarity):
        with pytest.raises(ParameterError, match=r"^gaze hold 1 negative values, in 1 of 2 maps: gaze must be >= 0"):
            f(maps, gaze)
    with pytest.raises(ParameterError, match=r"^fixations hold 1 negative values"):
        M.nss(maps, gaze)
    lab = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    lab[:, :, 0, 0] = 2
    lab[:, :, 3, 3] = -1
    for f in (M.relevance_mass, M.pointing_game, M.top_k_precision, M.max_box_acc_v2):
        with pytest.raises(ParameterError, match=r"^masks hold values other than 0 and 1 \(e\.g\. \[-1, 2\]\): give "
                                                 r"a binary mask .* masks == label$"):
            f(maps, lab)
    ok = (lab == 2)
    assert torch.equal(M.relevance_mass(maps, ok.long()), M.relevance_mass(maps, ok))  # 0/1 integers
    assert torch.equal(M.relevance_mass(maps, ok.to(torch.uint8) * 255), M.relevance_mass(maps, ok))  # 0/255 PNG
    assert torch.equal(M.relevance_mass(maps, ok.numpy()), M.relevance_mass(maps, ok))
    # entropy and the Gini index are defined on magnitudes: signed values left after normalise are refused
    signed = torch.randn(2, 1, 4, 4, generator=g)
    for f in (M.complexity, M.sparseness):
        for normalise in ("max", "sum", None):
            with pytest.raises(ParameterError, match=rf"^{f.__name__}: maps hold negative values after "
                                                     rf"normalise=.* with abs=False; .* use abs=True or "
                                                     r"normalise='minmax'$"):
                f(signed, normalise=normalise, abs=False)
        assert torch.isfinite(f(signed, normalise="max")).all()  # abs=True (default)
        v = f(signed, abs=False)  # min-max: non-negative
        assert torch.isfinite(v).all()


# ---------------------------------------------------------------- 10. numeric parameters

def test_numeric_parameters_are_validated_with_one_line_errors():
    model, x, maps = _case(10, size=4)
    gt = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    gt[..., 0, :] = True
    for tol in (1.5, -3, "1"):
        with pytest.raises(ParameterError, match=rf"^pointing_game: tolerance must be a whole number >= 0, got "):
            M.pointing_game(maps, gt, tolerance=tol)
    assert torch.equal(M.pointing_game(maps, gt, tolerance=1.0), M.pointing_game(maps, gt, tolerance=1))
    for fn in (M.deletion_auc, M.insertion_auc):
        for steps in (0, 2.5, -1):
            with pytest.raises(ParameterError, match=rf"^{fn.__name__}: steps must be a whole number >= 1, got "):
                fn(model, x, maps, 0, steps=steps)
    for fis in (0, -1, 1.5, 16, 17):
        with pytest.raises(ParameterError, match=r"^faithfulness_estimate: features_in_step must be None or a "
                                                 r"whole number from 1 to 15 \(fewer than the 16 pixels per map\), "
                                                 r"got "):
            M.faithfulness_estimate(model, x, maps, 0, features_in_step=fis)
    for fn, kw in ((M.faithfulness_estimate, {"features_in_step": 4}), (M.deletion_auc, {"steps": 4}),
                   (M.insertion_auc, {"steps": 4}), (M.road, {"percentages": (10,), "noise": 0.0})):
        for bs in (0, -2, 1.5):
            with pytest.raises(ParameterError, match=rf"^{fn.__name__}: batch_size must be a whole number >= 1"):
                fn(model, x, maps, 0, batch_size=bs, **kw)
        if fn is not M.road:
            with pytest.raises(ParameterError, match=r"^baseline of shape \(3, 1, 4, 4\) does not broadcast to x of "
                                                     r"shape \(2, 1, 4, 4\)"):
                fn(model, x, maps, 0, baseline=torch.zeros(3, 1, 4, 4), **kw)
            assert fn(model, x, maps, 0, baseline=torch.zeros(1, 1, 4, 4), **kw).shape == (2, 1)
    net = _net(out=4)
    x8 = torch.rand(2, 1, 8, 8)
    with pytest.raises(ParameterError, match=r"^random_logit: num_classes must be at most the model's 4 outputs, "
                                             r"got 5$"):
        M.random_logit(net, x8, _grad_explain, 0, num_classes=5)
    with pytest.raises(ParameterError, match=r"^random_logit: num_classes must be a whole number >= 2, got 1$"):
        M.random_logit(net, x8, _grad_explain, 0, num_classes=1)
    assert M.random_logit(net, x8, _grad_explain, 0, num_classes=3).shape == (2, 1)


# ---------------------------------------------------------------- 11. gaze scores of a constant map

def test_gaze_metrics_read_a_constant_map_as_uniform_or_undefined():
    """A constant map was scored from the eps: KL about 32, SIM 0. Now the uniform distribution for KL and SIM;
    NSS and CC divide by its spread: NaN, said once per call."""
    g = torch.Generator().manual_seed(11)
    gaze = torch.rand(3, 1, 9, 9, generator=g)
    fix = (torch.rand(3, 1, 9, 9, generator=g) > 0.8).float()
    maps = torch.rand(3, 1, 9, 9, generator=g)
    maps[1] = 0.4
    maps[2] = 0.0
    uniform = torch.ones(3, 1, 9, 9)
    G = gaze.flatten(2).double()
    G = G / G.sum(-1, keepdim=True)
    eps = np.finfo(np.float64).eps
    kl_uniform = (G * torch.log(eps + G / (1 / 81 + eps))).sum(-1)
    kl = M.kl_divergence(maps, gaze)
    assert torch.allclose(kl[1:].double(), kl_uniform[1:], atol=1e-5) and kl[1:].max() < 1
    sim = M.similarity(maps, gaze)
    gm = [(gaze[i, 0].double().numpy() - gaze[i, 0].min().item()) / (gaze[i, 0].max() - gaze[i, 0].min()).item()
          for i in (1, 2)]  # similarity.m's min-max of the gaze map, then min with the uniform 1/81
    want = [np.minimum(1 / 81, v / v.sum()).sum() for v in gm]
    np.testing.assert_allclose(sim[1:, 0].numpy(), want, atol=1e-6)
    assert torch.allclose(sim[1:], M.similarity(uniform[1:], gaze[1:]))
    for f, other in ((M.nss, fix), (M.cc, gaze)):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            v = f(maps, other)
        assert torch.isfinite(v[0]).all() and torch.isnan(v[1:]).all()
        said = _undefined(rec)
        assert len(said) == 1 and said[0].startswith(f"{f.__name__}: 2 of 3 maps score NaN (undefined: 2 constant")


# ---------------------------------------------------------------- 12. nothing to randomise

def test_parameter_randomisation_refuses_a_model_with_nothing_to_randomise():
    model, x, _ = _case(12)
    with pytest.raises(ParameterError, match=r"^model_parameter_randomisation: the model \(PixelModel\) has no "
                                             r"module with reset_parameters, so there is nothing to randomise$"):
        M.model_parameter_randomisation(model, x, lambda m, xx, t: xx * m.w, 0)


# ---------------------------------------------------------------- 13. MaxBoxAccV2's shared map checks

def test_max_box_acc_warns_about_square_three_axis_maps_as_other_metrics():
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(13))
    gt = torch.ones(2, 16, 16, dtype=torch.bool)
    with pytest.warns(UserWarning, match=r"read as \(B, T, L\): 16 maps of 1D signals") as rec:
        assert M.max_box_acc_v2(maps, gt).shape == (2, 16)
    assert rec[0].filename == __file__
    with pytest.raises(ParameterError, match=r"^maps must be \(B, T, L\), \(B, T, H, W\) or \(B, T, D, H, W\)"):
        M.max_box_acc_v2(torch.rand(1, 1, 2, 2, 2, 2), torch.ones(1, 1, 2, 2, 2, 2, dtype=torch.bool))


# ---------------------------------------------------------------- 14. fixations_to_heatmap's input

def test_fixations_to_heatmap_refuses_nan_coordinates_negative_weights_and_sigma():
    with pytest.raises(ParameterError, match=r"^fixations hold 1 fixations with NaN or infinite coordinates or "
                                             r"weights \(first row 1\)"):
        M.fixations_to_heatmap([[1.0, 2.0], [float("nan"), 1.0]], (4, 4), sigma=1.0)
    with pytest.raises(ParameterError, match=r"^fixations hold 1 negative weights \(durations\), first row 0"):
        M.fixations_to_heatmap([[1.0, 2.0, -0.5], [2.0, 1.0, 1.0]], (4, 4), sigma=1.0)
    for sigma in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ParameterError, match=r"^fixations_to_heatmap: sigma must be a finite number >= 0"):
            M.fixations_to_heatmap([[1.0, 2.0]], (4, 4), sigma=sigma)
    h = M.fixations_to_heatmap([[1.5, 2.5]], (4, 4), sigma=0)  # 0: no blur, as documented
    assert h[2, 1].item() == 1.0 and h.sum().item() == 1.0
