"""What every explainer shares: the protocol, the target convention, map normalisation, the registry.

An explainer is built from a :class:`~nemt.models.Classifier` and answers
``explain(x, target=...) -> (B, T, *spatial)`` maps at input resolution, one
map per requested target. ``target`` may be

- ``None``: the method's default (multi-class: the predicted class;
  multi-label and regression: every output);
- ``"all"``: every output (each label of a multi-label model);
- ``"predicted"``: the highest-scoring output of each sample;
- an int or a label name: that output for every sample;
- a list of ints or names: those outputs, T = len(list);
- a tensor of shape (B,) (one target per sample) or (B, T).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nemt.errors import NemtError

Target = Any


def resolve_targets(target: Target, model: nn.Module, x: torch.Tensor | None = None, *,
                    n_outputs: int | None = None, label_names: Sequence[str] | None = None,
                    task: str | None = None, batch_size: int | None = None,
                    outputs: torch.Tensor | None = None) -> torch.Tensor:
    """Turn any accepted ``target`` into a (B, T) int64 tensor of output indices.

    ``model`` supplies ``task``/``label_names`` when it is a Classifier;
    ``x`` or ``outputs`` (the model's (B, n_outputs) outputs) serve
    ``"predicted"``.
    """
    card = getattr(model, "card", None)
    task = task or (card.task if card else "multiclass")
    label_names = list(label_names or (card.label_names if card else []))
    if n_outputs is None:
        n_outputs = (1 if task == "regression" else len(label_names)) if card or label_names else None
    b = batch_size if batch_size is not None else (x.shape[0] if x is not None else outputs.shape[0])
    dev = x.device if x is not None else (outputs.device if outputs is not None else torch.device("cpu"))

    def index(t) -> int:
        if isinstance(t, str):
            if t not in label_names:
                raise NemtError(f"target {t!r} is not a label of the model; labels are {label_names}")
            return label_names.index(t)
        t = int(t)
        if n_outputs is not None and not 0 <= t < n_outputs:
            raise NemtError(f"target {t} out of range: the model has {n_outputs} outputs")
        return t

    if target is None:
        target = "predicted" if task == "multiclass" else "all"
    if isinstance(target, str) and target == "all":
        if n_outputs is None:
            raise NemtError("target='all' needs the number of outputs (a Classifier or n_outputs=)")
        return torch.arange(n_outputs, device=dev).expand(b, n_outputs).clone()
    if isinstance(target, str) and target == "predicted":
        if outputs is None:
            if x is None:
                raise NemtError("target='predicted' needs the input x")
            with torch.no_grad():
                outputs = model(x)
        return outputs.argmax(dim=1, keepdim=True).to(dev)
    if torch.is_tensor(target):
        t = target.to(dev).long()
        if t.ndim == 0:
            t = t.expand(b)
        if t.ndim == 1:
            t = t[:, None]
        if t.ndim != 2 or t.shape[0] != b:
            raise NemtError(f"target tensor must be (B,) or (B, T) with B={b}, got {tuple(target.shape)}")
        if n_outputs is not None and ((t < 0) | (t >= n_outputs)).any():
            raise NemtError(f"target indices out of range 0..{n_outputs - 1}")
        return t
    if isinstance(target, (list, tuple)):
        idx = [index(t) for t in target]
        return torch.tensor(idx, device=dev).expand(b, len(idx)).clone()
    return torch.full((b, 1), index(target), dtype=torch.long, device=dev)


def normalise_maps(maps: torch.Tensor, spatial_dims: int, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise each map of (…, *spatial) to [0, 1] over its spatial axes (constant maps -> 0)."""
    flat = maps.flatten(start_dim=-spatial_dims)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    out = (flat - lo) / (hi - lo).clamp_min(eps)
    return out.view_as(maps)


def baseline_image(x: torch.Tensor, baseline: float | str) -> torch.Tensor | float:
    """A number, or ``"min"`` (each image's minimum, the darkest value) or ``"mean"``, as a (B, C, 1…) tensor."""
    if not isinstance(baseline, str):
        return float(baseline)
    keep = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    if baseline == "min":
        return x.flatten(1).min(dim=1).values.view(-1, *(1,) * (x.ndim - 1)).expand(keep).contiguous()
    if baseline == "mean":
        return x.flatten(2).mean(dim=2).view(keep)
    raise NemtError(f"baseline must be a number, 'min' or 'mean', got {baseline!r}")


_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resize_linear(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, *grid) -> (B, C, *size) by linear, bilinear or trilinear interpolation (by the number of
    spatial axes, ``align_corners=False``: each value a convex combination of its neighbours, so maps stay in
    their range); ``t`` itself when it already has that size."""
    size = tuple(int(s) for s in size)
    if tuple(t.shape[2:]) == size:
        return t
    return F.interpolate(t, size=size, mode=_LINEAR_MODES[t.ndim - 2], align_corners=False)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """The model's parameters without ``requires_grad`` inside the block (no weight gradients are computed
    while gradients flow to inputs or masks), each restored to the caller's flag after, also on error."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class Explainer:
    """Base of all explainers: holds the model (frozen, eval mode) and the device."""

    name = "explainer"

    def __init__(self, model: nn.Module, device: str | torch.device | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else _device_of(model)
        self.model.eval()

    @property
    def spatial_dims(self) -> int:
        card = getattr(self.model, "card", None)
        if card is None:
            raise NemtError("the model has no card; wrap it with Classifier.from_module")
        return card.spatial_dims

    def targets(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        return resolve_targets(target, self.model, x)

    def explain(self, x: torch.Tensor, target: Target = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


_REGISTRY: dict[str, Callable[..., Explainer]] = {}


def register(name: str) -> Callable:
    """Class decorator: make an explainer available by ``name`` in :func:`get_explainer`."""
    def deco(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def available() -> list[str]:
    """Names accepted by :func:`get_explainer`."""
    return sorted(_REGISTRY)


def get_explainer(name: str, model: nn.Module, **params: Any) -> Explainer:
    """Build an explainer by name, e.g. ``get_explainer("gradcam", clf)``."""
    if name not in _REGISTRY:
        raise NemtError(f"unknown explainer {name!r}; available: {available()}")
    return _REGISTRY[name](model, **params)
