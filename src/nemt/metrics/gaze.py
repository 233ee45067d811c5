"""Eye-gaze plausibility: maps against radiologists' gaze (MIT saliency benchmark definitions; Bylinskii et al. 2019).

``maps`` are ``(B, T, *spatial)`` saliency maps, min-max normalised to
[0, 1] per map first (METHODS.md). ``gaze`` is a ``(B, 1 or T, *spatial)``
continuous fixation density (e.g. from :func:`fixations_to_heatmap`);
``fixations`` for :func:`nss` is a fixation map (binary, or fixation counts /
durations used as weights). Gaze and fixation maps with negative values are
refused. A map whose gaze map is empty (all zero) gets NaN.

A constant saliency map (all values equal, all-zero included) prefers no
pixel: :func:`kl_divergence` and :func:`similarity` read it as the uniform
distribution (it scored from the eps alone: KL about 32, SIM 0);
:func:`nss` and :func:`cc` divide by its spread, so they give NaN, and one
:class:`~nemt.metrics.UndefinedMetricWarning` per call says how many maps.
"""
from __future__ import annotations

import math

from typing import Sequence

import numpy as np
import torch

from nemt.errors import NemtError
from nemt.metrics._common import (ParameterError, chunked, constant_rows, expand_masks, gaussian_blur, metric,
                                  nan_where, pearson, prepare_maps, report_undefined)
from nemt.ops import is_finite_number

EPS = float(np.finfo(np.float64).eps)  # 2.2204e-16, the MIT benchmark's eps


def _sal_gaze(maps, gaze, normalise, name="gaze"):
    s, _ = prepare_maps(maps, normalise, False)
    g = expand_masks(gaze, maps, name, dtype=s.dtype, nonnegative=True)
    return s.double(), g.double()


def _distribution(v: torch.Tensor) -> torch.Tensor:
    return v / v.sum(-1, keepdim=True).clamp_min(1e-300)


def _uniform_if_constant(v: torch.Tensor) -> torch.Tensor:
    """``v`` (..., n) with its constant rows (no preference for any pixel) made ones: the uniform distribution
    once normalised to sum 1."""
    return torch.where(constant_rows(v)[..., None], torch.ones_like(v), v)


def _rescale(v: torch.Tensor) -> torch.Tensor:
    """Min-max of each row of ``v`` (..., n) to [0, 1], as the MIT benchmark's ``similarity.m``; a constant row
    becomes ones (uniform)."""
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    flat = hi == lo
    return torch.where(flat, torch.ones_like(v), (v - lo) / torch.where(flat, torch.ones_like(hi), hi - lo))


@metric("lower", inputs=("maps", "gaze"))
@chunked
def kl_divergence(maps: torch.Tensor, gaze: torch.Tensor, *, normalise: str | None = "minmax") -> torch.Tensor:
    """KL divergence of the saliency distribution from the gaze distribution, (B, T).

    ``S = s / Σ s``, ``G = g / Σ g``: ``KL = Σ G log(eps + G / (S + eps))`` with
    eps = 2.2204e-16 (MIT saliency benchmark). Lower is better; NaN for an
    empty gaze map. A constant map is the uniform distribution S = 1/n.
    """
    s, g = _sal_gaze(maps, gaze, normalise)
    S, G = _distribution(_uniform_if_constant(s)), _distribution(g)
    kl = (G * torch.log(EPS + G / (S + EPS))).sum(-1)
    return nan_where(g.sum(-1) <= 0, kl).float()


@metric("higher", inputs=("maps", "fixations"))
@chunked
def nss(maps: torch.Tensor, fixations: torch.Tensor, *, normalise: str | None = "minmax") -> torch.Tensor:
    """Normalised scanpath saliency (Peters et al. 2005), (B, T).

    The map is z-scored over its pixels (mean 0, standard deviation 1, the
    population std, ddof = 0, as the Python MIT/pysaliency code) and averaged
    at the fixated pixels, weighted by the fixation map's values (a binary
    map gives the plain mean over fixated pixels). Higher is better (0 =
    chance); NaN when there is no fixation, and for a constant map (no
    spread to z-score by; an UndefinedMetricWarning says how many).
    """
    s, f = _sal_gaze(maps, fixations, normalise, "fixations")
    z = (s - s.mean(-1, keepdim=True)) / s.std(-1, correction=0, keepdim=True).clamp_min(1e-12)
    w = f.sum(-1)
    out = (z * f).sum(-1) / w.clamp_min(1e-300)
    const = constant_rows(s) & (w > 0)
    report_undefined("nss", const)
    return nan_where((w <= 0) | const, out).float()


@metric("higher", inputs=("maps", "gaze"))
@chunked
def cc(maps: torch.Tensor, gaze: torch.Tensor, *, normalise: str | None = "minmax") -> torch.Tensor:
    """Linear correlation coefficient (Pearson) between the map and the gaze map over pixels, (B, T).

    Higher is better (in [-1, 1]); NaN for an empty gaze map, and for a
    constant map (no spread to correlate; an UndefinedMetricWarning says how
    many).
    """
    s, g = _sal_gaze(maps, gaze, normalise)
    out = pearson(s, g, eps=1e-300)
    empty = g.sum(-1) <= 0
    const = constant_rows(s) & ~empty
    report_undefined("cc", const)
    return nan_where(empty | const, out).float()


@metric("higher", inputs=("maps", "gaze"))
@chunked
def similarity(maps: torch.Tensor, gaze: torch.Tensor, *, normalise: str | None = "minmax") -> torch.Tensor:
    """Similarity, histogram intersection (Swain & Ballard 1991; MIT benchmark SIM), (B, T).

    ``Σ min(S, G)`` where each map, the gaze map included, is min-max
    normalised to [0, 1] and then divided by its sum, as the MIT benchmark's
    ``similarity.m`` (after ``normalise``; a min-max normalised map is
    unchanged). 1 for identical distributions, 0 for disjoint ones; higher is
    better; NaN for an empty gaze map. A constant map (all-zero included), or
    a constant gaze map, is the uniform distribution (``similarity.m`` divides
    by its zero range).
    """
    s, g = _sal_gaze(maps, gaze, normalise)
    out = torch.minimum(_distribution(_rescale(s)), _distribution(_rescale(g))).sum(-1)
    return nan_where(g.sum(-1) <= 0, out).float()


def fixations_to_heatmap(fixations, shape: Sequence[int], sigma: float, *, order: str = "xy") -> torch.Tensor:
    """A fixation list turned into a Gaussian-blurred heat map of ``shape`` (2D or 3D), summing to 1.

    ``fixations`` is (N, D) coordinates or (N, D + 1) coordinates plus a
    duration (weight) per fixation, D = ``len(shape)``. Coordinates are in
    pixels of the map, continuous, with pixel i covering [i, i + 1); with
    ``order="xy"`` (eye trackers' convention) the columns are x (column),
    y (row)[, z (slice)], i.e. the map's axes in reverse; ``order="ij"`` takes
    them in the map's axis order. Fixations outside the map are dropped. Each
    fixation adds its weight (1 or its duration) to its pixel; the result is
    blurred with a Gaussian of ``sigma`` pixels (zero padding, kernel
    truncated at 4 sigma; ``sigma=0``: no blur, a fixation map for
    :func:`nss`) and divided by its sum (all zeros if no fixation is inside).
    NaN or infinite coordinates or weights, negative weights and a negative or
    non-finite ``sigma`` are refused.
    """
    if not (is_finite_number(sigma) and sigma >= 0):
        raise ParameterError(f"fixations_to_heatmap: sigma must be a finite number >= 0 (pixels; 0: no blur), "
                             f"got {sigma!r}")
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    if d not in (2, 3):
        raise NemtError(f"shape must be 2D or 3D, got {shape}")
    f = torch.as_tensor(np.asarray(fixations, dtype=np.float64)).reshape(-1, np.shape(fixations)[-1]
                                                                        if np.size(fixations) else d)
    if f.shape[1] not in (d, d + 1):
        raise NemtError(f"fixations must be (N, {d}) or (N, {d + 1}) for a {d}D map, got {tuple(f.shape)}")
    if order not in ("xy", "ij"):
        raise NemtError("order must be 'xy' or 'ij'")
    bad = ~torch.isfinite(f)
    if bad.any():
        raise ParameterError(f"fixations hold {int(bad.any(1).sum())} fixations with NaN or infinite coordinates "
                             f"or weights (first row {int(bad.any(1).nonzero()[0])}): drop them first")
    if f.shape[1] == d + 1 and (f[:, d] < 0).any():
        raise ParameterError(f"fixations hold {int((f[:, d] < 0).sum())} negative weights (durations), first row "
                             f"{int((f[:, d] < 0).nonzero()[0])}: a weight must be >= 0")
    coords = f[:, :d]
    if order == "xy":
        coords = coords.flip(1)
    w = f[:, d] if f.shape[1] == d + 1 else torch.ones(f.shape[0], dtype=torch.float64)
    idx = torch.floor(coords).long()
    inside = ((idx >= 0) & (idx < torch.tensor(shape))).all(1)
    idx, w = idx[inside], w[inside]
    heat = torch.zeros(int(np.prod(shape)), dtype=torch.float64)
    if idx.numel():
        flat = torch.zeros(idx.shape[0], dtype=torch.long)
        for k in range(d):
            flat = flat * shape[k] + idx[:, k]
        heat.index_add_(0, flat, w)
    heat = heat.view(1, 1, *shape)
    heat = gaussian_blur(heat, float(sigma), radius=max(1, math.ceil(4 * sigma)), mode="constant")[0, 0]
    total = heat.sum()
    return (heat / total if total > 0 else heat).float()
