"""Complexity of a map: entropy (Bhatt et al. 2020) and the Gini index (Chalasani et al. 2020).

Quantus definitions (``Complexity``, ``Sparseness``; defaults ``abs=True``),
after the per-map normalisation of METHODS.md (min-max to [0, 1]). Both are
scale-free, so Quantus' batch-wide ``normalise_by_max`` gives the same numbers
as a per-map one.

Both are defined on magnitudes (Bhatt et al.: the fractional contribution of
each feature to the total magnitude; Chalasani et al.: the Gini index of the
absolute values), so maps that still hold negative values after ``abs`` and
``normalise`` (``abs=False`` with ``normalise="max"``, ``"sum"`` or ``None``)
are refused, naming the fix (entropy gave NaN, the Gini index left [0, 1]).
With ``abs=True`` (the default) |a| is taken before normalising.

Both sum over every pixel of a map, so they are computed in float64 whatever
the maps' dtype (and returned in float64): in float32 the rounding of the
normalisation, the logarithms and the sums grows with the pixel count, and a
metric would depend on how the library orders its additions.
"""
from __future__ import annotations

import torch

from nemt.metrics._common import ParameterError, chunked, float_maps, metric, prepare_maps, sort_values


def _magnitudes(name: str, maps: torch.Tensor, normalise: str | None, abs: bool) -> torch.Tensor:
    """The prepared maps (B, T, n) in float64, or an error when they hold negative values (see the module)."""
    a, _ = prepare_maps(float_maps(maps).double(), normalise, abs)
    neg = (a < 0).any(-1)
    if neg.any():
        raise ParameterError(f"{name}: maps hold negative values after normalise={normalise!r} with abs=False; "
                             "the metric is defined on magnitudes: use abs=True or normalise='minmax'")
    return a


@metric("lower", inputs=("maps",))
@chunked
def complexity(maps: torch.Tensor, *, normalise: str | None = "minmax", abs: bool = True) -> torch.Tensor:
    """Shannon entropy (natural log) of ``p = a / Σ|a|`` per map, ``-Σ p log(p + 1e-12)``, (B, T).

    Lower is better (fewer pixels carry the relevance); at most ``log n``.
    A constant ("collapsed") map gives every pixel the same relevance: its
    distribution is the uniform one, entropy ``log n`` (up to the 1e-12), the
    same value whatever its constant and whatever ``normalise``. Min-max
    normalisation turns a constant map into zeros, where ``a / Σ|a|`` is 0/0
    (Quantus ``Complexity`` returns NaN there, which a summary would then leave
    out of the mean); an all-zero map is read the same way. Maps with negative
    values left after ``abs`` and ``normalise`` are refused (see the module).
    """
    a = _magnitudes("complexity", maps, normalise, abs)
    total = a.sum(-1, keepdim=True)
    flat = total == 0  # only all-zero rows (a >= 0, or Σ|a| = 0): no relevance differences, the uniform share
    p = torch.where(flat, torch.full_like(a, 1.0 / a.shape[-1]), a / torch.where(flat, torch.ones_like(total), total))
    return -(p + 1e-12).log_().mul_(p).sum(-1)


@metric("higher", inputs=("maps",))
@chunked
def sparseness(maps: torch.Tensor, *, normalise: str | None = "minmax", abs: bool = True) -> torch.Tensor:
    """Gini index of the map's values per map, (B, T).

    With ``a`` sorted ascending, ``a_i += 1e-7`` (Quantus ``Sparseness``) and
    ``n`` pixels: ``Σ_i (2i - n - 1) a_i / (n Σ_i a_i)``. 0 for a uniform map,
    close to 1 when one pixel holds everything. Higher is better. Maps with
    negative values left after ``abs`` and ``normalise`` are refused (see the
    module).
    """
    a = _magnitudes("sparseness", maps, normalise, abs)
    n = a.shape[-1]
    a = sort_values(a).to(a.device).add_(1e-7)
    i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    total = a.sum(-1)
    return a.mul_(2 * i - n - 1).sum(-1) / (n * total)
