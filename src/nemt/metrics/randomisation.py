"""Randomisation sanity checks (Adebayo et al. 2018; Sixt et al. 2020): do maps depend on the model and the class?

``explain`` is any function ``explain(model, x, target) -> (B, T, *spatial)``
maps, called with ``target`` a (B, T) tensor of output indices, e.g.
``lambda m, x, t: get_explainer("gradcam", m).explain(x, t)``.

Similarities between two sets of maps (``similarity=``), one value per map:
``"spearman"`` (rank correlation, ties averaged as SciPy; Quantus' MPRT
default), ``"pearson"``, ``"ssim"`` (structural similarity with a 7-pixel
uniform window, K1 = 0.01, K2 = 0.03, sample covariance, data range = max -
min over both maps, mean over the window positions that fit inside the map:
scikit-image's ``structural_similarity`` defaults; Quantus' RandomLogit
default), or a function ``f(a, b) -> (B, T)`` of two (B, T, *spatial) tensors.

Quantus 0.6.0 defect: its ``ssim`` is applied to maps flattened to vectors
(``a.reshape(batch, -1)``), so its "SSIM" is a 1-D SSIM along raster order,
not the 2-D SSIM of the maps; ours is computed over the spatial axes.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from nemt.errors import NemtError
from nemt.ops import count_param, n_outputs_of, seeded, with_model_in_eval
from nemt.metrics._common import (ParameterError, check_finite, check_maps, check_x, checked_targets, float_maps,
                                  metric, pearson, spearman, warn_undefined)
from nemt.metrics._common import normalise as _normalise

Explain = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_pair(a, b, names: tuple[str, str] = ("a", "b")) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two sets of maps to compare, as float tensors, and their spatial rank; an error naming them when either
    holds NaN/inf or their shapes differ (they used to broadcast: one map compared with every other)."""
    a, b = float_maps(a), float_maps(b)
    check_finite(a, names[0])
    check_finite(b, names[1])
    d = check_maps(a)
    if a.shape != b.shape:
        raise ParameterError(f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have the same "
                             "shape (B, T, *spatial): one map of each per sample and target")
    return a, b, d


def ssim(a: torch.Tensor, b: torch.Tensor, win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean structural similarity of (B, T, *spatial) maps (2D or 3D), (B, T); scikit-image defaults (see module).

    ``a`` and ``b`` must have the same shape and finite values."""
    a, b, d = _check_pair(a, b)
    a, b = a.double(), b.double()
    if min(a.shape[2:]) < win_size:
        raise NemtError(f"ssim needs maps of at least {win_size} pixels per side, got {tuple(a.shape[2:])}")
    bt = a.shape[:2]
    x = a.reshape(-1, 1, *a.shape[2:])
    y = b.reshape(-1, 1, *b.shape[2:])
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[d - 1]
    filt = lambda z: pool(z, win_size, stride=1)  # noqa: E731  (valid positions only: skimage crops the rest)
    np_ = win_size ** d
    cov_norm = np_ / (np_ - 1)
    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    both = torch.cat([x.flatten(1), y.flatten(1)], 1)
    r = (both.amax(1) - both.amin(1)).view(-1, *([1] * (d + 1)))
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    # data range 0: both maps are one and the same constant, identical images, whose SSIM is 1 for any
    # positive K1, K2 (the formula's 0/0 here comes only from C1 = C2 = 0)
    return torch.where(r.flatten() == 0, torch.ones_like(r.flatten()), s.flatten(1).mean(1)).view(bt)


_SIMILARITIES = {
    "spearman": lambda a, b: spearman(a.flatten(2), b.flatten(2)),
    "pearson": lambda a, b: pearson(a.flatten(2), b.flatten(2)),
    "ssim": ssim,
}


def similarity_of(a: torch.Tensor, b: torch.Tensor, similarity: str | Callable = "spearman",
                  names: tuple[str, str] = ("a", "b")) -> torch.Tensor:
    """One similarity value per map between (B, T, *spatial) tensors ``a`` and ``b`` of the same shape, with
    finite values (else an error naming them, as ``names``)."""
    fn = _SIMILARITIES.get(similarity) if isinstance(similarity, str) else similarity
    if fn is None:
        raise NemtError(f"similarity must be one of {sorted(_SIMILARITIES)} or a function, got {similarity!r}")
    a, b, _ = _check_pair(a, b, names)
    return fn(a, b).float()


def _prep(maps: torch.Tensor, normalise, abs, name: str = "maps") -> torch.Tensor:
    maps = float_maps(maps).detach()
    check_finite(maps, name)
    d = check_maps(maps)
    return _normalise(maps.abs() if abs else maps, normalise, d)


@metric("lower", inputs=("model", "x", "explain", "target"))
@with_model_in_eval
def model_parameter_randomisation(model: torch.nn.Module, x: torch.Tensor, explain: Explain, target: Any = None, *,
                                  similarity: str | Callable = "spearman", order: str = "top_down",
                                  seed: int = 42, normalise: str | None = "minmax", abs: bool = True,
                                  maps: torch.Tensor | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Model-parameter randomisation test (Adebayo et al. 2018; Quantus ``MPRT``), cascading by default.

    A copy of ``model`` has its layers re-initialised one after another
    (every module with ``reset_parameters``, including BatchNorm, whose running
    statistics are reset too), from the output end (``order="top_down"``,
    cascading: earlier randomisations are kept), ``"bottom_up"`` (cascading
    from the input end) or ``"independent"`` (one layer at a time). After each
    layer the maps are recomputed for the same targets and compared with the
    original maps (``maps``, or ``explain(model, x, target)``). Returns an
    ordered dict ``layer name -> (B, T)`` similarities, in randomisation order.
    Lower is better (a map that ignores the weights stays similar).

    Defaults: Spearman similarity, seed 42, top-down (Quantus' defaults);
    ``abs=True``: the magnitudes |a| are compared, taken before the per-map
    min-max normalisation (``normalise="minmax"``): a positive affine
    rescaling of the |a| / max |a| that Quantus' defaults compare (``abs=True``
    after ``normalise_by_max``), to which Spearman and Pearson are blind (SSIM
    is not). Quantus re-seeds every layer
    with ``seed + 1``, here layer i uses ``seed + i`` (the global RNG is left
    untouched). Module order is ``named_modules()`` (definition) order, as in
    Quantus. ``maps`` (and every map ``explain`` gives) must have the shape of
    the randomised model's maps and finite values. A model without a module
    that has ``reset_parameters`` (nothing to randomise) is refused.
    """
    if order not in ("top_down", "bottom_up", "independent"):
        raise NemtError("order must be 'top_down', 'bottom_up' or 'independent'")
    x = check_x(model, x)
    targets = checked_targets(target, model, x)
    rmodel = copy.deepcopy(model).eval()
    modules = [(n, m) for n, m in rmodel.named_modules() if hasattr(m, "reset_parameters")]
    if not modules:
        raise ParameterError(f"model_parameter_randomisation: the model ({type(model).__name__}) has no module "
                             "with reset_parameters, so there is nothing to randomise")
    first = "maps" if maps is not None else "explain(model, x, target)"
    with torch.enable_grad():
        original = maps if maps is not None else explain(model, x, targets)
    ref = _prep(original, normalise, abs, first)
    state = copy.deepcopy(rmodel.state_dict())
    if order == "top_down":
        modules = modules[::-1]
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for i, (name, module) in enumerate(modules):
        if order == "independent":
            rmodel.load_state_dict(state)
        with seeded(seed + i):
            module.reset_parameters()
        rmodel.eval()
        with torch.enable_grad():
            rand = explain(rmodel, x, targets)
        second = f"explain(model with {name or '<model>'} randomised, x, target)"
        out[name or "<model>"] = similarity_of(ref, _prep(rand, normalise, abs, second), similarity,
                                               names=(first, second))
    _warn_nan("model_parameter_randomisation", out.values(), "similarities (maps x layers)")
    return out


def _warn_nan(name: str, values, unit: str = "maps") -> None:
    """One warning per call for similarities that are NaN (a correlation with a constant map is undefined)."""
    values = [v for v in values if torch.is_tensor(v)]
    if values:
        n_nan = sum(int(torch.isnan(v).sum()) for v in values)
        warn_undefined(name, n_nan, sum(v.numel() for v in values),
                       ["a similarity of a constant (collapsed) map, e.g. a rank correlation with zero variance"],
                       stacklevel=5, unit=unit)


@metric("lower", inputs=("model", "x", "explain", "target"))
@with_model_in_eval
def random_logit(model: torch.nn.Module, x: torch.Tensor, explain: Explain, target: Any = None, *,
                 num_classes: int | None = None, similarity: str | Callable = "ssim", seed: int = 42,
                 normalise: str | None = "minmax", abs: bool = False,
                 maps: torch.Tensor | None = None) -> torch.Tensor:
    """Random-logit test (Sixt et al. 2020; Quantus ``RandomLogit``), (B, T).

    For each map (target t) a different class t' ≠ t is drawn uniformly
    among ``num_classes`` (default: the model's outputs; at most that many),
    each sample from its own ``torch.Generator`` seeded with ``seed``, so a
    sample's other class, and its value, do not depend on its place in the
    batch; the map for t' is computed and compared with the map for t
    (``maps``, or ``explain(model, x, target)``; of the same shape as the
    maps ``explain`` gives, with finite values). Lower is better (a
    class-sensitive method gives different maps). Quantus defaults: SSIM,
    ``abs=False``; but Quantus computes SSIM on flattened maps (see the
    module docstring), ours over the image axes.
    """
    x = check_x(model, x)
    targets = checked_targets(target, model, x)
    outputs = n_outputs_of(model, x=x[:1])
    if num_classes is None:
        n = outputs
    else:
        n = count_param(num_classes, "random_logit: num_classes", least=2)
        if outputs is not None and n > outputs:
            raise ParameterError(f"random_logit: num_classes must be at most the model's {outputs} outputs, "
                                 f"got {num_classes!r}")
    if n is None or n < 2:
        raise NemtError("random_logit needs at least two classes")
    # every sample's generator is seeded with seed alone: the same draws as one generator per sample
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, n - 1, targets.shape[1:], generator=g).expand_as(targets).to(targets.device)
    off = r + (r >= targets).long()
    first = "maps" if maps is not None else "explain(model, x, target)"
    second = "explain(model, x, other class)"
    with torch.enable_grad():
        original = maps if maps is not None else explain(model, x, targets)
        other = explain(model, x, off)
    out = similarity_of(_prep(original, normalise, abs, first), _prep(other, normalise, abs, second), similarity,
                        names=(first, second))
    _warn_nan("random_logit", [out])
    return out
