"""Localisation of maps against ground-truth masks (Quantus definitions; METHODS.md section 2).

Maps ``(B, T, *spatial)`` are min-max normalised to [0, 1] per map first
(``normalise="minmax"``, METHODS.md); ``normalise="max"`` with the metric's
``abs`` reproduces Quantus' defaults. Masks are ``(B, 1 or T, *spatial)``
booleans (boxes become masks with
:meth:`nemt.data.preprocess.Preprocessing.box_mask`). Maps whose mask is
empty get NaN (no localisation score exists for them); average with
:func:`nemt.metrics.summarise`, which excludes and counts them. A constant
map (all values equal, all-zero included, after ``abs``) localises nothing:
it gets NaN too, and one :class:`~nemt.metrics.UndefinedMetricWarning` per
call says how many maps were constant (Quantus refuses such maps; it scored a
perfect pointing game, or ranked its pixels in raster order).

Differences from Quantus 0.6.0 (all documented in the functions):
Quantus normalises with ``normalise_by_max`` over the whole batch at once (one
maximum for all samples; harmless for these scale-free scores); its
``PointingGame`` returns 1 (``True``), not NaN, for an empty mask because it
writes NaN into a boolean array; its argsort breaks ties arbitrarily, ours by
position.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from nemt.errors import NemtError
from nemt.metrics._common import (ParameterError, chunked, constant_rows, count, expand_masks, metric, nan_where,
                                  order_values, prepare_maps, report_undefined, top_k_hits)
from nemt.ops import count_param


def _constant(name: str, v: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Where (B, T) the prepared values ``v`` (B, T, n) are one constant and GT is not empty: said once per call."""
    const = constant_rows(v) & ~empty
    report_undefined(name, const)
    return const


def _prepare(maps, masks, normalise, abs):
    a, d = prepare_maps(maps, normalise, abs)
    m = expand_masks(masks, maps)
    return a, m, d


@metric("higher", inputs=("maps", "gt"))
@chunked
def relevance_mass(maps: torch.Tensor, masks: torch.Tensor, *, normalise: str | None = "minmax",
                   abs: bool = False) -> torch.Tensor:
    """Relevance mass accuracy (Arras et al. 2022): ``Σ a[GT] / Σ a`` per map, (B, T).

    Higher is better; NaN for an empty GT and for a constant map (all-zero
    included: no mass is localised; an UndefinedMetricWarning says how many).
    Quantus ``RelevanceMassAccuracy`` (defaults ``abs=False``, normalise by
    max). With signed maps (``normalise`` other than ``"minmax"`` and
    ``abs=False``) the ratio is not bounded to [0, 1], as in Quantus.
    """
    a, m, _ = _prepare(maps, masks, normalise, abs)
    tot = a.sum(-1)
    mass = torch.where(m, a, 0).sum(-1) / torch.where(tot == 0, torch.ones_like(tot), tot)
    empty = ~m.any(-1)
    return nan_where(empty | _constant("relevance_mass", a, empty), mass)


@metric("higher", inputs=("maps", "gt"))
@chunked
def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, normalise: str | None = "minmax",
                         abs: bool = False) -> torch.Tensor:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): energy inside the box over the total, (B, T).

    ``Σ a[box] / Σ a`` of the min-max normalised map, where the box (or mask)
    is binarised: the same number as :func:`relevance_mass` on the box mask.
    Higher is better; NaN for an empty box and for a constant map.
    """
    return relevance_mass.__wrapped__(maps, masks, normalise=normalise, abs=abs)


@metric("higher", inputs=("maps", "gt"))
@chunked
def relevance_rank(maps: torch.Tensor, masks: torch.Tensor, *, normalise: str | None = "minmax",
                   abs: bool = False) -> torch.Tensor:
    """Relevance rank accuracy (Arras et al. 2022): fraction of the ``k = |GT|`` highest-ranked pixels inside GT.

    Per map (B, T). Higher is better; NaN for an empty GT and for a constant
    map (no ranking; it scored its pixels in raster order). Quantus
    ``RelevanceRankAccuracy``; ties are broken by position (stable sort; Quantus'
    argsort breaks them arbitrarily, which only matters for tied values).
    """
    v, _ = order_values(maps, normalise, abs)
    m = expand_masks(masks, maps)
    b, t, n = v.shape
    k = count(m)
    hits = top_k_hits(v.reshape(b * t, n), m.reshape(b * t, n), k.reshape(-1)).view(b, t).to(v.dtype)
    return nan_where((k == 0) | _constant("relevance_rank", v, k == 0), hits / k.clamp_min(1).to(v.dtype))


@metric("higher", inputs=("maps", "gt"))
@chunked
def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: int = 0,
                  normalise: str | None = "minmax", abs: bool = False, ties: str = "any") -> torch.Tensor:
    """Pointing game (Zhang et al. 2018): 1 if the map's maximum lies in GT, else 0, per map (B, T).

    ``ties="any"`` (default, Quantus ``PointingGame``): when several pixels
    share the maximum, any of them inside GT is a hit, so a map with a plateau
    of maxima (a clamped mask, e.g. extremal perturbation's ~1.6 % of the image
    at 1.0 on BUSI) is scored on whether the plateau *touches* GT.
    ``ties="expected"``: the share of the tied maxima that lie in GT, i.e. the
    expected hit when the tie is broken uniformly at random; equal to
    ``"any"`` for a map with a single maximum, so it compares maps with and
    without plateaus on one footing. ``tolerance`` (pixels, default 0 as Quantus;
    Zhang et al. used 15) grows the mask by that many pixels in every
    direction (an interval/square/cube, i.e. Chebyshev distance) first; a whole
    number >= 0. Higher is better; NaN for an empty GT (Quantus 0.6.0 returns 1
    there: it writes NaN into a boolean array) and for a constant map (every
    pixel is a tied maximum: it scored a hit whenever GT was not empty).
    """
    tolerance = count_param(tolerance, "pointing_game: tolerance", least=0)
    a, d = order_values(maps, normalise, abs)
    m = expand_masks(masks, maps)
    empty = ~m.any(-1)
    const = _constant("pointing_game", a, empty)
    if tolerance > 0:
        shape = (m.shape[0] * m.shape[1], 1, *maps.shape[2:])
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1]
        grown = pool(m.reshape(shape).float(), 2 * tolerance + 1, stride=1, padding=tolerance)
        m = grown.reshape(m.shape) > 0
    if ties not in ("any", "expected"):
        raise NemtError(f"pointing_game: ties must be 'any' or 'expected', got {ties!r}")
    top = a == a.amax(-1, keepdim=True)  # the tied maxima (exact equality, as Quantus)
    inside = (top & m).sum(-1)
    # "any": a hit when any tied maximum lies in GT; "expected": the share of them that does
    hit = (inside > 0).to(a.dtype) if ties == "any" else inside.to(a.dtype) / top.sum(-1).to(a.dtype)
    return nan_where(empty | const, hit)


@metric("higher", inputs=("maps", "gt"))
@chunked
def pointing_game_expected(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: int = 0,
                           normalise: str | None = "minmax", abs: bool = False) -> torch.Tensor:
    """:func:`pointing_game` with ``ties="expected"``: share of the tied maxima inside GT, (B, T).

    The tie-fair pointing game: a map whose maximum is one pixel scores as in
    the pointing game; a map with a plateau of maxima scores the plateau's
    share in GT rather than whether it touches GT. Higher is better; NaN for
    an empty GT and for a constant map (a plateau covering the whole map: no
    localisation, as in the pointing game).
    """
    return pointing_game.__wrapped__(maps, masks, tolerance=tolerance, normalise=normalise, abs=abs,
                                     ties="expected")


@metric("higher", inputs=("maps", "gt"))
@chunked
def top_k_intersection(maps: torch.Tensor, masks: torch.Tensor, *, k: int | None = None,
                       concept_influence: bool = False, normalise: str | None = "minmax",
                       abs: bool = False) -> torch.Tensor:
    """Top-k intersection (Theiner et al. 2021): fraction of the ``k`` highest-ranked pixels inside GT, (B, T).

    Quantus ``TopKIntersection``. ``k`` is a whole number from 1 to the number
    of pixels per map; another is refused (a larger one used to be capped at
    the pixel count without a word). ``k=None`` (the default) is Quantus' default 1000 on maps of more than 1000
    pixels; on smaller maps, where 1000 would take every pixel and score |GT| / n
    whatever the map, Quantus' default share at 224 px, ``ceil(1000 n / 50176)``
    (2 %: 20 samples of a 1,000-sample signal, 16 pixels at 28 px).
    ``concept_influence`` multiplies by ``n / |GT|``. Higher is better; NaN
    for an empty GT and for a constant map (no ranking).
    """
    v, _ = order_values(maps, normalise, abs)
    m = expand_masks(masks, maps)
    b, t, n = v.shape
    if k is None:
        k = 1000 if n > 1000 else math.ceil(1000 * n / (224 * 224))
    elif not (isinstance(k, numbers.Real) and not isinstance(k, bool) and math.isfinite(k) and k == int(k)
              and 1 <= k <= n):
        raise ParameterError(f"top_k_intersection: k must be a whole number from 1 to the number of pixels per "
                             f"map ({n}, spatial size {tuple(maps.shape[2:])}), got {k!r}")
    k = int(k)
    hits = top_k_hits(v.reshape(b * t, n), m.reshape(b * t, n), torch.full((b * t,), k, device=v.device))
    out = hits.view(b, t).to(v.dtype) / k
    gt = count(m)
    if concept_influence:
        out = out * n / gt.clamp_min(1).to(v.dtype)
    return nan_where((gt == 0) | _constant("top_k_intersection", v, gt == 0), out)
