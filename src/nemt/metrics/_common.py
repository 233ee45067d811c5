"""What the metric modules share: the metric registry, map preparation, mask broadcasting, batch slices.

Conventions
-----------
- ``maps`` are ``(B, T, *spatial)`` (1D signals, 2D or 3D), one map per sample and target;
  ``masks`` (and gaze maps) are ``(B, 1 or T, *spatial)``; a ``(B, *spatial)``
  mask is read as ``(B, 1, *spatial)``.
- Every metric returns a ``(B, T)`` tensor, one value per map.
- Inputs are checked before scoring (:func:`check_maps`, :func:`expand_masks`,
  :func:`check_x`): NaN/inf maps, masks, gaze or fixation maps and x, an empty
  batch (B = 0 or T = 0) and shapes that do not fit (e.g. channel-last maps)
  are refused with a :class:`~nemt.ops.ParameterError` (a ``ValueError``)
  naming the argument, the shape or values found and what is expected.
- ``abs`` (``|a|``) is taken first, then ``normalise`` per map (the other
  way round ``abs`` would do nothing after min-max; Quantus takes ``abs``
  after its normaliser, which for its default ``normalise_by_max`` gives the
  same numbers): ``"minmax"`` (METHODS.md: every map to [0, 1]; constant maps
  become 0), ``"max"`` (divide by the largest absolute value; Quantus'
  ``normalise_by_max`` but per map, all-zero maps unchanged), or ``None``.
- A map a metric is undefined for (a constant map has no maximum, no ranking,
  no spread) scores NaN, and one :class:`UndefinedMetricWarning` per call says
  how many (:func:`report_undefined`).
- Each metric registers itself where it is defined with the :func:`metric`
  decorator: its direction (``"higher"`` or ``"lower"`` is better; also
  ``fn.direction``) and its positional inputs by name (:data:`INPUTS`).
  :func:`registry`, :func:`get_metric` and :func:`available_metrics` read the
  registry; :data:`DIRECTIONS` is its read-only {name: direction} view.
- Per-map metrics run over slices of the batch (:func:`chunked`), serially in
  the calling thread; :func:`parallel_chunks` opts in to worker threads.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from nemt.errors import NemtError
from nemt.ops import (ParameterError, checked_input, gaussian_blur,  # noqa: F401
                      minmax, n_outputs_of, resolve_targets)  # (blur, min-max re-exported)

#: what a metric's positional arguments may be, by name (``inputs=`` of :func:`metric`)
INPUTS: dict[str, str] = {
    "maps": "the maps, (B, T, *spatial)",
    "gt": "ground-truth masks, (B, 1 or T, *spatial) bool",
    "gaze": "gaze (saliency) maps, (B, 1 or T, *spatial)",
    "fixations": "fixation maps (weights), (B, 1 or T, *spatial)",
    "model": "the model, a torch.nn.Module giving (B, outputs)",
    "x": "the model's inputs, (B, C, *spatial)",
    "target": "the output explained per sample, (B,) int",
    "explain": "a function explain(model, x, target) -> maps",
}


@dataclass(frozen=True)
class MetricSpec:
    """One registered metric: its ``name``, function, ``direction`` and positional ``inputs`` (names of :data:`INPUTS`).

    ``fn(*(values[k] for k in inputs), **params)`` gives one value per map, a ``(B, T)`` tensor (the
    randomisation tests: an ordered dict of them).

    A *dataset-level* metric (a maximum over a data set, e.g. MaxBoxAccV2's best threshold) also has
    ``statistic`` and ``reduce``: ``statistic(*inputs, **params)`` gives a (B, T, S) statistic per map,
    ``reduce(stats (N, S), **params)`` turns the statistics of the whole data set into per-map shares (N,)
    whose mean is the metric, and a dict of details. A caller that scores a data set in batches (the
    benchmark runner) pools the statistics and reduces once; ``fn`` does both over the maps it is given.
    """

    name: str
    fn: Callable = field(repr=False)
    direction: str
    inputs: tuple[str, ...]
    statistic: Callable | None = field(default=None, repr=False)
    reduce: Callable | None = field(default=None, repr=False)

    @property
    def dataset_level(self) -> bool:
        """Whether the metric's value is a statistic of the whole data set (see :attr:`statistic`)."""
        return self.reduce is not None

    def call_statistic(self, values: Mapping[str, Any], **params) -> torch.Tensor:
        """A dataset-level metric's per-map statistic (B, T, S), inputs taken by name from ``values``."""
        if self.statistic is None:
            raise NemtError(f"metric {self.name!r} is not dataset-level: it has no per-map statistic")
        missing = [k for k in self.inputs if k not in values]
        if missing:
            raise NemtError(f"metric {self.name!r} needs {', '.join(missing)}, which the caller does not give")
        return self.statistic(*(values[k] for k in self.inputs), **params)

    @property
    def needs_gt(self) -> bool:
        """Whether the metric compares the maps with ground truth (and gives NaN where there is none)."""
        return "gt" in self.inputs

    def call(self, values: Mapping[str, Any], **params) -> torch.Tensor:
        """Call the metric with its inputs taken by name from ``values`` and keyword ``params``."""
        missing = [k for k in self.inputs if k not in values]
        if missing:
            raise NemtError(f"metric {self.name!r} needs {', '.join(missing)}, which the caller does not give")
        return self.fn(*(values[k] for k in self.inputs), **params)


_REGISTRY: dict[str, MetricSpec] = {}


def metric(direction: str, *, inputs: Sequence[str], name: str | None = None,
           dataset: tuple[Callable, Callable] | None = None) -> Callable:
    """Decorator that registers a metric where it is defined.

    ``direction``: ``"higher"`` or ``"lower"`` (which is better; also set as
    ``fn.direction``); ``inputs``: the names (keys of :data:`INPUTS`) of the
    function's positional arguments in order, e.g. ``("maps", "gt")`` or
    ``("model", "x", "maps", "target")``; ``name``: default the function's
    name. A caller that has some inputs (the benchmark runner: maps, gt, model,
    x, target) can run every registered metric whose inputs it has, through
    :func:`get_metric` and :meth:`MetricSpec.call`, with no list of names.
    ``dataset=(statistic, reduce)`` marks a dataset-level metric (:class:`MetricSpec`).
    """
    if dataset is not None and (len(dataset) != 2 or not all(callable(f) for f in dataset)):
        raise ValueError("dataset must be a pair (statistic, reduce) of functions")
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be 'higher' or 'lower', got {direction!r}")
    if isinstance(inputs, str) or not inputs:
        raise ValueError(f"inputs must be a non-empty sequence of names, got {inputs!r}")
    inputs = tuple(inputs)
    bad = [k for k in inputs if k not in INPUTS]
    if bad:
        raise ValueError(f"unknown input(s) {bad}; known: {sorted(INPUTS)}")

    def deco(fn):
        key = name or fn.__name__
        old = _REGISTRY.get(key)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"metric {key!r} is already registered by {old.fn.__module__}.{old.fn.__qualname__}")
        fn.direction = direction
        _REGISTRY[key] = MetricSpec(key, fn, direction, inputs, *(dataset or (None, None)))
        return fn
    return deco


def registry() -> dict[str, MetricSpec]:
    """{name: :class:`MetricSpec`} of every registered metric, in registration order (a copy)."""
    return dict(_REGISTRY)


def get_metric(name: str) -> MetricSpec:
    """The :class:`MetricSpec` registered as ``name``; :class:`~nemt.errors.NemtError` if none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NemtError(f"unknown metric {name!r}; available: {sorted(_REGISTRY)}") from None


def available_metrics(inputs: Iterable[str] | None = None) -> list[str]:
    """Sorted names of the registered metrics; with ``inputs``, only those that need no other inputs."""
    have = None if inputs is None else set(inputs)
    return sorted(k for k, s in _REGISTRY.items() if have is None or set(s.inputs) <= have)


def unregister_metric(name: str) -> MetricSpec:
    """Remove ``name`` from the registry (for metrics defined temporarily, e.g. in tests); return its spec."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise NemtError(f"unknown metric {name!r}") from None


class _Directions(Mapping):
    """Read-only {name: direction} view of the registry (kept for callers of ``DIRECTIONS``)."""

    def __getitem__(self, name: str) -> str:
        return _REGISTRY[name].direction

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


#: {metric name: "higher" or "lower"}, derived from the registry (live, read-only)
DIRECTIONS: Mapping[str, str] = _Directions()


def normalise(maps: torch.Tensor, how: str | None, spatial_dims: int) -> torch.Tensor:
    """Per-map normalisation over the spatial axes (see the module docstring)."""
    if how is None or how is False:
        return maps
    if how == "minmax":
        return minmax(maps.flatten(-spatial_dims)).view_as(maps)
    if how == "max":
        m = maps.abs().flatten(-spatial_dims).amax(-1)
        m = torch.where(m > 0, m, torch.ones_like(m))
        return maps / m.view(*m.shape, *([1] * spatial_dims))
    if how == "sum":
        s = maps.abs().flatten(-spatial_dims).sum(-1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return maps / s.view(*s.shape, *([1] * spatial_dims))
    raise NemtError(f"normalise must be 'minmax', 'max', 'sum' or None, got {how!r}")


def order_values(maps: torch.Tensor, how: str | None, abs: bool) -> tuple[torch.Tensor, int]:
    """Values with the same ranking (ties included, up to rounding) as ``prepare_maps(maps, how, abs)``, (B, T, n).

    Min-max normalisation and division by a positive number do not change the
    order, so only ``abs`` (taken before normalising) is applied: rank-based
    metrics skip the normalisation pass.
    """
    maps = float_maps(maps)
    d = check_maps(maps)
    if how not in (None, False, "minmax", "max", "sum"):
        raise NemtError(f"normalise must be 'minmax', 'max', 'sum' or None, got {how!r}")
    v = maps.flatten(2)
    if abs:
        v = v.abs()
    return v, d


def kth_largest(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k-th largest value of each row of ``v`` (..., n), ``k`` (...) in 1..n.

    On CPU a selection per row (NumPy ``partition``, O(n)); elsewhere a sort.
    """
    shape = v.shape[:-1]
    n = v.shape[-1]
    rows = v.reshape(-1, n)
    kk = k.reshape(-1).clamp(1, n)
    if rows.device.type == "cpu":
        arr = rows.detach().contiguous().numpy()
        pos = (n - kk).cpu().numpy()
        out = np.empty(arr.shape[0], dtype=arr.dtype)
        for i in range(arr.shape[0]):
            out[i] = np.partition(arr[i], pos[i])[pos[i]]
        return torch.from_numpy(out).view(shape)
    srt = torch.sort(rows, dim=-1, descending=True).values
    return srt.gather(1, (kk - 1).view(-1, 1)).view(shape)


def top_k_hits(v: torch.Tensor, m: torch.Tensor, k: torch.Tensor, exclude_zero: bool = False) -> torch.Tensor:
    """How many of the ``k`` highest values of each row of ``v`` (R, n) fall where ``m`` (R, n) is True, (R,).

    Ties at the k-th value are broken by position (the first ones count), as a
    stable descending sort would; ``exclude_zero`` never counts pixels whose
    value is 0. Rows with k = 0 give 0. Uses a selection, not a sort.
    """
    k = k.reshape(-1)
    tau = kth_largest(v, k).to(v.device)
    ge = v >= tau[:, None]
    hits = count(m & ge)
    n_ge = count(ge)
    over = (n_ge > k).nonzero().flatten()
    if over.numel():  # ties at tau: keep only the first (k - #above) tied pixels
        vr, mr, tr = v[over], m[over], tau[over, None]
        above = vr > tr
        tied = vr == tr
        need = (k[over] - count(above))[:, None]
        take = tied & (tied.cumsum(-1) <= need)
        hits[over] = count(mr & (above | take))
    if exclude_zero:
        zero_tau = tau == 0
        if zero_tau.any():  # the top k end in zeros: only the positive values can hit
            hits = torch.where(zero_tau, count(m & (v > 0)), hits)
        neg_tau = tau < 0
        if neg_tau.any():  # zeros lie inside the top k (signed maps): take them out
            hits = torch.where(neg_tau, hits - count(m & (v == 0)), hits)
    return torch.where(k > 0, hits, torch.zeros_like(hits))


def as_tensor(a: Any) -> Any:
    """A NumPy array (or a list or tuple of numbers) as a tensor, anything else as it is (an array with negative
    strides, e.g. from ``np.flip``, is copied first: torch cannot view it)."""
    if isinstance(a, np.ndarray):
        return torch.as_tensor(np.ascontiguousarray(a))
    if isinstance(a, (list, tuple)) and len(a) and not torch.is_tensor(a[0]):
        return torch.as_tensor(np.ascontiguousarray(np.asarray(a)))
    return a


def float_maps(maps: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(maps):
        maps = torch.as_tensor(as_tensor(maps))
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


def check_finite(maps: torch.Tensor, name: str = "maps") -> None:
    """A clear error when (B, T, ...) ``maps`` (or gaze maps, fixation maps, masks: ``name``) hold NaN or inf."""
    bad = ~torch.isfinite(maps)
    if bad.any():
        per_map = bad.flatten(2).any(2) if bad.ndim > 2 else bad.reshape(bad.shape[0], -1).any(1, keepdim=True)
        which = per_map.nonzero()[:5].tolist()
        raise ParameterError(f"{name} hold {int(bad.sum())} NaN or infinite values, in {int(per_map.sum())} "
                             f"of {per_map.numel()} maps (first [image, target]: {which}); "
                             "a metric of such a map means nothing")


def check_not_empty(maps: torch.Tensor, name: str = "maps") -> None:
    """A clear error for a batch with no map (B = 0 or T = 0) or maps without pixels: a metric of nothing would
    otherwise be an empty tensor, a NaN mean or an error from deep inside."""
    if maps.ndim >= 2 and (maps.shape[0] == 0 or maps.shape[1] == 0):
        raise ParameterError(f"{name} hold no map (shape {tuple(maps.shape)}): a metric needs at least one "
                             f"image and one target, (B, T, *spatial) with B, T >= 1")
    if maps.numel() == 0:
        raise ParameterError(f"{name} have no pixels (shape {tuple(maps.shape)}): every spatial axis needs at "
                             "least one pixel")


def check_maps(maps: torch.Tensor) -> int:
    """The maps' spatial rank; a clear error for another rank, an empty batch or NaN/inf values (a NaN map
    would score NaN, which every summary reads as "no lesion, excluded", or a pointing-game miss)."""
    if maps.ndim not in (3, 4, 5):
        raise ParameterError(f"maps must be (B, T, L), (B, T, H, W) or (B, T, D, H, W), got shape "
                             f"{tuple(maps.shape)}")
    check_not_empty(maps)
    if maps.ndim == 3 and maps.shape[1] == maps.shape[2] >= 8:
        # (B, H, W) images without the target axis read as H maps of 1D signals of length W: scores per row
        warnings.warn(f"maps of shape {tuple(maps.shape)} are read as (B, T, L): {maps.shape[1]} maps of 1D "
                      f"signals each; for one 2D map per image give (B, 1, H, W) (maps[:, None], and the masks "
                      "too)", UserWarning, stacklevel=4)
    check_finite(maps)
    return maps.ndim - 2


def layout_hint(name: str, shape: Sequence[int], spatial: Sequence[int], wants: str = "(B, T, *spatial)") -> str:
    """A hint for a tensor ``name`` whose shape does not fit the other inputs' ``spatial`` size: when it is
    channel-last ((B, *spatial, 1) or (B, *spatial, C)), how to make it channel-first; else nemt's layout."""
    shape, spatial = tuple(shape), tuple(spatial)
    d = len(spatial)
    verb = "look" if name.endswith("s") else "looks"
    if len(shape) == d + 2 and shape[1:-1] == spatial and shape[1] != 1:
        perm = ", ".join(["0", str(d + 1)] + [str(i) for i in range(1, d + 1)])
        return (f"; {name} {verb} channel-last (B, *spatial, {shape[-1]}): nemt wants channel-first {wants}; "
                f"use {name}.movedim(-1, 1) (or .permute({perm}))")
    return ("; nemt wants channel-first (B, T, *spatial) maps, (B, 1 or T, *spatial) masks and gaze maps, "
            "(B, C, *spatial) x")


def prepare_maps(maps: torch.Tensor, how: str | None, abs: bool) -> tuple[torch.Tensor, int]:
    """(Optionally) take |.|, then normalise; return the maps flattened to (B, T, n) and the spatial rank."""
    maps = float_maps(maps)
    d = check_maps(maps)
    a = normalise(maps.abs() if abs else maps, how, d)
    return a.flatten(2), d


def expand_masks(masks: torch.Tensor, maps: torch.Tensor, name: str = "masks", dtype=torch.bool,
                 nonnegative: bool = False) -> torch.Tensor:
    """``(B, 1 or T, *spatial)`` (or ``(B, *spatial)``) to ``(B, T, n)`` flattened, with ``dtype``; NaN/inf refused.

    Binary masks (``dtype=torch.bool``) must hold 0/1 (False/True), or 0/255 as 8-bit images store them: a
    label map (other values, e.g. -1 or 2) is refused, not read as "every non-zero label is lesion".
    ``nonnegative``: negative values are refused (gaze densities, fixation weights)."""
    if not torch.is_tensor(masks):
        masks = torch.as_tensor(as_tensor(masks))
    masks = masks.to(maps.device)
    given = tuple(masks.shape)
    if masks.ndim == maps.ndim - 1:
        masks = masks.unsqueeze(1)
    if masks.ndim != maps.ndim or masks.shape[0] != maps.shape[0] or masks.shape[2:] != maps.shape[2:] \
            or masks.shape[1] not in (1, maps.shape[1]):
        if maps.ndim >= 3 and tuple(maps.shape[1:-1]) == given[-(maps.ndim - 2):]:  # the maps are channel-last
            raise ParameterError(f"maps {tuple(maps.shape)} do not fit {name} {given}"
                                 f"{layout_hint('maps', maps.shape, given[-(maps.ndim - 2):])}")
        raise ParameterError(f"{name} must be (B, 1 or T, *spatial) matching maps {tuple(maps.shape)}, "
                             f"got {given}{layout_hint(name, given, maps.shape[2:], '(B, 1 or T, *spatial)')}")
    if masks.is_floating_point() or masks.is_complex():
        check_finite(masks, name)
    if dtype == torch.bool and masks.is_floating_point():
        if ((masks > 0) & (masks < 1)).any():  # a soft mask: != 0 would make its whole background lesion
            raise ParameterError(f"{name} hold values strictly between 0 and 1 (a soft mask); give a binary "
                                 "mask, e.g. masks > 0.5")
    if dtype == torch.bool and masks.dtype != torch.bool and not masks.is_complex():
        if ((masks != 0) & (masks != 1)).any() and ((masks != 0) & (masks != 255)).any():
            # a label map: != 0 made every label (and -1, "ignore") lesion
            found = torch.unique(masks[(masks != 0) & (masks != 1)])[:5].tolist()
            raise ParameterError(f"{name} hold values other than 0 and 1 (e.g. {found}): give a binary mask "
                                 "(0/1, False/True, or 0/255 as 8-bit images store it), for a label map "
                                 "masks == label")
    if nonnegative and not masks.is_complex() and masks.dtype != torch.bool:
        neg = masks < 0
        if neg.any():
            per_map = neg.flatten(2).any(2)
            raise ParameterError(f"{name} hold {int(neg.sum())} negative values, in {int(per_map.sum())} of "
                                 f"{per_map.numel()} maps: {name} must be >= 0 (a density or fixation weights)")
    masks = masks.bool() if dtype == torch.bool else masks.to(dtype)
    return masks.expand(-1, maps.shape[1], *masks.shape[2:]).flatten(2)


def check_x(model, x: Any) -> torch.Tensor:
    """The model's inputs ``x`` as a detached floating tensor (B, C, *spatial) in the model's dtype, or a clear
    error (:func:`nemt.ops.checked_input`, as the explainers check theirs)."""
    return checked_input(x, model, use="metric")


def check_x_fits(x: torch.Tensor, maps: torch.Tensor) -> None:
    """A clear error when ``x`` (B, C, *spatial) and ``maps`` (B, T, *spatial) differ in batch or spatial size,
    naming a channel-last tensor and its fix."""
    if x.ndim == maps.ndim and x.shape[0] == maps.shape[0] and x.shape[2:] == maps.shape[2:]:
        return
    if maps.ndim == x.ndim and tuple(maps.shape[1:-1]) == tuple(x.shape[2:]):
        hint = layout_hint("maps", maps.shape, x.shape[2:])
    elif x.ndim == maps.ndim and tuple(x.shape[1:-1]) == tuple(maps.shape[2:]):
        hint = layout_hint("x", x.shape, maps.shape[2:], "(B, C, *spatial)")
    else:
        hint = "; nemt wants channel-first x (B, C, *spatial) and maps (B, T, *spatial)"
    raise ParameterError(f"x {tuple(x.shape)} and maps {tuple(maps.shape)} must share batch and spatial size{hint}")


def checked_targets(target: Any, model, x: torch.Tensor) -> torch.Tensor:
    """``target`` as (B, T) output indices (:func:`nemt.ops.resolve_targets`), refused when out of range of the
    model's outputs (a plain module's are counted on one image)."""
    return resolve_targets(target, model, x, n_outputs=n_outputs_of(model, x=x[:1]))  # a card's count, no pass


class UndefinedMetricWarning(UserWarning):
    """Some maps got NaN because the metric is undefined for them (e.g. a correlation with a constant map)."""


def constant_rows(v: torch.Tensor) -> torch.Tensor:
    """True where a row of ``v`` (..., n) holds one value (a constant, "collapsed" map)."""
    return v.amax(-1) == v.amin(-1)


def warn_undefined(metric_name: str, n_nan: int, total: int, reasons: Sequence[str], stacklevel: int = 3,
                   unit: str = "maps") -> None:
    """One :class:`UndefinedMetricWarning` per call naming how many maps scored NaN, and why."""
    if n_nan <= 0:
        return
    why = "; ".join(r for r in reasons if r)
    spec = _REGISTRY.get(metric_name)
    if spec is not None and {"gt", "gaze", "fixations"} & set(spec.inputs):
        # by name, summarise reads such a metric's NaN as "no ground truth (or gaze)": say how to count them apart
        tail = (f"nemt.metrics.summarise(values, metric={metric_name!r}) counts this metric's NaN as excluded "
                "(no ground truth): pass undefined= (a boolean mask of these maps) to count them as undefined")
    else:
        tail = (f"nemt.metrics.summarise(values, metric={metric_name!r}) counts them as undefined, "
                "not as excluded")
    warnings.warn(f"{metric_name}: {n_nan} of {total} {unit} score NaN (undefined{': ' + why if why else ''}); "
                  f"{tail}", UndefinedMetricWarning, stacklevel=stacklevel)


#: where :func:`report_undefined` collects, inside a :func:`chunked` call (None: say it at once)
_UNDEFINED_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar("nemt_undefined_sink", default=None)

#: the reason a constant map is undefined for a localisation or gaze metric
CONSTANT_MAPS = "constant (collapsed) maps, all pixels equal"


def report_undefined(metric_name: str, cond: torch.Tensor, reason: str = CONSTANT_MAPS) -> None:
    """Say that the maps where ``cond`` (B, T) holds score NaN because the metric is undefined for them.

    Inside a :func:`chunked` metric the reports of its slices are collected and said once per call, one
    :class:`UndefinedMetricWarning` counting the whole batch (named after the called metric); elsewhere at once.
    """
    n = int(cond.sum())
    if n == 0:
        return
    sink = _UNDEFINED_SINK.get()
    if sink is not None:
        sink.append((reason, n))
        return
    warn_undefined(metric_name, n, cond.numel(), [f"{n} {reason}"], stacklevel=4)


def nan_where(cond: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` with NaN where ``cond`` holds."""
    return torch.where(cond, torch.full_like(values, float("nan")), values)


def descending_order(a: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last axis in descending order; ties by position (stable)."""
    return torch.sort(a, dim=-1, descending=True, stable=True).indices


def rankdata(a: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based, ties share their mean rank, as scipy.stats.rankdata) along the last axis."""
    a = a.double()
    sorted_a, order = torch.sort(a, dim=-1, stable=True)
    n = a.shape[-1]
    new_group = torch.ones_like(sorted_a, dtype=torch.bool)
    new_group[..., 1:] = sorted_a[..., 1:] != sorted_a[..., :-1]
    gid = torch.cumsum(new_group.long(), dim=-1) - 1  # group index of each sorted position
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=a.device).expand_as(sorted_a)
    total = torch.zeros_like(sorted_a).scatter_add_(-1, gid, pos)
    count = torch.zeros_like(sorted_a).scatter_add_(-1, gid, torch.ones_like(pos))
    avg_sorted = torch.gather(total / count.clamp_min(1), -1, gid)
    return torch.empty_like(avg_sorted).scatter_(-1, order, avg_sorted)


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Pearson correlation along the last axis (float64); NaN where either side is constant (eps=0)."""
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    num = (a * b).sum(-1)
    den = (a.pow(2).sum(-1) * b.pow(2).sum(-1)).sqrt()
    if eps > 0:
        return num / den.clamp_min(eps)
    return num / den


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last axis (average ranks for ties, as scipy)."""
    return pearson(rankdata(a), rankdata(b))


def sort_values(v: torch.Tensor) -> torch.Tensor:
    """Values of each row sorted ascending (NumPy's vectorised sort on CPU, ``torch.sort`` elsewhere)."""
    if v.device.type == "cpu":
        return torch.from_numpy(np.sort(v.detach().contiguous().numpy(), axis=-1))
    return torch.sort(v, dim=-1).values


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of (..., n) tensors without an (..., n) temporary (batched matmul)."""
    shape = a.shape[:-1]
    n = a.shape[-1]
    a2 = a.reshape(-1, 1, n)
    b2 = b.expand_as(a).reshape(-1, n, 1)
    return torch.bmm(a2, b2).view(shape)


CHUNK_ELEMENTS = 1 << 20  # ~4 MB of float32 per chunk: temporaries stay in cache and are reused


_CHUNK_WORKERS: contextvars.ContextVar[int] = contextvars.ContextVar("nemt_chunk_workers", default=0)
_THREADS_LOCK = threading.Lock()
_THREADS_USERS = 0
_THREADS_SAVED = 1


@contextlib.contextmanager
def parallel_chunks(workers: int | None = None):
    """Opt in, within this ``with`` block and this thread, to spreading :func:`chunked` slices over worker threads.

    For entry points (benchmark scripts, the benchmark runner when asked),
    not for library code: while a chunked metric runs its slices on CPU over
    ``workers`` threads (default: ``torch.get_num_threads()`` on entry), each
    worker runs single-threaded torch operations, so torch's intra-op thread
    count is set to 1 *process-wide* for the duration of that call and then
    restored (one parallel region per small operation would otherwise make
    every operation wait for all intra-op threads, which costs milliseconds
    each as soon as another process holds a core). Overlapping calls from
    several threads share that setting (the first saves it, the last
    restores it), but other threads' torch work runs single-threaded
    meanwhile, so a multi-threaded program (a web service) should not use
    this. ``workers`` <= 1 runs the slices serially (the default outside this
    block). Nested blocks: the innermost wins. Results equal, bit for bit,
    serial slices at one torch thread; serial slices with several intra-op
    threads may differ in the last bits of float sums, as any torch reduction.
    """
    n = torch.get_num_threads() if workers is None else int(workers)
    token = _CHUNK_WORKERS.set(max(0, n))
    try:
        yield
    finally:
        _CHUNK_WORKERS.reset(token)


def chunk_workers() -> int:
    """Worker threads that :func:`chunked` uses here and now (0 or 1: serial; see :func:`parallel_chunks`)."""
    return _CHUNK_WORKERS.get()


@contextlib.contextmanager
def _single_threaded_ops():
    global _THREADS_USERS, _THREADS_SAVED
    with _THREADS_LOCK:
        if _THREADS_USERS == 0:
            _THREADS_SAVED = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_USERS += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS -= 1
            if _THREADS_USERS == 0:
                torch.set_num_threads(_THREADS_SAVED)


def chunked(fn: Callable) -> Callable:
    """Run a per-map metric ``fn(maps, *tensors, **kw) -> (B, T)`` over slices of the batch and concatenate.

    Slices hold about :data:`CHUNK_ELEMENTS` map values, so the few passes a
    metric makes over its temporaries run in cache and reuse memory instead of
    page-faulting fresh allocations (several times faster on CPU for
    (256, 1, 224, 224) maps); results are identical to one call. Positional
    tensors whose first axis is the batch are sliced alongside (NumPy arrays
    are made tensors first, so they are sliced too). The maps a metric is
    undefined for (:func:`report_undefined`) are said once per call.

    By default the slices run one after another in the calling thread, with
    torch's thread settings untouched (safe in a multi-threaded caller).
    Inside :func:`parallel_chunks` (an entry point's explicit choice) they
    are spread over worker threads on CPU, each single-threaded (the same
    results as serial slices at one torch thread).
    """
    @functools.wraps(fn)
    def wrapper(maps, *args, **kw):
        # NumPy masks, gaze maps (and maps) become tensors first: a slice must cut them alongside the maps
        maps = as_tensor(maps)
        args = [as_tensor(a) for a in args]
        sink: list = []
        token = _UNDEFINED_SINK.set(sink)
        try:
            out = _run_chunks(fn, maps, args, kw)
        finally:
            _UNDEFINED_SINK.reset(token)
        if sink:  # the maps the metric is undefined for, said once for the whole call
            reasons: dict[str, int] = {}
            for reason, n in sink:
                reasons[reason] = reasons.get(reason, 0) + n
            warn_undefined(fn.__name__, sum(reasons.values()), out.numel(),
                           [f"{n} {r}" for r, n in reasons.items()], stacklevel=3)
        return out
    return wrapper


def _run_chunks(fn: Callable, maps: Any, args: list, kw: dict) -> torch.Tensor:
    if not torch.is_tensor(maps) or maps.ndim < 3 or maps.numel() == 0:  # no map: fn's own checks say so
        return fn(maps, *args, **kw)
    b = maps.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, maps[0].numel()))
    if step >= b:
        return fn(maps, *args, **kw)

    def run(i):
        sl = [a[i:i + step] if torch.is_tensor(a) and a.ndim > 0 and a.shape[0] == b else a for a in args]
        return fn(maps[i:i + step], *sl, **kw)

    starts = range(0, b, step)
    workers = min(_CHUNK_WORKERS.get(), len(starts))
    if maps.device.type != "cpu" or workers <= 1:
        return torch.cat([run(i) for i in starts])
    contexts = [contextvars.copy_context() for _ in starts]  # the caller's (its undefined-map sink) per slice
    with _single_threaded_ops(), ThreadPoolExecutor(workers) as pool:
        outs = list(pool.map(lambda c, i: c.run(run, i), contexts, starts))
    return torch.cat(outs)


def count(m: torch.Tensor) -> torch.Tensor:
    """Number of True values along the last axis (int64), via a faster int32 reduction."""
    return m.sum(-1, dtype=torch.int32).long()
