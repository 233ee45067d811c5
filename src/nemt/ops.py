"""The vocabulary shared by explainers and metrics: one name and one implementation per idea.

- **targets**: :func:`resolve_targets` turns any accepted ``target`` into a
  (B, T) tensor of output indices (see :data:`TARGET_HELP`);
- **model facts**: :func:`task_of`, :func:`label_names_of`, :func:`n_outputs_of`
  read a :class:`~nemt.models.Classifier`'s card when there is one and the
  model's outputs otherwise, so that any ``nn.Module`` works;
- **scores**: :func:`output_score`, the quantity a method watches
  (``"logit"``, ``"prob"``, ``"one_minus_prob"``);
- **fills**: :func:`fill_values`, what replaces deleted pixels;
- **blur**: :func:`gaussian_blur`;
- **resizing**: :func:`resize_linear`;
- **normalisation**: :func:`minmax` and :func:`normalise_maps` (per map,
  over the spatial axes), :func:`scale_signed`, and :func:`postprocess`,
  the one step every explainer ends with;
- **the caller's state**: :func:`evaluating`, :func:`frozen_parameters` and
  :func:`seeded` change the model's flags or the global RNG inside a block
  and restore them after, also on error.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nemt.errors import NemtError


class ParameterError(NemtError, ValueError):
    """A value that a method or a metric does not accept (also a ``ValueError``)."""


class ArgumentTypeError(NemtError, TypeError):
    """An argument of the wrong type (also a ``TypeError``)."""


Target = Any
TARGET_HELP = """``target`` may be
- ``None``: the method's default (multi-class: the predicted class; multi-label and regression: every output);
- ``"all"``: every output (each label of a multi-label model);
- ``"predicted"``: the highest-scoring output of each sample;
- an int or a label name: that output for every sample;
- a list of ints or names: those outputs, T = len(list);
- a tensor of shape (B,) (one target per sample) or (B, T).
A label named ``"all"`` or ``"predicted"`` is refused as a bare string (which of the two is meant?): give its
index or ``["all"]``."""


# ---------------------------------------------------------------------------- model facts

def task_of(model: nn.Module) -> str:
    """``"multiclass"``, ``"multilabel"`` or ``"regression"``: the card's, or multi-class for a plain module."""
    card = getattr(model, "card", None)
    return card.task if card is not None else "multiclass"


def label_names_of(model: nn.Module) -> list[str]:
    """The card's label names, or none for a plain module."""
    card = getattr(model, "card", None)
    return list(card.label_names) if card is not None else []


def is_whole_number(v: Any) -> bool:
    """An int (Python's or NumPy's), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_finite_number(v: Any) -> bool:
    """A finite real number (Python's or NumPy's), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def is_count(v: Any, least: int = 1) -> bool:
    """A whole number (an int, or a float without a fraction; not a bool) of at least ``least``."""
    whole = is_whole_number(v) or (is_finite_number(v) and v == int(v))
    return bool(whole and v >= least)


def count_param(value: Any, name: str, least: int = 1) -> int:
    """``value`` as an int (see :func:`is_count`), or a ParameterError naming ``name``."""
    if not is_count(value, least):
        raise ParameterError(f"{name} must be a whole number >= {least}, got {value!r}")
    return int(value)


def nonfinite_problem(x: torch.Tensor) -> str | None:
    """``"N NaN or infinite values, in k of its B images"`` for a batch ``x`` (B, ...) holding any, else None."""
    bad = ~torch.isfinite(x)
    if not bad.any():
        return None
    return f"{int(bad.sum())} NaN or infinite values, in {int(bad.flatten(1).any(1).sum())} of its {x.shape[0]} images"


#: the words of PyTorch's errors for an input of the wrong rank or channel count (convolutions, linear layers)
_SHAPE_ERRORS = ("expected input", "channels", "expected 2d", "expected 3d", "expected 4d", "expected 5d",
                 "cannot be multiplied", "size mismatch", "must match the size")


@contextmanager
def blame_shape(x: torch.Tensor):
    """A model's own error about its input's shape, re-raised naming x's shape and nemt's layout."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not any(w in text.lower() for w in _SHAPE_ERRORS):
            raise
        raise ParameterError(f"the model cannot take x of shape {tuple(x.shape)}: {text.splitlines()[0]} "
                             "(nemt passes x to the model as given: channel-first (B, C, *spatial), the model's "
                             "channels and rank)") from e


def checked_input(x: Any, model: nn.Module, device: torch.device | None = None, use: str = "map") -> torch.Tensor:
    """``x`` as a detached floating tensor (B, C, *spatial) in the model's dtype (a float64 array from NumPy meets
    a float32 model; the caller's x is left as it is), on ``device`` if given, or one clear error naming x: not
    a tensor, another rank, integers, no image, NaN/inf ("a {use} of such an input means nothing")."""
    if not torch.is_tensor(x):
        raise ArgumentTypeError(f"x must be a torch.Tensor (B, C, *spatial), got {type(x).__name__}")
    if x.ndim < 3 or x.ndim > 5:
        raise ParameterError(f"x must be (B, C, *spatial) with 1 to 3 spatial axes, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ParameterError(f"x must be a floating tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ParameterError(f"x holds no image (shape {tuple(x.shape)})")
    why = nonfinite_problem(x)
    if why:
        raise ParameterError(f"x has {why}: a {use} of such an input means nothing")
    return x.detach().to(device=device, dtype=float_dtype_of(model) or x.dtype)


def float_dtype_of(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter or buffer (None: it has none)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a module that has none)."""
    t = next(iter((*model.parameters(), *model.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def probe_input(model: nn.Module, shape: Sequence[int], batch: int = 1) -> torch.Tensor:
    """Zeros (batch, *shape) on the model's device in its floating dtype: a probe pass that finds layers
    or counts features (a bfloat16 or float16 model cannot take float32 zeros)."""
    return torch.zeros(batch, *shape, device=device_of(model), dtype=float_dtype_of(model) or torch.float32)


def check_cells(method: str, spatial: Sequence[int], cell: int, param: str, unit: str = "cell") -> None:
    """Refuse a grid of ``cell``-sized blocks that covers ``spatial`` with one block: a map made of one
    value says nothing (a mask that cannot vary, a single superpixel)."""
    cells = math.prod(math.ceil(s / cell) for s in spatial)
    if cells < 2:
        raise ParameterError(f"{method}: an input of {'x'.join(map(str, spatial))} in blocks of {param}={cell} "
                             f"makes one {unit}; at least 2 are needed for a map: lower {param} (e.g. "
                             f"{param}={max(1, min(spatial) // 2)})")


def checked_outputs(out: Any, batch: int) -> torch.Tensor:
    """A model's answer to a batch of ``batch`` inputs, which nemt reads as (B, n_outputs) logits; another
    form (a tuple, a dict, a (B,) vector) is a clear error saying how to wrap the model."""
    if not torch.is_tensor(out):
        raise ParameterError(f"the model returned a {type(out).__name__}; nemt needs a module whose forward maps "
                             "(B, C, *spatial) to a (B, n_outputs) tensor of logits: wrap it (a module whose "
                             "forward returns the logits, e.g. model(x)[0] or model(x)['logits'])")
    if out.ndim != 2 or out.shape[0] != batch:
        hint = "; for one output, return it as (B, 1) (out.unsqueeze(1))" if out.ndim == 1 else ""
        raise ParameterError(f"the model returned shape {tuple(out.shape)} for {batch} inputs; nemt needs "
                             f"(B, n_outputs) = ({batch}, n){hint}")
    return out


def n_outputs_of(model: nn.Module, x: torch.Tensor | None = None, outputs: torch.Tensor | None = None) -> int | None:
    """Number of outputs: from the card, else from ``outputs`` or one forward pass on ``x`` (None without either)."""
    card = getattr(model, "card", None)
    if card is not None:
        return 1 if card.task == "regression" else len(card.label_names)
    if outputs is None and x is not None:
        with torch.no_grad(), evaluating(model):
            outputs = checked_outputs(model(x), x.shape[0])
    if outputs is None:
        return None
    return int(outputs.shape[1]) if outputs.ndim > 1 else 1


# ---------------------------------------------------------------------------- targets

def label_or_index(text: str, names: Sequence[str], what: str = "labels", option: str = "") -> int | None:
    """One label written as text (``nemt explain --target``, the service's ``labels``): a label's name, or
    ASCII digits, an output index (None: neither, or an index no output has). Digits that are also a label's
    name mean that label when no output has that index, and are refused as ambiguous (a :class:`ParameterError`
    naming ``what``, advising ``option`` with the label's index) when the index is another label's."""
    index = int(text) if text.isascii() and text.isdigit() else None
    if text in names:
        own = list(names).index(text)
        if index is not None and index < len(names) and index != own:
            raise ParameterError(f"{what} {text!r} is both this model's label {own} and the index of label "
                                 f"{names[index]!r}; give the label's index, {option + ' ' if option else ''}{own}")
        return own
    return index if index is not None and index < len(names) else None


def resolve_targets(target: Target, model: nn.Module, x: torch.Tensor | None = None, *,
                    n_outputs: int | None = None, label_names: Sequence[str] | None = None,
                    task: str | None = None, batch_size: int | None = None,
                    outputs: torch.Tensor | None = None) -> torch.Tensor:
    """Turn any accepted ``target`` into a (B, T) int64 tensor of output indices.

    ``model`` supplies ``task``/``label_names`` when it has a card; for a plain
    module the task is multi-class and the number of outputs comes from
    ``outputs`` or one forward pass on ``x`` when it is needed (``"all"``,
    range checks). ``x`` or ``outputs`` (the model's (B, n_outputs) outputs)
    serve ``"predicted"``.
    """
    card = getattr(model, "card", None)
    task = task or task_of(model)
    label_names = list(label_names or label_names_of(model))
    if n_outputs is None:
        if card is not None or label_names:
            n_outputs = 1 if task == "regression" else len(label_names)
        elif outputs is not None:
            n_outputs = n_outputs_of(model, outputs=outputs)
    if x is None and outputs is None and batch_size is None:
        raise ParameterError("resolve_targets needs x, outputs or batch_size")
    b = batch_size if batch_size is not None else (x.shape[0] if x is not None else outputs.shape[0])
    dev = x.device if x is not None else (outputs.device if outputs is not None else torch.device("cpu"))

    def index(t) -> int:
        if isinstance(t, str):
            if not label_names:
                raise ParameterError(f"target {t!r}: the model has no label names (a plain module); give an "
                                     "output index, or wrap it with Classifier.from_module(net, ..., "
                                     "label_names=[...])")
            if t not in label_names:
                raise ParameterError(f"target {t!r} is not a label of the model; labels are {label_names}")
            return label_names.index(t)
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)) and not hasattr(t, "__index__"):
            raise ArgumentTypeError(f"a target must be an int, a label name, a list or a tensor, got {t!r}")
        t = int(t)
        if n_outputs is not None and not 0 <= t < n_outputs:
            raise ParameterError(f"target {t} out of range: the model has {n_outputs} outputs")
        return t

    if isinstance(target, str) and target in ("all", "predicted") and target in label_names:
        # a label named like a keyword: reading it either way would explain something the caller may not mean
        own = label_names.index(target)
        raise ParameterError(f"target {target!r} is both a keyword and the name of label {own}; give {own} (or "
                             f"[{target!r}]) for the label, or the output indices meant by the keyword")
    if target is None:
        target = "predicted" if task == "multiclass" else "all"
    if isinstance(target, str) and target == "all":
        if n_outputs is None:
            n_outputs = n_outputs_of(model, x=x)
        if n_outputs is None:
            raise ParameterError("target='all' needs the number of outputs (a card, x, or n_outputs=)")
        return torch.arange(n_outputs, device=dev).expand(b, n_outputs).clone()
    if isinstance(target, str) and target == "predicted":
        if outputs is None:
            if x is None:
                raise ParameterError("target='predicted' needs the input x")
            with torch.no_grad(), evaluating(model):
                outputs = checked_outputs(model(x), x.shape[0])
        return outputs.argmax(dim=1, keepdim=True).to(dev)
    if isinstance(target, np.ndarray) and target.ndim >= 1:  # indices from NumPy: as a tensor; names: as a list
        target = target.tolist() if target.dtype.kind in "USO" else torch.from_numpy(target)
    if (target.numel() == 0 if torch.is_tensor(target) else isinstance(target, (list, tuple)) and not target):
        raise ParameterError(f"target is empty ({target!r}): give at least one output (an index, a label name, "
                             "'all' or 'predicted')")
    if torch.is_tensor(target):
        if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
            raise ParameterError(f"a target tensor holds output indices (an integer dtype), got {target.dtype}; "
                                 "multi-hot labels are not targets: give the indices, e.g. y.nonzero(), or 'all'")
        t = target.to(dev).long()
        if t.ndim == 0:
            t = t.expand(b)
        if t.ndim == 1:
            t = t[:, None]
        if t.ndim != 2 or t.shape[0] != b:
            raise ParameterError(f"target tensor must be (B,) or (B, T) with B={b}, got {tuple(target.shape)}")
        if n_outputs is not None and ((t < 0) | (t >= n_outputs)).any():
            raise ParameterError(f"target indices out of range 0..{n_outputs - 1}")
        return t
    if isinstance(target, (list, tuple)):
        idx = [index(t) for t in target]
        return torch.tensor(idx, device=dev).expand(b, len(idx)).clone()
    return torch.full((b, 1), index(target), dtype=torch.long, device=dev)


# ---------------------------------------------------------------------------- scores

SCORES = ("logit", "prob", "one_minus_prob")
_SCORE_ALIASES = {"probability": "prob"}


def output_score(out: torch.Tensor, task: str, score: str, scale: float = 1.0) -> torch.Tensor:
    """The quantity a method watches, outputs on the last axis.

    ``"logit"``: the raw outputs; ``"prob"`` (alias ``"probability"``): a
    softmax over the classes of a multi-class model, a sigmoid per label of a
    multi-label model; ``"one_minus_prob"``: 1 - that. A regression output is
    always the predicted value divided by ``scale``, whatever ``score`` says.
    """
    score = _SCORE_ALIASES.get(score, score)
    if score not in SCORES:
        raise ParameterError(f"score must be one of {SCORES}, got {score!r}")
    if task == "regression":
        return out / scale if scale != 1.0 else out
    if score == "logit":
        return out
    # one output is a binary logit: its softmax would be 1 whatever the input (a plain module reads as multi-class)
    p = out.softmax(dim=-1) if task == "multiclass" and out.shape[-1] > 1 else out.sigmoid()
    return p if score == "prob" else 1 - p


# ---------------------------------------------------------------------------- blur, fills, resizing

def gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None, mode: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, *spatial)`` (1D, 2D or 3D) over the spatial axes.

    The kernel is truncated at ``radius`` pixels (default ``max(1, round(3 sigma))``)
    and normalised to sum 1; ``mode`` is the padding (``"reflect"``, which
    falls back to ``"replicate"`` on an axis no longer than the radius,
    ``"replicate"``, or ``"constant"`` for zeros). ``sigma <= 0`` returns ``x``.
    """
    if sigma <= 0:
        return x
    d = x.ndim - 2
    r = int(radius) if radius is not None else max(1, int(round(3 * sigma)))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    out = x
    for axis in range(d):
        shape = [1] * d
        shape[axis] = -1
        k = g.view(1, 1, *shape).expand(c, 1, *shape)
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = r
        if mode == "constant":
            out = F.pad(out, pad)
        else:
            pad_mode = "replicate" if mode == "reflect" and out.shape[2 + axis] <= r else mode
            out = F.pad(out, pad, mode=pad_mode)
        out = conv(out, k, groups=c)
    return out


FILLS = ("zero", "min", "black", "max", "white", "mean", "blur")


def fill_values(x: torch.Tensor, fill: float | str | torch.Tensor, *, sigma: float = 5.0,
                radius: int | None = None) -> torch.Tensor | float:
    """What replaces deleted pixels of ``x`` (B, C, *spatial), broadcastable to ``x``.

    A number (returned as it is), a tensor (moved to x), or: ``"zero"`` (0,
    the data set's mean in the normalised space), ``"min"``/``"black"`` and
    ``"max"``/``"white"`` (each image's extreme over all its channels),
    ``"mean"`` (each image's mean per channel), ``"blur"`` (the image blurred
    with a Gaussian of ``sigma`` pixels, truncated at ``radius``).
    """
    if torch.is_tensor(fill):
        return fill.to(x.device, x.dtype)
    if not isinstance(fill, str):
        return float(fill)
    ones = (1,) * (x.ndim - 1)
    keep = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    if fill == "zero":
        return 0.0
    if fill in ("min", "black"):
        return x.flatten(1).amin(dim=1).view(-1, *ones).expand(keep).contiguous()
    if fill in ("max", "white"):
        return x.flatten(1).amax(dim=1).view(-1, *ones).expand(keep).contiguous()
    if fill == "mean":
        return x.flatten(2).mean(dim=2).view(keep)
    if fill == "blur":
        return gaussian_blur(x, sigma, radius=radius)
    raise ParameterError(f"unknown fill {fill!r}: use a number, a tensor or one of {FILLS}")


def diffusion_fill(x: torch.Tensor, keep: torch.Tensor, sigma: float, prior: torch.Tensor | None = None,
                   prior_weight: float = 1e-3) -> torch.Tensor:
    """``x`` with the region ``1 - keep`` filled from the kept surroundings by normalised convolution:
    x·k + ((blur(x·k) + w·prior) / (blur(k) + w))·(1 − k), Gaussian of ``sigma`` pixels, w = ``prior_weight``;
    where no kept pixel is near, the fill is ``prior`` (default 0, the mean). A dark lesion is replaced by the
    tissue around it. Differentiable, torch-only, any spatial_dims."""
    weight = gaussian_blur(keep, sigma)
    blurred = gaussian_blur(x * keep, sigma)
    if prior is not None:
        blurred = blurred + prior_weight * prior
    fill = blurred / (weight + prior_weight)
    return x * keep + fill * (1 - keep)


_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resize_linear(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, *grid) -> (B, C, *size) by linear, bilinear or trilinear interpolation (by the number of
    spatial axes, ``align_corners=False``: each value a convex combination of its neighbours, so maps stay in
    their range); ``t`` itself when it already has that size."""
    size = tuple(int(s) for s in size)
    if tuple(t.shape[2:]) == size:
        return t
    return F.interpolate(t, size=size, mode=_LINEAR_MODES[t.ndim - 2], align_corners=False)


# ---------------------------------------------------------------------------- normalisation

#: a row whose spread (max - min) is at most this many float epsilons (of its dtype) times its largest magnitude
#: is constant up to float rounding: its differences are rounding noise, which min-max would stretch to [0, 1]
ROUNDING_SPREAD = 16


def near_constant(flat: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(…, 1) booleans: the rows of ``flat`` (values along the last axis) that are constant up to float
    rounding, max − min ≤ :data:`ROUNDING_SPREAD` · eps(dtype) · max |v|, or below ``eps``.

    E.g. Grad-CAM of a layer after global pooling: 1.2e-10 of spread on values of 6e-4 in float32."""
    spread = flat.amax(-1, keepdim=True) - flat.amin(-1, keepdim=True)
    if not flat.is_floating_point():
        return spread < eps
    rounding = ROUNDING_SPREAD * torch.finfo(flat.dtype).eps * flat.abs().amax(-1, keepdim=True)
    return spread <= rounding.clamp_min(eps)


def minmax(flat: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise along the last axis to [0, 1]: (v - min) / (max - min); rows that are constant, or
    constant up to float rounding (:func:`near_constant`), become 0."""
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    out = (flat - lo).div_((hi - lo).clamp_min(eps))
    return out.masked_fill_(near_constant(flat, eps), 0)


def normalise_maps(maps: torch.Tensor, spatial_dims: int, eps: float = 1e-12) -> torch.Tensor:
    """:func:`minmax` of each map of (…, *spatial) over its spatial axes (maps constant up to float
    rounding -> 0)."""
    return minmax(maps.flatten(start_dim=-spatial_dims), eps).view_as(maps)


def scale_signed(maps: torch.Tensor, spatial_dims: int, eps: float = 1e-12) -> torch.Tensor:
    """Signed maps divided by their largest magnitude (per map), in [-1, 1]."""
    scale = maps.flatten(start_dim=-spatial_dims).abs().amax(dim=-1).clamp_min(eps)
    return maps / scale.view(*scale.shape, *(1,) * spatial_dims)


def zero_constant(maps: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Maps already in [0, 1] kept as they are, except maps constant up to float rounding
    (:func:`near_constant`), which become 0 (as min-max would)."""
    flat = maps.flatten(start_dim=-spatial_dims)
    constant = near_constant(flat).view(*maps.shape[:-spatial_dims], *([1] * spatial_dims))
    return torch.where(constant, torch.zeros_like(maps), maps)


POSTPROCESS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "minmax": normalise_maps,
    "abs": lambda m, d: normalise_maps(m.abs(), d),
    "positive": lambda m, d: normalise_maps(m.clamp_min(0), d),
    "signed": scale_signed,
    "mask": zero_constant,
    "none": lambda m, d: m,
}


def check_postprocess(how: str | Callable) -> str | Callable:
    """``how`` if :func:`postprocess` accepts it (a name of :data:`POSTPROCESS` or a callable), else an error."""
    if not callable(how) and how not in POSTPROCESS:
        raise ParameterError(f"postprocess must be one of {sorted(POSTPROCESS)} or a callable, got {how!r}")
    return how


def postprocess(maps: torch.Tensor, how: str | Callable[[torch.Tensor, int], torch.Tensor], spatial_dims: int
                ) -> torch.Tensor:
    """The last step of every explainer, on raw (B, T, *spatial) maps.

    ``"minmax"`` (each map to [0, 1]), ``"abs"`` (min-max of the magnitude),
    ``"positive"`` (min-max of the positive part), ``"signed"`` (divided by
    the largest magnitude, in [-1, 1]), ``"mask"`` (masks already in [0, 1];
    constant ones become 0), ``"none"``, or a callable ``(maps, spatial_dims) -> maps``.
    """
    how = check_postprocess(how)
    return how(maps, spatial_dims) if callable(how) else POSTPROCESS[how](maps, spatial_dims)


# ---------------------------------------------------------------------------- the caller's state

@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block; every submodule's ``training`` flag restored after, also on error."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def with_model_in_eval(fn: Callable) -> Callable:
    """Decorator for functions whose first argument is a model: the call runs under :func:`evaluating`."""
    import functools

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with evaluating(model):
            return fn(model, *args, **kwargs)
    return wrapper


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


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """The global torch RNG (and the GPU's, for a CUDA ``device``), NumPy's and Python's seeded with ``seed``
    inside the block and restored to the caller's states after, also on error: for libraries that draw from
    the global generators (Captum's Gradient SHAP draws its baselines' weights from ``np.random``)."""
    import random

    import numpy as np

    dev = torch.device(device) if device is not None else torch.device("cpu")
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(int(seed))
        np.random.seed(int(seed) % 2 ** 32)
        random.seed(int(seed))
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Python's, NumPy's and torch's global generators (CUDA's too, once initialised) restored to the
    caller's states after the block, also on error: for code that seeds them for reproducible training."""
    import random

    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def chunks(n: int, size: int | None) -> list[slice]:
    """``slice`` objects that cut ``n`` items into runs of at most ``size`` (one run when ``size`` is None)."""
    if size is None or size >= n:
        return [slice(0, n)]
    size = max(1, int(size))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
