"""Finding and reading a model's internal stages with forward hooks.

``find_stages`` runs one dummy forward pass and, for each spatial resolution
below the input's, keeps the shallowest module whose output comes last at
that resolution: for MONAI's ResNet that is ``act`` (/2), ``layer1`` … ``layer4``
(/4 … /32); for DenseNet-121 the last module of each dense stage; for any
CNN built of stages, its stage outputs. Give ``names`` explicitly for models
where this guess is not what you want.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nemt.errors import NemtError
from nemt.ops import ArgumentTypeError, ParameterError, probe_input


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside a Classifier (its module names are what users see)."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    """A layer given by name (as in ``model.net`` for a Classifier) or as the module object itself, as its name."""
    if isinstance(layer, str):
        return layer
    if isinstance(layer, nn.Module):
        for name, mod in _unwrap(model).named_modules():
            if mod is layer and name:
                return name
        raise ParameterError("the layer module given is not a submodule of the model")
    raise ArgumentTypeError(f"a layer is a module name or an nn.Module, got {type(layer).__name__}")


@torch.no_grad()
def find_stages(model: nn.Module, input_shape: Sequence[int], max_stages: int = 5, min_cells: int = 2) -> list[str]:
    """Names (in ``model.net`` if it is a Classifier) of the deepest-resolution stage outputs.

    ``input_shape`` is (C, *spatial). Returns at most ``max_stages`` names,
    shallowest first, of stages with at least ``min_cells`` cells along every
    spatial axis (2 by default: a 1-cell output is no longer spatial).
    """
    net = _unwrap(model)
    spatial = tuple(input_shape[1:])
    order: list[tuple[str, tuple[int, ...], int]] = []
    hooks = []
    for name, mod in net.named_modules():
        if not name:
            continue

        def hook(m, inp, out, name=name):
            if torch.is_tensor(out) and out.ndim == len(spatial) + 2:
                order.append((name, tuple(out.shape[2:]), int(out.shape[1])))
        hooks.append(mod.register_forward_hook(hook))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(probe_input(net, input_shape))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    # per resolution: the last output among the shallowest modules (a reused activation deep
    # inside a block can fire at a stage's resolution, but the stage container is shallower)
    last: dict[tuple[int, ...], tuple[int, str]] = {}
    for name, shape, _ in order:
        if shape != spatial and all(s >= min_cells for s in shape) and all(s <= i for s, i in zip(shape, spatial)):
            depth = name.count(".")
            if shape not in last or depth <= last[shape][0]:
                last[shape] = (depth, name)
    if not last:
        raise NemtError(f"found no downsampled convolutional stages with at least {min_cells} cells per axis; "
                        "pass the layer names explicitly")
    by_size = sorted(last.items(), key=lambda kv: -kv[0][0])  # shallow (large) first
    return [name for _, (_, name) in by_size][:max_stages]


class FeatureTap:
    """Capture the outputs of named submodules during a forward pass.

    >>> with FeatureTap(net, ["layer1", "layer2"]) as tap:  # the hooks are removed on leaving
    ...     _ = net(x)
    >>> tap.features["layer1"]
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        mods = dict(_unwrap(model).named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise NemtError(f"layers {missing} not found in the model; some names are "
                            f"{[n for n in mods if n][:12]}")
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self._hooks = [mods[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(m, inp, out):
            self.features[name] = out
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def tapped_output(tap: FeatureTap, name: str, shown: str, x: torch.Tensor, spatial: bool = True) -> torch.Tensor:
    """The output of module ``name`` that ``tap`` captured while the model ran on ``x``, or a ParameterError
    naming the layer as the user gave it (``shown``): a layer that never ran (a module the forward pass does
    not call), an output that is not a tensor of x's batch, or, with ``spatial``, not (B, C, *spatial) with
    x's number of spatial axes (a linear layer, a flattened output)."""
    if name not in tap.features:
        raise ParameterError(f"layer {shown!r} never runs in the model's forward pass (no output to read): "
                             "choose a layer the model calls")
    out = tap.features[name]
    if not torch.is_tensor(out):
        raise ParameterError(f"layer {shown!r} outputs a {type(out).__name__}, not a tensor: choose a layer that "
                             "outputs one tensor")
    if out.ndim < 2 or out.shape[0] != x.shape[0] or (spatial and out.ndim != x.ndim):
        need = f"(B, C, *spatial) with {x.ndim - 2} spatial axes" if spatial else "(B, ...)"
        raise ParameterError(f"layer {shown!r} outputs shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; "
                             f"it must be {need}: choose another layer")
    return out


@torch.no_grad()
def output_leaf(model: nn.Module, layer: str, input_shape: Sequence[int]) -> str | None:
    """The leaf module inside ``layer`` whose output *is* the output of ``layer`` (same tensor), or None.

    A stage's output tensor is usually made by its last leaf module (e.g. the
    activation ending a residual block); hooking that leaf gives the same
    features in a copy of the model where the stage container no longer runs
    (a ``torch.fx`` graph calls leaf modules only). None when the stage ends in
    a functional operation (an addition outside any module) or is a leaf itself.
    """
    net = _unwrap(model)
    mods = dict(net.named_modules())
    if layer not in mods:
        raise NemtError(f"layer {layer!r} not found in the model")
    leaves = {n: m for n, m in mods.items() if n.startswith(layer + ".") and not any(True for _ in m.children())}
    if not leaves:
        return None
    calls: list[tuple[str, torch.Tensor]] = []  # in execution order (in-place ops share tensors)
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: calls.append((n, o))) for n, m in leaves.items()]
    hooks.append(mods[layer].register_forward_hook(lambda m, i, o: calls.append(("", o))))
    was_training = net.training
    net.eval()
    try:
        net(probe_input(net, input_shape))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    out = next((o for n, o in reversed(calls) if n == ""), None)
    before = calls[:max(i for i, (n, _) in enumerate(calls) if n == "")] if out is not None else []
    hits = [n for n, o in before if o is out]
    return hits[-1] if hits else None
