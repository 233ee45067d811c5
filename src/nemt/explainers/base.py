"""What every explainer shares: the pipeline, the registry, and the vocabulary of :mod:`nemt.ops`.

An explainer is built from any ``nn.Module`` (a :class:`~nemt.models.Classifier`
adds its card: labels and task) and answers ``explain(x, target=...) ->
(B, T, *spatial)`` maps at input resolution, one map per requested target.
The base class runs the steps every method shares (:meth:`Explainer.explain`):
check the input, put the model in eval mode for the call (restored after),
refuse the caller's ``torch.inference_mode()`` for a method that needs gradients,
resolve the targets once, cut the batch into chunks of
:attr:`~Explainer.images_per_call` images (seeded one by one for methods that
draw from the global RNG), call the method's own :meth:`~Explainer._attribute`
for raw maps, and end with one post-processing step (:func:`nemt.ops.postprocess`).
A new method is one short class: ``_attribute`` and ``@register(name)``.

Targets: see :data:`nemt.ops.TARGET_HELP`.
"""
from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from nemt.explainers.fast import new_call
from nemt.ops import (ArgumentTypeError, ParameterError, Target, blame_shape, check_postprocess, checked_input, chunks,
                      device_of, evaluating, fill_values, frozen_parameters, is_count, is_finite_number, n_outputs_of,
                      normalise_maps, output_score, postprocess, resize_linear, resolve_targets, task_of)

__all__ = ["Explainer", "Target", "available", "baseline_image", "explainer_settings", "frozen_parameters",
           "get_explainer", "normalise_maps", "register", "resize_linear", "resolve_targets"]


def baseline_image(x: torch.Tensor, baseline: float | str) -> torch.Tensor | float:
    """A number, or ``"min"`` (each image's minimum) or ``"mean"`` (per channel): :func:`nemt.ops.fill_values`."""
    if isinstance(baseline, str) and baseline not in ("min", "mean"):
        raise ParameterError(f"baseline must be a number, 'min' or 'mean', got {baseline!r}")
    return fill_values(x, baseline)


def check_range(name: str, value: Any, low: float, high: float | None = None, *, low_closed: bool = False) -> float:
    """``value`` as a float if it is a finite number above ``low`` (at least ``low`` with ``low_closed``) and
    below ``high`` (if given), else a ParameterError naming ``name``: a negative blur, an infinite learning
    rate or an area of 0 would otherwise run and give a meaningless map."""
    ok = (is_finite_number(value) and (value >= low if low_closed else value > low)
          and (high is None or value < high))
    if not ok:
        want = (f"a finite number {'>=' if low_closed else '>'} {low:g}" if high is None
                else f"a number in {'[' if low_closed else '('}{low:g}, {high:g})")
        raise ParameterError(f"{name} must be {want}, got {value!r}")
    return float(value)


class Explainer:
    """Base of all explainers: the model, the device, and the pipeline of :meth:`explain`.

    Subclasses implement :meth:`_attribute` (raw maps for a chunk of images
    whose targets are resolved) and may set :attr:`default_postprocess` and
    :attr:`images_per_call`. The model is any ``nn.Module`` mapping (B, C,
    *spatial) to (B, n_outputs); it is never modified: its training flags are
    set to eval for the duration of a call and restored after, and methods that
    need gradients only with respect to the input freeze its parameters the same way.
    """

    name = "explainer"
    #: what :meth:`explain` does to the raw maps unless the caller passes ``postprocess`` (see :func:`nemt.ops.postprocess`)
    default_postprocess: str | Callable = "minmax"
    #: images per :meth:`_attribute` call (None: the whole batch at once), the memory bound of methods that need one
    images_per_call: int | None = None
    #: one map per requested target (False: one map per image whatever the target, e.g. an encoder's explainer)
    targeted = True
    #: the class checks its count parameters itself (:func:`check_counts` is then not run at construction)
    checks_own_counts = False
    #: does the method differentiate the model? Then it cannot run under the caller's ``torch.inference_mode()``
    needs_grad = False

    def __new__(cls, *args: Any, **kwargs: Any):
        # not a copy being unpickled: the count parameters, however the explainer is built (a class that checks
        # each of its parameters itself, naming it as its cards' loader needs, says so)
        if (args or kwargs) and not cls.checks_own_counts:
            check_counts(cls, args, kwargs)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, device: str | torch.device | None = None,
                 postprocess: str | Callable | None = None):
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.device = torch.device(device) if device is not None else device_of(model)
        _check_device(model, self.device)
        self.postprocess = check_postprocess(self.default_postprocess if postprocess is None else postprocess)

    @property
    def card(self):
        """The model's card (labels, task, input size), or None for a plain module."""
        return getattr(self.model, "card", None)

    @property
    def spatial_dims(self) -> int | None:
        """The card's number of spatial axes (None for a plain module: taken from each input)."""
        return self.card.spatial_dims if self.card is not None else None

    def targets(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        """``target`` as a (B, T) tensor of output indices (see :data:`nemt.ops.TARGET_HELP`).

        A plain module's number of outputs is read once, from one image, and checked on every call after.
        """
        n_outputs = None
        if self.card is None:
            if getattr(self, "_n_outputs", None) is None:
                self._n_outputs = n_outputs_of(self.model, x=x[:1])
            n_outputs = self._n_outputs
        return resolve_targets(target, self.model, x, n_outputs=n_outputs)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a detached floating tensor (B, C, *spatial) on the explainer's device in the model's dtype,
        or a clear error (:func:`nemt.ops.checked_input`; and the card's number of spatial axes)."""
        x = checked_input(x, self.model, self.device)
        if self.spatial_dims is not None and x.ndim - 2 != self.spatial_dims:
            raise ParameterError(f"the model takes {self.spatial_dims}D inputs, got x of shape {tuple(x.shape)}")
        channels = getattr(self.card, "in_channels", None)
        if channels is not None and x.shape[1] != channels:  # methods that never run the model would not notice
            hint = " (channel-last? give (B, C, *spatial))" if x.shape[-1] == channels else ""
            raise ParameterError(f"the model takes {channels}-channel inputs, got x of shape {tuple(x.shape)}{hint}")
        return x

    @contextmanager
    def running(self, x: torch.Tensor) -> Iterator[None]:
        """What every public entry point that runs the model does around it: refuse the caller's
        ``torch.inference_mode()`` for a method that needs gradients, start a new explainer call (inference
        copies of the model compare its state once per call; a stale one is rebuilt), the model in eval mode,
        and a model's own error about x's shape re-raised naming x."""
        if self.needs_grad and torch.is_inference_mode_enabled():
            raise ParameterError(f"method {self.name!r} needs gradients of the model and cannot run under "
                                 "torch.inference_mode() (no code can turn gradients back on inside it): call it "
                                 "under torch.no_grad() or neither")
        new_call()
        with evaluating(self.model), blame_shape(x):
            yield

    def raw(self, x: torch.Tensor, target: Target = None) -> torch.Tensor:
        """The method's maps (B, T, *spatial) before post-processing."""
        x = self.check_input(x)
        with self.running(x):
            t = self.targets(x, target)
            parts = [self._attribute(x[sl], t[sl]) for sl in chunks(x.shape[0], self.images_per_call)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def explain(self, x: torch.Tensor, target: Target = None) -> torch.Tensor:
        """Maps (B, T, *spatial) for inputs ``x`` (B, C, *spatial), one per target (see :data:`nemt.ops.TARGET_HELP`)."""
        maps = postprocess(self.raw(x, target), self.postprocess, x.ndim - 2)
        return maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps  # a half model's: float32

    def explain_and_predict(self, x: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`explain`'s maps and the model's predictions on ``x`` (probabilities, or values for
        regression; (B, n_outputs)): what the CLI's ``explain`` and the service report for an image."""
        x = self.check_input(x)
        with torch.no_grad(), evaluating(self.model):
            out = self.model(x)
        return self.explain(x, target), output_score(out, task_of(self.model), "prob")

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Raw maps (b, T, *spatial) for a chunk ``x`` (b, C, *spatial) and its targets (b, T)."""
        raise NotImplementedError


def _init_keywords(cls: type):
    """The keyword parameters (``inspect.Parameter``) of ``cls.__init__`` and of its bases reached through
    ``**kw``, nearest class first (``self`` and ``model`` excluded)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        yield from (p for p in sig.parameters.values()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "model"))
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break


def init_parameters(cls: type) -> set[str]:
    """Keyword parameters of ``cls.__init__`` and of its bases reached through ``**kw`` (``model`` excluded)."""
    return {p.name for p in _init_keywords(cls)}


def init_defaults(cls: type) -> dict[str, Any]:
    """The defaults of :func:`init_parameters`' keyword parameters (those without one left out), the nearest
    class's default where a base declares the name too."""
    out: dict[str, Any] = {}
    for p in _init_keywords(cls):
        if p.default is not p.empty:
            out.setdefault(p.name, p.default)
    return out


def _json_name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__  # a callable by name, not its address


def explainer_settings(explainer: Any, given: dict | None = None) -> dict:
    """Every setting an explainer runs with, as JSON, for comparing runs whose parameters were written
    differently (``map_smoothing=false`` given against a default of false): a fitted explainer's card
    parameters (``hyper_params``, with any explanation-time change), else the method's defaults with the
    ``given`` parameters over them. ``seed`` and ``device`` are left out: replicates differ in their seed."""
    hyper = getattr(explainer, "hyper_params", None)
    if callable(hyper):
        out = dict(hyper())
    else:
        out = {**init_defaults(type(explainer)), **(given or {})}
    out = {k: v for k, v in out.items() if k not in ("seed", "device")}
    return json.loads(json.dumps(out, default=_json_name, sort_keys=True))


def _check_device(model: nn.Module, device: torch.device) -> None:
    """Refuse a ``device=`` that the model's weights are not on (x would meet them on another device)."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) == 1:
        (on,) = devices
        same = on.type == device.type and (device.index is None or on.index is None or on.index == device.index)
        if not same:
            raise ParameterError(f"device={str(device)!r} but the model's weights are on {str(on)!r}: move the "
                                 f"model first (model.to({str(device)!r})) or leave device unset (the model's)")


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


def get_explainer(name: str, model: nn.Module, *, path: str | Path | None = None, seed: int | None = None,
                  **params: Any) -> Explainer:
    """The one builder of explainers (the CLI, the benchmark and the service use it): a method by name.

    ``get_explainer("gradcam", net)``, ``get_explainer("rise", clf, n_masks=2000, seed=1)``,
    ``get_explainer("nemt", clf, path="explainer/")`` (a fitted explainer, read from the folder that
    ``nemt fit`` wrote; without ``path``, an unfitted one to ``fit``). Parameters are checked against the
    method's signature; ``seed`` goes to the methods that draw random numbers and is ignored by the others.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ParameterError(f"unknown explainer {name!r}; available: {available()}")
    accepted = init_parameters(cls)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ParameterError(f"method {name!r} has no parameter {unknown}; its parameters are {sorted(accepted)}")
    if path is not None:
        load = getattr(cls, "load", None)
        if load is None:
            raise ParameterError(f"method {name!r} is not fitted: it takes no path")
        late = getattr(cls, "EXPLANATION_TIME_PARAMS", ())  # shape only the map from the fitted module: no refit
        extra = sorted(set(params) - {"device"} - set(late))
        if extra:
            raise ParameterError(f"a fitted {name!r} takes its parameters from its card, not {extra}"
                                 + (f" (only {list(late)} may change at explanation time)" if late else ""))
        ex = load(path, model, device=params.get("device"))
        for key in (k for k in late if k in params):
            getattr(ex, f"set_{key}")(params[key])
        return ex
    if seed is not None and "seed" in accepted:
        params.setdefault("seed", seed)
    return cls(model, **params)  # the count parameters are checked at construction (:func:`check_counts`)


#: budget parameters that count something (samples, masks, steps, copies per call, pixels of a window):
#: whole numbers of at least 1 in every method that has them
COUNT_PARAMETERS = frozenset({"batch_size", "n_masks", "n_samples", "n_steps", "steps", "window", "stride", "cell",
                              "grid", "refresh", "n_segments", "images_per_call", "mask_stride"})


def check_counts(cls: type, args: tuple, kwargs: dict) -> None:
    """Refuse a count parameter below 1 (or not a whole number) before the method is built, however it is
    built (:func:`get_explainer` or the class itself: :meth:`Explainer.__new__` calls this with the
    constructor's arguments): a negative ``n_masks`` or a zero ``batch_size`` would otherwise fail deep inside
    the method, or run silently. Arguments that do not fit ``cls.__init__`` are left to it to refuse."""
    sig = inspect.signature(cls.__init__)
    try:
        bound = sig.bind(None, *args, **kwargs)  # None: self
    except TypeError:
        return
    params: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        kind = sig.parameters[key].kind
        if kind == inspect.Parameter.VAR_KEYWORD:  # passed on to a base class's parameters
            params.update(value)
        elif kind != inspect.Parameter.VAR_POSITIONAL:
            params[key] = value
    _check_counts(getattr(cls, "name", cls.__name__), params)


def _check_counts(name: str, params: dict) -> None:
    """The check of :func:`check_counts` on named parameters."""
    for key in sorted(COUNT_PARAMETERS & set(params)):
        value = params[key]
        if value is None:
            continue
        parts = list(value) if isinstance(value, (list, tuple)) else [value]  # a window per axis
        if not parts or not all(is_count(v) for v in parts):  # an inf or NaN too (int() of it raised)
            raise ParameterError(f"method {name!r}: {key} must be a whole number >= 1, got {value!r}")
