"""Faithfulness: does removing what the map calls important change the model's output?

All functions take ``model, x, maps, target`` with ``x`` ``(B, C, *spatial)``,
``maps`` ``(B, T, *spatial)`` and ``target`` anything
:func:`nemt.explainers.base.resolve_targets` accepts (``None``: the predicted
class for a multi-class model, every output otherwise); it must give T
targets per sample, map t explaining target t. They return ``(B, T)``.
Model calls are batched: ``batch_size`` perturbed images per forward pass,
under ``torch.no_grad()``; the model should be in eval mode.

Perturbations act on pixels (voxels): all channels of a pixel are replaced
together. Quantus 0.6.0 instead broadcasts a one-channel map over the C
channels and perturbs single (pixel, channel) entries; for one-channel
inputs the two agree.

Baselines / substrates (``baseline=``): ``"min"`` the image's minimum (over
all its channels and pixels; Quantus' ``"black"``), ``"mean"`` its mean,
``"zero"``, ``"blur"`` a Gaussian-blurred copy, a number, or a tensor
broadcastable to ``x`` (another shape is refused, naming it).

The ``"blur"`` substrate is :func:`nemt.ops.gaussian_blur` with sigma 5 px:
the Gaussian ``exp(-t²/50)`` sampled at t = -5 … 5 (11 taps, truncated at
radius 5) and normalised to sum 1, applied separably with reflect padding
(replicate on an axis of at most 5 pixels). Petsiuk's RISE code instead
uses ``gkern(11, 5)``, SciPy's ``gaussian_filter`` (sigma 5) of an 11x11
delta, i.e. a sigma-5 Gaussian folded back into the 11-pixel window (flatter:
centre 0.0088 and corner 0.0077 of a kernel summing to 1, ours 0.0120 and
0.0044), applied with zero padding, which darkens the substrate within 5
pixels of the border (on a random 16x16 image in [0, 1] the two substrates
differ by at most 0.007 inside the image and by up to 0.37 at its border).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve

from nemt.errors import NemtError
from nemt.metrics._common import (ParameterError, check_maps, check_x, check_x_fits, checked_targets,
                                  constant_rows, descending_order, float_maps, metric, pearson, warn_undefined)
from nemt.metrics._common import normalise as _normalise
from nemt.ops import (checked_outputs, count_param, fill_values, is_count, is_finite_number, output_score, task_of,
                      with_model_in_eval)


# ---------------------------------------------------------------- shared plumbing

def _pairs(model, x: torch.Tensor, maps: torch.Tensor, target: Any):
    """Check x (:func:`~nemt.metrics._common.check_x`: a float tensor, finite, not empty, cast to the model's
    dtype), the maps and the targets (in range of the model's outputs), then flatten (sample, target) pairs:
    x, image index (N,), target index (N,), maps (N, *spatial), targets (B, T), spatial rank."""
    x = check_x(model, x)
    maps = float_maps(maps)
    d = check_maps(maps)
    check_x_fits(x, maps)
    t = checked_targets(target, model, x)
    if t.shape[1] != maps.shape[1]:
        if maps.shape[1] == 1:
            raise NemtError(f"{t.shape[1]} targets per sample but one map per sample; pass one target")
        raise NemtError(f"{t.shape[1]} targets per sample but {maps.shape[1]} maps per sample")
    b, tt = maps.shape[:2]
    img = torch.arange(b, device=x.device).repeat_interleave(tt)
    return x, img, t.reshape(-1).to(x.device), maps.reshape(b * tt, *maps.shape[2:]).to(x.device), t, d


def _baseline(x: torch.Tensor, baseline: Any) -> torch.Tensor:
    """A tensor broadcastable to x (B, C, *spatial) holding the replacement values."""
    ones = [1] * (x.ndim - 1)
    if torch.is_tensor(baseline):
        try:
            fits = torch.broadcast_shapes(baseline.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ParameterError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to x of shape "
                                 f"{tuple(x.shape)}: give a tensor broadcastable to x, a number or a name")
        return baseline.to(x.device, x.dtype).expand_as(x)
    if baseline == "mean":  # Quantus: each image's mean over all its channels
        return x.flatten(1).mean(1).view(-1, *ones)
    if isinstance(baseline, str) and baseline not in ("min", "black", "max", "white", "zero", "blur"):
        raise NemtError(f"unknown baseline {baseline!r}: use 'min', 'mean', 'zero', 'blur', a number or a tensor")
    value = fill_values(x, baseline, sigma=5.0, radius=5)  # the shared fills; blur: sigma 5, radius 5 pixels
    if not torch.is_tensor(value):
        return torch.full((x.shape[0], *ones), value, device=x.device, dtype=x.dtype)
    return value[:, :1] if value.shape[2:] == (1,) * (x.ndim - 2) else value


def _select(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return out.gather(1, t.view(-1, 1)).squeeze(1)


def _transform(model, out: torch.Tensor, output: str) -> torch.Tensor:
    if output not in ("probability", "prob", "logit"):
        raise NemtError(f"output must be 'probability' (or 'prob') or 'logit', got {output!r}")
    return output_score(out, task_of(model), output)


@torch.no_grad()
def _forward(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([checked_outputs(model(x[i:i + batch_size]), len(x[i:i + batch_size]))
                      for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def _scores_for_pairs(model, x, base, img, t, pair_i, pair_s, replace_fn, batch_size, output):
    """Model score of target ``t[i]`` on ``x[img[i]]`` with the pixels ``replace_fn(i, s)`` set to the baseline.

    ``pair_i``/``pair_s`` list the (pair, step) combinations; ``replace_fn``
    returns a bool (n_chunk, n) mask, or a long (n_chunk, k) tensor of flat
    pixel indices (cheaper when few pixels change). Returns (len(pair_i),).
    """
    spatial = x.shape[2:]
    c_ = x.shape[1]
    res = []
    for c in range(0, pair_i.numel(), batch_size):
        pi, ps = pair_i[c:c + batch_size], pair_s[c:c + batch_size]
        xi = x[img[pi]]
        bi = base[img[pi]] if base.shape[0] == x.shape[0] else base.expand(len(pi), *base.shape[1:])
        rep = replace_fn(pi, ps)
        if rep.dtype == torch.bool:
            xp = torch.where(rep.view(len(pi), 1, *spatial), bi, xi)
        else:  # indices: write the baseline's values there
            idx = rep.unsqueeze(1).expand(-1, c_, -1)
            if bi[0].numel() == 1:  # one value per image
                vals = bi.reshape(len(pi), 1, 1).expand(-1, c_, idx.shape[-1])
            else:
                vals = bi.expand(len(pi), c_, *spatial).reshape(len(pi), c_, -1).gather(2, idx)
            xp = xi.reshape(len(pi), c_, -1).scatter_(2, idx, vals).view(len(pi), c_, *spatial)
        out = _transform(model, checked_outputs(model(xp), len(xp)), output)
        res.append(_select(out, t[pi]))
    return torch.cat(res) if res else torch.zeros(0, device=x.device)


# ---------------------------------------------------------------- faithfulness estimate

@metric("higher", inputs=("model", "x", "maps", "target"))
@with_model_in_eval
def faithfulness_estimate(model, x: torch.Tensor, maps: torch.Tensor, target: Any = None, *,
                          features_in_step: int | None = None, baseline: Any = "min",
                          normalise: str | None = "minmax", abs: bool = False,
                          batch_size: int = 64) -> torch.Tensor:
    """Faithfulness estimate (Alvarez-Melis & Jaakkola 2018; Quantus ``FaithfulnessEstimate``), (B, T).

    Pixels are sorted by attribution (descending) and cut into consecutive
    groups of ``features_in_step`` pixels. For each group g alone (not
    cumulative), the group is replaced by the baseline in the original image
    and the drop of the target's raw output (logit) is recorded,
    ``Δ_g = f_t(x) - f_t(x with g replaced)``; the score is the Pearson
    correlation between the groups' attribution sums ``Σ_{i∈g} a_i`` and ``Δ_g``.
    Higher is better (in [-1, 1]); NaN if either is constant.

    Defaults follow METHODS.md: baseline = image minimum (Quantus ``"black"``),
    maps min-max normalised, ``abs=False`` (``abs=True`` takes |a| before
    normalising). ``features_in_step=None`` gives groups of ``ceil(n / 56)``
    pixels, so ``ceil(n / ceil(n / 56))`` groups: 56 when 56 divides n (896
    pixels at 224 px), fewer otherwise (50 groups of 2 at 10x10 px), and one
    group per pixel for n <= 56. Otherwise a whole number from 1 to n - 1 (one
    group has no correlation). Quantus requires the group size to divide n;
    here the last group may be smaller. Model calls:
    ``B·T·ceil(n / features_in_step)`` images plus B, in batches of ``batch_size``.
    """
    batch_size = count_param(batch_size, "faithfulness_estimate: batch_size")
    x, img, t, a, _, d = _pairs(model, x, maps, target)
    n = a[0].numel()
    if features_in_step is not None and not (is_count(features_in_step) and features_in_step < n):
        raise ParameterError(f"faithfulness_estimate: features_in_step must be None or a whole number from 1 to "
                             f"{n - 1} (fewer than the {n} pixels per map), got {features_in_step!r}")
    a = _normalise((a.abs() if abs else a).unsqueeze(1), normalise, d).squeeze(1).flatten(1)
    f = int(features_in_step) if features_in_step is not None else math.ceil(n / 56)
    steps = math.ceil(n / f)
    order = descending_order(a)
    pad = steps * f - n  # the last group may be smaller
    srt = a.gather(1, order).double()
    att = torch.cat([srt, srt.new_zeros(srt.shape[0], pad)], 1).view(-1, steps, f).sum(-1)  # (N, steps)
    groups = torch.cat([order, order[:, -1:].expand(-1, pad)], 1).view(-1, steps, f)  # pad: repeat a pixel
    base = _baseline(x, baseline)
    y0 = _select(_forward(model, x, batch_size)[img], t)
    pair_i = torch.arange(a.shape[0], device=a.device).repeat_interleave(steps)
    pair_s = torch.arange(steps, device=a.device).repeat(a.shape[0])
    y = _scores_for_pairs(model, x, base, img, t, pair_i, pair_s,
                          lambda pi, ps: groups[pi, ps], batch_size, "logit")
    delta = y0.double()[:, None] - y.double().view(-1, steps)
    out = pearson(att, delta)
    nan = torch.isnan(out)
    if nan.any():  # a correlation with a constant side is undefined: NaN, said once per call
        flat = nan & constant_rows(att)
        still = nan & ~flat & constant_rows(delta)
        warn_undefined("faithfulness_estimate", int(nan.sum()), nan.numel(), [
            f"{int(flat.sum())} constant (collapsed) maps, equal attribution in every group" if flat.any() else "",
            f"{int(still.sum())} maps whose groups leave the model's output unchanged" if still.any() else ""],
            stacklevel=4)
    return out.to(a.dtype).view(maps.shape[:2])


# ---------------------------------------------------------------- deletion / insertion

def _curve(model, x, maps, target, steps, baseline, insertion, batch_size, output):
    name = "insertion_auc" if insertion else "deletion_auc"
    steps = count_param(steps, f"{name}: steps")
    batch_size = count_param(batch_size, f"{name}: batch_size")
    x, img, t, a, _, d = _pairs(model, x, maps, target)
    a = a.flatten(1)
    n = a.shape[1]
    rank = torch.empty_like(a, dtype=torch.long).scatter_(
        1, descending_order(a), torch.arange(n, device=a.device).expand(a.shape[0], n).contiguous())
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * n / steps).long().to(a.device)
    base = _baseline(x, baseline)
    pair_i = torch.arange(a.shape[0], device=a.device).repeat_interleave(steps + 1)
    pair_s = torch.arange(steps + 1, device=a.device).repeat(a.shape[0])
    if insertion:  # pixels not yet inserted come from the substrate
        fn = lambda pi, ps: rank[pi] >= counts[ps][:, None]  # noqa: E731
    else:  # deleted pixels come from the substrate
        fn = lambda pi, ps: rank[pi] < counts[ps][:, None]  # noqa: E731
    y = _scores_for_pairs(model, x, base, img, t, pair_i, pair_s, fn, batch_size, output)
    return y.double().view(-1, steps + 1), maps.shape[:2]


def _auc(curve: torch.Tensor) -> torch.Tensor:
    s = curve.shape[1] - 1
    return (curve.sum(1) - (curve[:, 0] + curve[:, -1]) / 2) / s


@metric("lower", inputs=("model", "x", "maps", "target"))
@with_model_in_eval
def deletion_auc(model, x: torch.Tensor, maps: torch.Tensor, target: Any = None, *, steps: int = 50,
                 baseline: Any = "min", output: str = "probability", batch_size: int = 64,
                 return_curve: bool = False):
    """Deletion AUC (Petsiuk et al. 2018, RISE), (B, T).

    Pixels are removed (set to the baseline, default the image minimum, i.e.
    black) in order of decreasing attribution, ``round(s n / steps)`` after step
    s = 0 … steps; the target's probability (softmax for multi-class, sigmoid
    for multi-label, ``output="logit"`` for raw outputs) is recorded at every
    step and the area under this curve over the removed fraction [0, 1] is
    taken with the trapezoid rule. Lower is better (a faithful map makes the
    score collapse early). Ties are broken by position. ``return_curve`` also
    returns the (B, T, steps + 1) curve. Model calls: ``B·T·(steps + 1)`` images.
    """
    curve, shape = _curve(model, x, maps, target, steps, baseline, False, batch_size, output)
    auc = _auc(curve).float().view(shape)
    return (auc, curve.float().view(*shape, -1)) if return_curve else auc


@metric("higher", inputs=("model", "x", "maps", "target"))
@with_model_in_eval
def insertion_auc(model, x: torch.Tensor, maps: torch.Tensor, target: Any = None, *, steps: int = 50,
                  baseline: Any = "blur", output: str = "probability", batch_size: int = 64,
                  return_curve: bool = False):
    """Insertion AUC (Petsiuk et al. 2018, RISE), (B, T).

    Starting from a substrate (default a Gaussian-blurred copy of the image,
    sigma 5 px, an 11-tap kernel with reflect padding: not Petsiuk's
    ``gkern(11, 5)`` with zero padding, see the module docstring), the image's pixels are
    put back in order of decreasing attribution, ``round(s n / steps)`` after
    step s = 0 … steps; the area under the target's probability curve over
    the inserted fraction [0, 1] (trapezoid rule). Higher is better.
    ``return_curve`` also returns the (B, T, steps + 1) curve.
    """
    curve, shape = _curve(model, x, maps, target, steps, baseline, True, batch_size, output)
    auc = _auc(curve).float().view(shape)
    return (auc, curve.float().view(*shape, -1)) if return_curve else auc


# ---------------------------------------------------------------- ROAD

def _offsets(d: int) -> list[tuple[tuple[int, ...], float]]:
    """Neighbour offsets and weights: 2D as Rong et al. (faces 1/6, diagonals 1/12); in general
    weight ∝ 2^-(number of non-zero offset components - 1), normalised to sum 1."""
    offs = [o for o in np.ndindex(*([3] * d))]
    offs = [tuple(int(v) - 1 for v in o) for o in offs if any(v != 1 for v in o)]
    w = np.array([2.0 ** -(sum(v != 0 for v in o) - 1) for o in offs])
    w = w / w.sum()
    return list(zip(offs, w.tolist()))


def linear_imputation(image: np.ndarray, unknown: np.ndarray, noise: float = 0.0,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Noisy linear imputation (Rong et al. 2022, ROAD) of the ``unknown`` pixels of ``image`` (C, *spatial).

    Each unknown pixel is the weighted mean of its 8 (2D; 26 in 3D) neighbours,
    ``Σ_j w_j (x_i - x_j) = 0`` over the neighbours inside the image, with the
    known ones fixed: one sparse linear system (SciPy ``spsolve``) for all
    channels at once; then Gaussian noise of std ``noise`` is added to the
    imputed values. Same system as Quantus' ``noisy_linear_imputation``.
    """
    spatial = unknown.shape
    d = len(spatial)
    flat = image.reshape(image.shape[0], -1).astype(np.float64)
    idx = np.flatnonzero(unknown.reshape(-1))
    k = idx.size
    if k == 0:
        return image.copy()
    var = np.full(flat.shape[1], -1, dtype=np.int64)
    var[idx] = np.arange(k)
    coords = np.stack(np.unravel_index(idx, spatial), 1)
    diag = np.zeros(k)
    rhs = np.zeros((k, flat.shape[0]))
    rows_l, cols_l, vals_l = [], [], []
    for off, w in _offsets(d):
        nc = coords + np.array(off)
        valid = np.all((nc >= 0) & (nc < np.array(spatial)), axis=1)
        rows = np.flatnonzero(valid)
        nidx = np.ravel_multi_index(tuple(nc[valid].T), spatial)
        diag[rows] += w
        v = var[nidx]
        unk = v >= 0
        rows_l.append(rows[unk]); cols_l.append(v[unk]); vals_l.append(np.full(unk.sum(), -w))
        rhs[rows[~unk]] += w * flat[:, nidx[~unk]].T
    rows = np.concatenate(rows_l + [np.arange(k)])
    cols = np.concatenate(cols_l + [np.arange(k)])
    vals = np.concatenate(vals_l + [diag])
    a = csc_matrix((vals, (rows, cols)), shape=(k, k))
    sol = spsolve(a, rhs)
    sol = sol.reshape(k, -1).T  # (C, k)
    if noise:
        rng = rng or np.random.default_rng()
        sol = sol + noise * rng.standard_normal(sol.shape)
    out = flat.copy()
    out[:, idx] = sol
    return out.reshape(image.shape)


@metric("lower", inputs=("model", "x", "maps", "target"))
@with_model_in_eval
def road(model, x: torch.Tensor, maps: torch.Tensor, target: Any = None, *,
         percentages: Sequence[float] = tuple(range(1, 100, 2)), order: str = "morf", noise: float = 0.01,
         output: str = "accuracy", normalise: str | None = "minmax", abs: bool = False,
         batch_size: int = 64, seed: int = 0, return_curve: bool = False):
    """ROAD, RemOve And Debias (Rong et al. 2022; Quantus ``ROAD``), (B, T).

    For each percentage p, the ``int(n p / 100)`` most (``order="morf"``) or
    least (``"lerf"``) important pixels are removed and filled by noisy linear
    imputation (:func:`linear_imputation`, a sparse solve per image and
    percentage, noise std ``noise`` from a generator seeded with ``seed``); the
    model is then run on the imputed image. ``output="accuracy"`` records
    whether the target is still the arg-max class (Rong et al., Quantus),
    ``"probability"`` its probability. The value per map is the mean over the
    percentages (the area under the curve; the mean over maps of the
    ``accuracy`` version is the mean of Quantus' per-percentage curve).
    ``output`` other than these two is refused; ``percentages`` must be a
    non-empty sequence of numbers in [0, 100) (at 100 no pixel is left to
    impute from). ``abs=True`` takes |a| before
    normalising. Each map draws its noise from its own generator seeded with
    ``seed``, so a map's value does not depend on its place in the batch.

    Direction: lower is better for MoRF (the default), higher for LeRF. The
    registry records one direction per metric, ``"lower"``, which holds for
    ``order="morf"`` only: a caller that ranks methods by the registry (the
    benchmark) must read a LeRF value the other way round. Quantus returns
    only the batch-averaged curve, not a value per map. Cost: one sparse solve
    per map and percentage (on one CPU core about 0.01 s at 10 %, 0.1 s at
    50 % and 0.6 s at 90 % of a 224-px image; some 10 s per map for the 50
    default percentages), plus ``B·T·len(percentages)`` model calls.
    """
    if order not in ("morf", "lerf"):
        raise NemtError("order must be 'morf' or 'lerf'")
    if output not in ("accuracy", "probability"):
        raise ParameterError(f"road: output must be 'accuracy' or 'probability', got {output!r}")
    if torch.is_tensor(percentages) or isinstance(percentages, np.ndarray):
        percentages = percentages.reshape(-1).tolist()
    elif isinstance(percentages, (tuple, range)):
        percentages = list(percentages)
    if not isinstance(percentages, list) or not percentages:
        raise ParameterError(f"road: percentages must be a non-empty sequence of numbers in [0, 100), "
                             f"got {percentages!r}")
    bad = [p for p in percentages if not (is_finite_number(p) and 0 <= p < 100)]
    if bad:  # 100 % removes every pixel: nothing is left to impute from (a singular system, NaN)
        raise ParameterError(f"road: percentages must be numbers in [0, 100) (100 removes every pixel, leaving "
                             f"nothing to impute from), got {bad}")
    batch_size = count_param(batch_size, "road: batch_size")
    x, img, t, a, _, d = _pairs(model, x, maps, target)
    a = _normalise((a.abs() if abs else a).unsqueeze(1), normalise, d).squeeze(1).flatten(1)
    n = a.shape[1]
    ranking = descending_order(a if order == "morf" else -a).cpu().numpy()
    xs = x.detach().cpu().double().numpy()
    imputed = []
    for i in range(a.shape[0]):
        rng = np.random.default_rng(seed)  # per map: its noise does not depend on its place in the batch
        for p in percentages:
            unknown = np.zeros(n, dtype=bool)
            unknown[ranking[i, :int(n * p / 100)]] = True
            imputed.append(linear_imputation(xs[int(img[i])], unknown.reshape(x.shape[2:]), noise, rng))
    xi = torch.from_numpy(np.stack(imputed)).to(x.device, x.dtype)
    ti = t.repeat_interleave(len(percentages))
    with torch.no_grad():
        out = _forward(model, xi, batch_size)
    if output == "accuracy":
        val = (out.argmax(1) == ti).double()
    else:
        val = _select(_transform(model, out, "probability"), ti).double()
    curve = val.view(-1, len(percentages))
    shape = maps.shape[:2]
    score = curve.mean(1).float().view(shape)
    return (score, curve.float().view(*shape, -1)) if return_curve else score
