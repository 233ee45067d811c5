"""Localisation of maps against ground-truth masks (Quantus definitions; METHODS.md section 2).

Maps (B, T, *spatial) are min-max normalised to [0, 1] per map first; masks
are (B, 1 or T, *spatial) booleans. Maps whose mask is empty get NaN (no
localisation score exists for them); averages must exclude and count them.
"""
from __future__ import annotations

import torch

from nemt.explainers.base import normalise_maps


def _prepare(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    d = masks.ndim - 2
    a = normalise_maps(maps.float(), d).flatten(2)
    m = masks.bool().expand(-1, maps.shape[1], *masks.shape[2:]).flatten(2)
    return a, m, d


def relevance_mass(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Relevance mass accuracy Σ a[GT] / Σ a, per map (B, T). Higher is better; NaN for empty GT."""
    a, m, _ = _prepare(maps, masks)
    mass = (a * m).sum(-1) / a.sum(-1).clamp_min(1e-12)
    return torch.where(m.any(-1), mass, torch.full_like(mass, float("nan")))


def relevance_rank(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Relevance rank accuracy: fraction of the |GT| highest-ranked pixels inside GT, per map (B, T).

    Higher is better; NaN for empty GT. Ties are broken by position (stable sort).
    """
    a, m, _ = _prepare(maps, masks)
    order = torch.argsort(a, dim=-1, descending=True, stable=True)
    k = m.sum(-1, keepdim=True)
    ranks = torch.arange(a.shape[-1], device=a.device).expand_as(a)
    top = ranks < k  # the first k positions of the order
    hits = (torch.gather(m, -1, order) & top).sum(-1).float()
    out = hits / k.squeeze(-1).clamp_min(1).float()
    return torch.where(m.any(-1), out, torch.full_like(out, float("nan")))
