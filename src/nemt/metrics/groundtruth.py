"""Explanation correctness against known class-conditional features (XAI-TRIS / EXACT; METHODS.md section 4).

As in XAI-TRIS (Clark et al. 2024), attributions are taken in absolute
value (``abs=True``) and not min-max normalised (``normalise=None``; the
scores below are scale-free, and a min-max shift would move mass); GT is the
binary mask of the pattern pixels, ``(B, 1 or T, *spatial)``. Empty GT gives
NaN.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from nemt.metrics._common import (chunked, count, expand_masks, float_maps, metric, nan_where, prepare_maps,
                                  top_k_hits)


@metric("higher", inputs=("maps", "gt"))
@chunked
def top_k_precision(maps: torch.Tensor, masks: torch.Tensor, *, abs: bool = True,
                    normalise: str | None = None) -> torch.Tensor:
    """Precision of the top-|GT| attributions (XAI-TRIS "precision"), (B, T).

    With k = |GT|: the fraction of the k pixels of largest |a| that lie in GT;
    pixels with zero attribution never count as hits (XAI-TRIS keeps only
    non-zero attributions among the top k). Ties by position. Equal to
    :func:`relevance_rank` on |a| when the top k are non-zero. Higher is
    better; NaN for an empty GT.
    """
    a, _ = prepare_maps(maps, normalise, abs)
    m = expand_masks(masks, maps)
    b, t, n = a.shape
    k = count(m)
    hits = top_k_hits(a.reshape(b * t, n), m.reshape(b * t, n), k.reshape(-1), exclude_zero=True)
    out = hits.view(b, t).to(a.dtype) / k.clamp_min(1).to(a.dtype)
    return nan_where(k == 0, out)


@metric("higher", inputs=("maps", "gt"))
@chunked
def importance_mass_accuracy(maps: torch.Tensor, masks: torch.Tensor, *, abs: bool = True,
                             normalise: str | None = None) -> torch.Tensor:
    """Importance mass accuracy ``Σ |a|[GT] / Σ |a|`` (Arras et al.; XAI-TRIS), (B, T).

    Higher is better; 0 for an all-zero map; NaN for an empty GT.
    """
    a, _ = prepare_maps(maps, normalise, abs)
    m = expand_masks(masks, maps)
    tot = a.sum(-1)
    out = torch.where(m, a, 0).sum(-1) / torch.where(tot == 0, torch.ones_like(tot), tot)  # all-zero map: 0
    return nan_where(~m.any(-1), out)


def _pool_sum(v: torch.Tensor, f: int) -> torch.Tensor:
    """Sum-pool (N, *spatial) by factor f (zero-padded at the far end)."""
    d = v.ndim - 1
    pad = []
    for s in reversed(v.shape[1:]):
        pad += [0, (-s) % f]
    v = F.pad(v.unsqueeze(1), pad)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[d - 1]
    return pool(v, f).squeeze(1) * f ** d


@metric("higher", inputs=("maps", "gt"))
def emd_score(maps: torch.Tensor, masks: torch.Tensor, *, abs: bool = True, max_side: int = 64,
              num_iter_max: int = 1_000_000) -> torch.Tensor:
    """Earth mover's distance score (XAI-TRIS), ``1 - EMD / D_max``, (B, T).

    ``|a|`` and GT are each normalised to sum 1; EMD is the exact optimal
    transport cost between them (POT ``ot.emd2``, network simplex) with the
    Euclidean distance between pixel coordinates as ground cost (in pixels);
    ``D_max`` is the largest such distance, the diagonal
    ``sqrt(Σ (size_i - 1)^2)`` (the XAI-TRIS code divides by ``sqrt(2 n)``, n the
    number of pixels, i.e. ``n_side·sqrt(2)`` for a square image, slightly more
    than the true diagonal ``(n_side - 1)·sqrt(2)``; we use the diagonal). Only
    pixels with mass enter the problem (zero-mass pixels do not change the
    cost). Maps larger than ``max_side`` per side are first sum-pooled by the
    smallest integer factor f that brings them to at most ``max_side``, and
    cells are placed at their centres in original pixel units (an
    approximation within ``f·sqrt(D)/2`` pixels, to keep the cost matrix
    small). Higher is better (1 = the map's mass lies exactly on GT); 0 for an
    all-zero map; NaN for an empty GT.
    """
    import ot  # POT: imported when the metric is used (a large package)

    maps = float_maps(maps).detach()  # scored through NumPy: maps that require grad are read as values
    a, d = prepare_maps(maps, None, abs)
    m = expand_masks(masks, maps)
    spatial = tuple(maps.shape[2:])
    b, t = maps.shape[:2]
    a = a.reshape(b * t, *spatial).double()
    g = m.reshape(b * t, *spatial).double()
    f = max(1, math.ceil(max(spatial) / max_side))
    if f > 1:
        a, g = _pool_sum(a, f), _pool_sum(g, f)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) * f + (f - 1) / 2
                                        for s in a.shape[1:]], indexing="ij"), -1).reshape(-1, d).numpy()
    dmax = math.sqrt(sum((s - 1) ** 2 for s in spatial))
    av = a.reshape(b * t, -1).cpu().numpy()
    gv = g.reshape(b * t, -1).cpu().numpy()
    out = np.full(b * t, np.nan)
    for i in range(b * t):
        if gv[i].sum() <= 0:
            continue
        if av[i].sum() <= 0:
            out[i] = 0.0
            continue
        ia, ig = np.flatnonzero(av[i] > 0), np.flatnonzero(gv[i] > 0)
        p = av[i, ia] / av[i, ia].sum()
        q = gv[i, ig] / gv[i, ig].sum()
        cost = np.sqrt(((grid[ia, None, :] - grid[None, ig, :]) ** 2).sum(-1))
        emd = float(ot.emd2(p, q, cost, numItermax=num_iter_max))
        out[i] = 1.0 - emd / dmax if dmax > 0 else 1.0
    return torch.from_numpy(out).float().view(b, t)
