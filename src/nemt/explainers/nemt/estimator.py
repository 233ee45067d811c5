"""NEMt and NEM as estimators: ``fit`` once, then ``explain`` in one forward pass.

>>> nemt = NEMt(clf, seed=0).fit(loader, epochs=3)          # doctest: +SKIP
>>> maps = nemt.explain(x, target="all")                    # (B, T, *spatial) in [0, 1]
>>> nemt.save("explainer/"); NEMt.load("explainer/", clf)   # refuses another model

Hyper-parameters live in ``__init__``; learned state in attributes ending in
``_`` (``module_``, ``history_``). ``fit(data)`` takes a DataLoader or any
iterable of ``(x, y)`` batches (or nemt's dict batches with ``image``/``y``),
with ``x`` already in the model's normalised input space.
"""
from __future__ import annotations

import hashlib
import json
import itertools
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.data
from safetensors.torch import load_file, save_file
from torch import nn

from nemt import __version__
from nemt.errors import CardError, NemtError
from nemt.explainers.base import Explainer, Target, init_parameters, register
from nemt.ops import (ParameterError, diffusion_fill, evaluating, float_dtype_of, frozen_parameters, label_names_of,
                      n_outputs_of, nonfinite_problem, output_score, postprocess, preserved_rng, resolve_targets,
                      task_of)
from nemt.explainers.layers import _unwrap, find_stages, layer_name
from nemt.explainers.nemt.losses import (MEAN_IMAGE, OCCLUSIONS, OUTPAINT, QUANTITIES, deletion_kinds, deletion_loss,
                                         first_fill, game_fills, game_loss, log_odds, nem_loss, nested_masks, occlude,
                                         target_quantity, uses_mean_image)
from nemt.distributed import Context, StepBatches, context
from nemt.explainers.nemt.loop import batches, fit_loop, split_xy
from nemt.explainers.nemt.module import ExplanationModule
from nemt.explainers.nemt.smoothing import NESTED_BOX_AT_224, fill_sigma_for, kernel_size_for
from nemt.files import atomic_path, code_fingerprint, sha256_file, write_json
from nemt.progress import console

FORMAT = "nemt-explainer/1"
WEIGHTS, CARD = "explainer.safetensors", "explainer.json"


def model_checksum(model: nn.Module) -> str:
    """SHA-256 over the model's state (names, shapes, dtypes, bytes): the same weights give the same sum."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Items:
    """Training items (x, y) by index from a map-style Dataset (or a DataLoader's), or from batches,
    materialised; each item is read once per access."""

    def __init__(self, data: Any, order: Sequence[int] | None = None):
        from torch.utils.data import DataLoader, Dataset
        if isinstance(data, DataLoader):
            data = data.dataset
        if isinstance(data, Dataset):
            self._get, n = (lambda i: split_xy(data[i])), len(data)  # type: ignore[arg-type]
        else:
            rows = [(x[i], None if y is None else y[i]) for x, y in batches(data) for i in range(x.shape[0])]
            self._get, n = rows.__getitem__, len(rows)
        self.order = list(range(n)) if order is None else list(order)

    def subset(self, order: Sequence[int]) -> "_Items":
        """The items ``order`` (indices into these items), read when asked for."""
        out = object.__new__(_Items)
        out._get, out.order = self._get, [self.order[k] for k in order]
        return out

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, Any]:
        return self._get(self.order[k])


class _Paired(torch.utils.data.Dataset):
    """(x, y, teacher maps, targets) per training item, for the student's loader."""

    def __init__(self, items: _Items, maps: torch.Tensor, targets: torch.Tensor):
        self.items, self.maps, self.targets = items, maps, targets

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        x, y = self.items[k]
        return x, (torch.as_tensor(-1) if y is None else y), self.maps[k], self.targets[k]


class _BadParameter(ParameterError):
    """A parameter refused: ``NAME reason``. ``name`` and ``reason`` are kept, so that a card's loader names
    the field (``params.NAME``) and gives the reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"{name} {reason}")


def _is_number(v: Any) -> bool:
    """A real number (not a bool, not a string): what a numeric parameter must be."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    """A finite real number (not a bool, not a string, not nan or inf)."""
    return _is_number(v) and math.isfinite(v)


def _is_count(v: Any, least: int = 1) -> bool:
    """A whole number (not a bool, not a float) of at least ``least``."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= least


def _check_kernel_size(k: Any, input_size: Sequence[int], name: str) -> None:
    """A smoothing kernel side: a positive integer whose half fits the smallest input side (the box filter
    pads by half the kernel; more would wrap the padding around the image)."""
    if not _is_count(k):
        raise _BadParameter(name, f"must be a positive integer, got {k!r}")
    if input_size and k // 2 > min(input_size):
        raise _BadParameter(name, f"{k} is too large for inputs of {list(input_size)}: at most "
                            f"{2 * min(input_size) + 1} (the smoothing pads each side by half the kernel, "
                            "which must fit in the smallest side)")


class _LogitsOf(nn.Module):
    """``module.logits`` as a forward pass, for ``DistributedDataParallel`` (which hooks ``forward``)."""

    def __init__(self, module: ExplanationModule):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.logits(x)


def _select_maps(maps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample selection: (B, n_maps, *spatial) and targets (B, T) -> (B, T, *spatial)."""
    idx = t.to(maps.device).view(*t.shape, *([1] * (maps.ndim - 2))).expand(-1, -1, *maps.shape[2:])
    return torch.gather(maps, 1, idx)


def _flip_half(gen: torch.Generator, x: torch.Tensor, *more: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mirror about half the samples of a batch along the last axis (drawn from ``gen``), and the same samples
    of each tensor in ``more`` (e.g. their maps). Images and volumes only: a signal's time has a direction, so
    (B, C, L) comes back as it is, and no draw is made."""
    if x.ndim <= 3:
        return (x, *more)
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return tuple(torch.where(flip.view(-1, *[1] * (t.ndim - 1)), t.flip(-1), t) for t in (x, *more))


#: decoder widths, deepest first: half the first design's (256 … 16); on BUSI's validation split (seed 0) as good
#: (relevance mass 0.464 against 0.452, pointing game 0.646 against 0.631) at a quarter of the decoder's MACs
DECODER_CHANNELS = (128, 64, 32, 16, 8)


class _MaskExplainer(Explainer):
    """Shared machinery of NEMt and NEM: module building, training loop, checkpoints, save/load."""

    default_postprocess = "none"  # the module's maps are in [0, 1] already
    checks_own_counts = True  # each refusal names its parameter (a card's loader reports params.NAME)

    def __init__(self, model: nn.Module, *, layers: Sequence[str] | None = None, encoder: str = "model",
                 smoothing: bool = True, kernel_size: int | None = None, init_keep: float = 0.95,
                 decoder_channels: Sequence[int] = DECODER_CHANNELS, decoder_full_resolution: bool = False,
                 optimizer: str = "adamw",
                 lr: float | None = None, weight_decay: float = 0.01, schedule: str = "cosine",
                 batch_size: int = 16,
                 accumulate: int = 1, epochs: int = 10, seed: int = 0,
                 input_size: Sequence[int] | None = None, in_channels: int | None = None,
                 device: str | torch.device | None = None):
        super().__init__(model, device)
        dtype = float_dtype_of(model)
        if dtype not in (None, torch.float32):  # the decoder learns in float32 from the model's features
            raise ParameterError(f"{type(self).__name__} fits float32 models; this one's weights are {dtype}: "
                                 "fit and explain with a float32 copy (copy.deepcopy(model).float())")
        self._params = {k: v for k, v in locals().items() if k not in ("self", "__class__", "dtype")}  # as given
        card = getattr(model, "card", None)
        # resolved values, used by the code; the parameters themselves stay as given (scikit-learn's rule)
        self._input_size = [int(s) for s in (input_size or (card.input_size if card else []))]
        self._in_channels = int(in_channels or (card.in_channels if card else 0))
        if not self._input_size or not self._in_channels:
            raise ParameterError("give input_size= and in_channels= for a model without a card")
        if encoder not in ("model", "own"):
            raise _BadParameter("encoder", f"must be 'model' or 'own', got {encoder!r}")
        if optimizer not in ("prodigy", "adamw"):
            raise _BadParameter("optimizer", f"must be 'prodigy' or 'adamw', got {optimizer!r}")
        if schedule not in ("constant", "cosine"):
            raise _BadParameter("schedule", f"must be 'constant' or 'cosine', got {schedule!r}")
        if not _is_number(init_keep) or not 0 < init_keep < 1:  # the mask head starts at logit(init_keep)
            raise _BadParameter("init_keep", f"must be a fraction strictly between 0 and 1, got {init_keep!r}")
        if kernel_size is not None:
            _check_kernel_size(kernel_size, self._input_size, "kernel_size")
        for name, flag in (("smoothing", smoothing), ("decoder_full_resolution", decoder_full_resolution)):
            if not isinstance(flag, bool):
                raise _BadParameter(name, f"must be true or false, got {flag!r}")
        if not isinstance(decoder_channels, (list, tuple)) or not decoder_channels or \
                not all(_is_count(c) for c in decoder_channels):
            raise _BadParameter("decoder_channels", f"must be a non-empty list of channel counts >= 1, "
                                f"got {decoder_channels!r}")
        for name, v in (("batch_size", batch_size), ("accumulate", accumulate), ("epochs", epochs)):
            if not _is_count(v):
                raise _BadParameter(name, f"must be a whole number >= 1, got {v!r}")
        if not _is_count(seed, 0):
            raise _BadParameter("seed", f"must be a whole number >= 0, got {seed!r}")
        if lr is not None and not (_is_finite(lr) and lr > 0):
            raise _BadParameter("lr", f"must be a finite number > 0 (or unset for the optimizer's default), got {lr!r}")
        if not (_is_finite(weight_decay) and weight_decay >= 0):
            raise _BadParameter("weight_decay", f"must be a finite number >= 0, got {weight_decay!r}")
        if layers is not None and (isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple))):
            raise _BadParameter("layers", f"must be a list of the model's layers (names or modules), got {layers!r}")
        self.layers, self.encoder, self.smoothing, self.kernel_size = layers, encoder, smoothing, kernel_size
        self.init_keep, self.decoder_channels = init_keep, decoder_channels
        self.decoder_full_resolution = decoder_full_resolution
        self.optimizer, self.lr, self.weight_decay, self.schedule = optimizer, lr, weight_decay, schedule
        self.batch_size, self.accumulate, self.epochs, self.seed = batch_size, accumulate, epochs, seed
        self.input_size, self.in_channels = input_size, in_channels
        # learned state (scikit-learn's trailing underscore): set by fit or load
        self.module_: ExplanationModule | None = None
        self.history_: list[dict] = []
        self.layers_: list[str] | None = None
        self.kernel_size_: int | None = None
        self.epochs_: int | None = None

    # -- parameters (scikit-learn's estimator protocol) -----------------------
    def get_params(self, deep: bool = True) -> dict:
        """The ``__init__`` parameters as given (``model`` and ``device`` included), so that
        ``type(ex)(**ex.get_params())`` and :func:`sklearn.base.clone` build an unfitted copy."""
        # in a fixed order: a card written again (a resumed, finished fit saves it anew) is the same bytes
        return {name: self._params[name] for name in sorted(init_parameters(type(self)) | {"model"})}

    def set_params(self, **params: Any) -> "_MaskExplainer":
        """Change parameters; the explainer is built anew from them (any fit is forgotten)."""
        unknown = sorted(set(params) - set(self._params))
        if unknown:
            raise ParameterError(f"{type(self).__name__} has no parameter {unknown}")
        self.__init__(**{**self.get_params(), **params})
        return self

    def hyper_params(self) -> dict:
        """The parameters without ``model`` and ``device``: what an explainer card records (JSON)."""
        out = {k: v for k, v in self.get_params().items() if k not in ("model", "device")}
        if out.get("layers"):  # modules given as objects are recorded by name
            out["layers"] = [layer_name(self.model, la) for la in out["layers"]]
        return json.loads(json.dumps(out))  # tuples as lists: equal to what a card reads back

    def fitted_facts(self) -> dict:
        """What fitting resolved: the feature layers, the smoothing kernel, the epochs, the input's shape."""
        facts = {"layers": self.layers_, "kernel_size": self.kernel_size_, "epochs": self.epochs_,
                 "input_size": self._input_size, "in_channels": self._in_channels}
        if getattr(self, "teacher_seconds_", None) is not None:  # a student: what its teacher cost on the training split
            facts["teacher_seconds"] = self.teacher_seconds_
        return facts

    @property
    def spatial_dims(self) -> int:
        return len(self._input_size)

    def _n_maps(self) -> int:
        raise NotImplementedError

    def _loader(self, data: Any, ctx: Context | None = None) -> Iterable:
        """Batches to train on: ``data`` as it is when it yields batches (a DataLoader, a list of (x, y)), or
        this rank's micro-batches of ``batch_size`` items (:class:`~nemt.distributed.StepBatches`: an order
        fixed by ``seed`` and the epoch, the last partial batch dropped) when it is a map-style
        ``torch.utils.data.Dataset``."""
        from torch.utils.data import DataLoader, Dataset
        if isinstance(data, Dataset) and not isinstance(data, DataLoader):
            return StepBatches(data, int(self.batch_size), seed=int(self.seed), accumulate=int(self.accumulate),
                               ctx=ctx)
        return data

    def _map_kwargs(self) -> dict:
        """How the module turns decoder logits into maps (see ``ExplanationModule.maps``)."""
        return {"map_kind": "keep"}

    def _default_kernel_size(self) -> int:
        """The smoothing box's side when ``kernel_size`` is unset: :data:`BOX_AT_224` scaled to the input."""
        return kernel_size_for(tuple(self._input_size))

    def _build(self) -> ExplanationModule:
        if self.layers_ is None:
            self.layers_ = [layer_name(self.model, la) for la in self.layers] if self.layers else (
                find_stages(self.model, (self._in_channels, *self._input_size)) if self.encoder == "model" else [])
        if self.kernel_size_ is None:
            self.kernel_size_ = int(self.kernel_size or self._default_kernel_size())
        k = self.kernel_size_
        with torch.random.fork_rng(devices=[]):  # seeded initial weights; the caller's global RNG is left as it was
            torch.manual_seed(self.seed)
            mod = ExplanationModule(self.model, spatial_dims=self.spatial_dims, in_channels=self._in_channels,
                                    input_size=self._input_size, n_maps=self._n_maps(), layers=self.layers_,
                                    own_encoder=self.encoder == "own", decoder_channels=list(self.decoder_channels),
                                    init_keep=self.init_keep, kernel_size=k, smoothing=self.smoothing,
                                    decoder_full_resolution=bool(self.decoder_full_resolution),
                                    **self._map_kwargs())
        return mod.to(self.device)

    def init_module(self) -> "_MaskExplainer":
        """Build the (untrained) explanation module now, e.g. to time it; ``fit`` does this itself."""
        if self.module_ is None:
            self.module_ = self._build()
            self.module_.eval()
        return self

    # -- training -----------------------------------------------------------
    def _step(self, x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def fit(self, data: Iterable, *, epochs: int | None = None, val_data: Iterable | None = None,
            out_dir: str | Path | None = None, progress: bool = True,
            log: Callable[[str], None] | None = None, guard: bool = True) -> "_MaskExplainer":
        """Train the explanation module; return ``self``.

        With ``out_dir`` a resume point is written after every epoch and a
        re-run continues from it (same settings required); the final
        explainer is saved there too. With ``val_data`` and ``guard``, a
        fitted explainer whose maps collapsed (see ``_check_collapse``)
        raises :class:`CollapseError` instead of being saved. The model's
        parameters are frozen while fitting (no weight gradients) and their
        ``requires_grad`` flags restored after.
        """
        # under the caller's torch.no_grad() too: the decoder learns by gradients (grad mode restored on return)
        with frozen_parameters(self.model), evaluating(self.model), torch.enable_grad():
            return self._fit(data, epochs=epochs, val_data=val_data, out_dir=out_dir, progress=progress, log=log,
                             guard=guard)

    def _fit(self, data: Iterable, *, epochs: int | None, val_data: Iterable | None, out_dir: str | Path | None,
             progress: bool, log: Callable[[str], None] | None, guard: bool) -> "_MaskExplainer":
        log = log or (lambda s: console.print(s, soft_wrap=True, highlight=False))
        from collections.abc import Iterator
        epochs = int(epochs or self.epochs)
        if isinstance(data, Iterator) and epochs > 1:
            raise NemtError(f"the training data are a one-shot iterator and {epochs} epochs read them {epochs} "
                            "times; pass a list of batches, a DataLoader or a Dataset")
        self._refuse_ignored()
        # a second fit starts over (scikit-learn's rule), as a new explainer would; out_dir's resume point resumes
        self.module_, self.history_, self.layers_, self.kernel_size_ = None, [], None, None
        self._model_versions = None  # the weights this fit is for are remembered when it ends
        self.epochs_ = epochs
        mod = self.init_module().module_
        ctx = context(self.device)
        from nemt.explainers.nemt.teacher import fingerprint_update
        seen = hashlib.sha256()  # the resume key's fingerprint, fed by the mean image's pass when it reads the data
        read = getattr(self, "objective", None) == "nested" and \
            self._set_mean_image(data, ctx, observe=lambda x: fingerprint_update(seen, x))
        with preserved_rng():  # a data set that draws as it reads draws nothing from the caller's generators
            data_key = _data_key(data, seen if read else None)
        data = self._teacher_data(data, out_dir, progress, log, ctx) \
            if getattr(self, "objective", None) == "teacher" else self._loader(data, ctx)
        key = json.loads(json.dumps({"params": self.hyper_params(), "epochs": epochs,  # another version's: refused
                                     "model": model_checksum(self.model), "nemt": __version__,
                                     "code": code_fingerprint(), **data_key}))
        self._last_report = None  # set by validate(); the guard reuses the final epoch's report
        ddp = None
        if ctx.distributed:  # the decoder learns on every rank; the frozen model inside it has no trainable weights
            from torch.nn.parallel import DistributedDataParallel
            ddp = DistributedDataParallel(_LogitsOf(mod), device_ids=[self.device] if self.device.type == "cuda"
                                          else None)
            self._train_logits = ddp

        def use_generator(gen: torch.Generator) -> None:
            mod.smoothing.generator = gen  # the random smoothing draws from the micro-batch's generator

        try:
            self.history_ = fit_loop(mod, data, self._step, epochs=epochs, optimizer=self.optimizer, lr=self.lr,
                                     weight_decay=self.weight_decay, schedule=self.schedule,
                                     accumulate=self.accumulate, seed=self.seed, device=self.device, key=key,
                                     out_dir=out_dir, history=self.history_, log=log, progress=progress,
                                     validate=None if val_data is None else (lambda: self.validate(val_data)),
                                     on_generator=use_generator, ddp=ddp, ctx=ctx, check_batch=self._check_batch)
        finally:
            self._train_logits = None
        self._remember_model(key["model"])
        if not ctx.main:  # rank 0 checks the result and saves it
            return self
        if val_data is not None:
            self._check_collapse(val_data, out_dir, guard, log)
        if out_dir:
            self.save(out_dir)
        return self

    _train_logits: nn.Module | None = None

    def _refuse_ignored(self) -> None:
        """Refuse, before fitting, a parameter set away from its default that this explainer's objective never
        reads (it would be ignored, and yet recorded in the card); see :data:`OBJECTIVE_ONLY`."""
        objective = getattr(self, "objective", None)
        if objective is None:
            return
        from nemt.explainers.base import init_defaults
        defaults = init_defaults(type(self))
        for owners, names in OBJECTIVE_ONLY:
            if objective in owners:
                continue
            owner = " or ".join(owners)
            for name in names:
                given = self._params.get(name, defaults.get(name))
                if not _same_value(given, defaults.get(name)):
                    raise _BadParameter(name, f"{given!r} applies to objective {owner} only; objective="
                                        f"{objective!r} never reads it (it would be ignored)")

    def _check_batch(self, x: Any, y: Any, batch: str = "a training batch") -> None:
        """A batch the module can learn from (or be validated on), or a clear error: x (B, C, *input_size)
        floating and finite; y, where the objective reads it, the model's labels: class indices (B,) within its
        outputs for a multi-class model, (B, n_outputs) 0/1 for a multi-label one."""
        exp = (self._in_channels, *self._input_size)
        if not torch.is_tensor(x) or not x.is_floating_point() or tuple(x.shape[1:]) != exp:
            what = f"{x.dtype} of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise NemtError(f"{batch}'s x is {what}; this explainer is built for floating (B, "
                            f"{', '.join(map(str, exp))}) inputs (input_size, in_channels)")
        why = nonfinite_problem(x)
        if why:
            raise NemtError(f"{batch}'s x holds {why}")
        if torch.is_tensor(y) and y.numel() and self.targeted and getattr(self, "objective", None) != "teacher":
            self._check_labels(x, y, batch)

    def _check_labels(self, x: torch.Tensor, y: torch.Tensor, batch: str) -> None:
        n, b, task = self._n_maps(), x.shape[0], getattr(self, "task", "multiclass")
        if task == "regression" or n == 1:
            return  # one output: every target is 0, y is not read
        if task == "multiclass":
            if y.ndim == 2 and y.shape[1] == 1:
                y = y[:, 0]
            if y.ndim != 1 or y.shape[0] != b:
                hint = " (one-hot or probabilities? give class indices)" if y.ndim == 2 and y.shape[1] == n else ""
                raise NemtError(f"{batch}'s labels y have shape {tuple(y.shape)}; a multi-class model's labels are "
                                f"class indices of shape ({b},){hint}")
            if y.dtype == torch.bool or (y.is_floating_point() and not torch.equal(y, y.round())):
                raise NemtError(f"{batch}'s labels y are {y.dtype} values that are not class indices")
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= n:
                raise NemtError(f"{batch}'s labels y run from {lo} to {hi}; the model has {n} outputs "
                                f"(class indices 0..{n - 1})")
        elif tuple(y.shape) != (b, n):
            raise NemtError(f"{batch}'s labels y have shape {tuple(y.shape)}; a multi-label model's labels are "
                            f"(B, {n}) 0/1 values, one column per output")

    def _eval_batches(self, data: Iterable) -> Iterable[tuple[torch.Tensor, Any]]:
        """Validation batches as fit reads them: a map-style Dataset in batches of ``batch_size``, in order;
        each checked like a training batch and cast to float32 on the explainer's device."""
        from torch.utils.data import DataLoader, Dataset
        if isinstance(data, Dataset) and not isinstance(data, DataLoader):
            data = DataLoader(data, batch_size=int(self.batch_size), shuffle=False)
        for x, y in batches(data):
            self._check_batch(x, y, "a validation batch")
            yield x.to(self.device, torch.float32), y

    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's mask logits and the model's outputs in a training step: through the
        ``DistributedDataParallel`` wrapper under torchrun (so the ranks' gradients are averaged), else directly."""
        return (self._train_logits or self.module_.logits)(x)

    def _check_collapse(self, val_data: Iterable, out_dir: str | Path | None, guard: bool,
                        log: Callable[[str], None]) -> None:
        """The collapse guard after fitting (NEMt); other explainers have none."""

    def _check_fitted(self) -> ExplanationModule:
        if self.module_ is None:
            raise NemtError("this explainer is not fitted: call fit(data) or load(dir, model) first")
        self._check_model_unchanged()
        return self.module_

    def _remember_model(self, sha256: str) -> None:
        """The weights this explainer was fitted for (or loaded with): their checksum, and each tensor's in-place
        version counter, which any change of its values (an optimiser step, ``load_state_dict``) bumps."""
        self._model_sha256, self._model_versions = sha256, _versions(self.model)

    def _check_model_unchanged(self) -> None:
        """Refuse to explain for weights changed in place since the fit or load (its maps would explain the former
        model); the checksum is recomputed only when a version counter moved, so an unchanged model costs a
        pass over its tensors' counters."""
        known = getattr(self, "_model_versions", None)
        if known is None or _versions(self.model) == known:
            return
        if model_checksum(self.model) != self._model_sha256:
            raise NemtError("the model's weights changed since this explainer was fitted (or loaded): its maps "
                            "would explain the former weights; fit it again for these weights")
        self._model_versions = _versions(self.model)  # the same values written again (e.g. load_state_dict)

    @torch.no_grad()
    def _maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every output's map (B, n_maps, *spatial) and the model's outputs, from one pass."""
        mod = self._check_fitted()
        mod.eval()
        exp = (self._in_channels, *self._input_size)
        if tuple(x.shape[1:]) != exp:
            raise ParameterError(f"input is {tuple(x.shape[1:])}, the explainer was fitted for {exp}"
                                 + (" (channel-last? give (B, C, *spatial))"
                                    if (x.shape[-1], *x.shape[1:-1]) == exp else ""))
        return mod(x.to(self.device))

    # -- persistence --------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``explainer.safetensors`` and ``explainer.json`` (naming the model's checksum)."""
        mod = self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in mod.state_dict().items()}
        with atomic_path(directory / WEIGHTS) as tmp:
            save_file(state, str(tmp))
        card = getattr(self.model, "card", None)
        write_json(directory / CARD, {
            "format": FORMAT, "kind": type(self).__name__, "params": self.hyper_params(),
            "fitted": self.fitted_facts(),
            "model_sha256": model_checksum(self.model), "weights_sha256": sha256_file(directory / WEIGHTS),
            "model": {"arch": getattr(card, "arch", None), "task": getattr(card, "task", None),
                      "label_names": getattr(card, "label_names", None)},
            "n_maps": self._n_maps(), "history": self.history_, "nemt_version": __version__,
        })
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, device: str | torch.device | None = None):
        """Read a saved explainer for ``model``; refuses a model other than the one it was fitted for.

        The card is checked field by field (types, ranges, agreement with ``model``): a hand-edited or damaged
        ``explainer.json`` is a :class:`~nemt.errors.CardError` naming the file, the field (``params.NAME``,
        ``fitted.NAME``) and the reason, and weights of another shape one line, not torch's dump."""
        directory = Path(directory)
        path = directory / CARD
        if not path.is_file():
            raise CardError(path, None, "explainer card not found")
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CardError(path, None, f"not valid JSON ({exc})") from exc
        if not isinstance(card, dict):
            raise CardError(path, None, "card must be a JSON object")
        if card.get("format") != FORMAT:
            raise CardError(path, "format", f"expected {FORMAT!r}, got {card.get('format')!r}")
        if card.get("kind") != cls.__name__:
            raise CardError(path, "kind", f"this is a {card.get('kind')} explainer, not {cls.__name__}")
        if card.get("model_sha256") != model_checksum(model):
            raise CardError(path, "model_sha256", "the explainer was fitted for another model (weights differ); "
                            "fit a new explainer for this model")
        digest = card.get("weights_sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            raise CardError(path, "weights_sha256", "missing or not a SHA-256 hex digest; re-save the explainer")
        if not (directory / WEIGHTS).is_file():
            raise CardError(directory / WEIGHTS, None, "explainer weights not found")
        if sha256_file(directory / WEIGHTS) != digest:
            raise CardError(directory / WEIGHTS, "weights_sha256", "the weights file does not match its card "
                            "(changed or damaged after saving)")
        if not isinstance(card.get("params"), dict):
            raise CardError(path, "params", "missing or not an object of the explainer's parameters")
        params = dict(card["params"])
        known = init_parameters(cls) - {"device"}  # the device is the loader's choice, not the card's
        for key in sorted(params):
            if key not in known:
                raise CardError(path, f"params.{key}", f"not a parameter of {cls.__name__}")
        model_card = getattr(model, "card", None)
        for key in ("input_size", "in_channels"):  # the model's own (its card) unless the card of a plain module
            own = getattr(model_card, key, None)
            if own is not None and params.get(key) is not None and params[key] != own:
                raise CardError(path, f"params.{key}", f"{params[key]!r}, but the model takes {own!r}")
        if cls is NEMt and "objective" not in params:
            params["objective"] = "paper"  # saved before the nested objective existed: trained with the paper loss
        params.setdefault("decoder_full_resolution", True)  # saved before the lighter decoder existed
        if params.get("objective") == "nested":
            params.setdefault("preservation_bound", None)  # saved before the bound existed: trained unbounded
            params.setdefault("preservation_weight", 1.0)  # saved before the weight existed: equal games
            params.setdefault("occlusion", "inpaint")  # a card without it was fitted with inpainting, whatever the default
        if params.get("objective") in ("nested", "teacher"):
            params.setdefault("map_smoothing", True)  # saved before the option existed: its map was smoothed
        try:
            self = cls(model, device=device, **params)
        except _BadParameter as exc:  # a hand-edited or foreign parameter: name it
            raise CardError(path, f"params.{exc.name}", exc.reason) from None
        except (NemtError, TypeError, ValueError) as exc:
            raise CardError(path, "params", str(exc)) from None
        fitted = card.get("fitted") or {}
        if not isinstance(fitted, dict):
            raise CardError(path, "fitted", "not an object")
        for key, own in (("input_size", self._input_size), ("in_channels", self._in_channels)):
            if key in fitted and fitted[key] != own:
                raise CardError(path, f"fitted.{key}", f"{fitted[key]!r}, but the model takes {own!r}")
        if fitted.get("kernel_size") is not None:
            try:
                _check_kernel_size(fitted["kernel_size"], self._input_size, "kernel_size")
            except _BadParameter as exc:
                raise CardError(path, "fitted.kernel_size", exc.reason) from None
        layer_names = {name for name, _ in _unwrap(model).named_modules() if name}
        for where, names in (("params.layers", params.get("layers")), ("fitted.layers", fitted.get("layers"))):
            if names is None:
                continue
            own = where == "fitted.layers" and params.get("encoder") == "own" and not params.get("layers")
            if not isinstance(names, list) or not (names or own) or not all(isinstance(n, str) for n in names):
                raise CardError(path, where, f"must be a non-empty list of the model's layer names, got {names!r}")
            missing = [n for n in names if n not in layer_names]
            if missing:
                raise CardError(path, where, f"{missing} are not layers of the model")
        epochs = fitted.get("epochs")
        if epochs is not None and not _is_count(epochs, 0):
            raise CardError(path, "fitted.epochs", f"must be a whole number >= 0, got {epochs!r}")
        seconds = fitted.get("teacher_seconds")
        if seconds is not None and not (_is_finite(seconds) and seconds >= 0):
            raise CardError(path, "fitted.teacher_seconds", f"must be a finite number >= 0, got {seconds!r}")
        if not isinstance(card.get("history", []), list):
            raise CardError(path, "history", f"must be a list of the epochs' records, got {card['history']!r}")
        if "n_maps" in card and card["n_maps"] != self._n_maps():
            raise CardError(path, "n_maps", f"{card['n_maps']!r}, but the model has {self._n_maps()} outputs to map")
        self.layers_, self.kernel_size_ = fitted.get("layers"), fitted.get("kernel_size")
        if self.kernel_size_ is None and params.get("kernel_size") is None:  # every card since the first has it:
            self.kernel_size_ = _MaskExplainer._default_kernel_size(self)  # a hand-made one gets the paper's box
        self.epochs_ = fitted.get("epochs", params.get("epochs"))
        if "teacher_seconds" in fitted:
            self.teacher_seconds_ = fitted["teacher_seconds"]
        self.module_ = self._build()
        try:
            state = load_file(str(directory / WEIGHTS))
            self.module_.load_state_dict(state)
        except Exception as exc:  # safetensors / shape errors: one line, not torch's list of every tensor
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            detail = (lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)).rstrip(".")
            raise CardError(directory / WEIGHTS, None, f"weights do not fit the explainer its card describes "
                            f"({detail}{'; ...' if len(lines) > 2 else ''}; the card's params.decoder_channels, "
                            "decoder_full_resolution, encoder and fitted.layers shape it)") from None
        self.module_.eval()
        self.history_ = card.get("history", [])
        self._remember_model(card["model_sha256"])
        return self


OBJECTIVES = ("nested", "paper", "teacher")
TEACHER_LOSSES = ("bce", "kl")
GAMES = ("both", "deletion", "preservation")
DEFAULT_AREAS = (0.01, 0.025, 0.05, 0.1, 0.2)  # 1 % added on BUSI/demo validation (pointing game; docs/results.md)
DEFAULT_PRESERVATION_BOUND = 2.0  # chosen on the validation splits of the demo and BUSI (docs/results.md)
#: chosen on the validation splits, then replicated on fresh NEMt seeds under a rule fixed before those fits (docs/results.md)
DEFAULT_PRESERVATION_WEIGHT = 0.5
#: the deletion game played with inpainting and with the training images' mean image, scored by the fill that
#: removes more of the evidence, the preservation game on the mean image: adopted by a rule fixed before its fits
#: on the validation splits of the demo and BUSI (docs/results.md; benchmarks/results/nemt_either_fill.md); "inpaint" before
DEFAULT_OCCLUSION = "inpaint-or-mean-image"
#: parameters only some objectives read (the paper's loss, a student's, the nested games), with those objectives;
#: fit refuses them set away from their default under another. ``init_keep`` starts the mask head at a uniform
#: logit, which the nested masks (top areas of the logits) cannot see; a student learns its teacher's maps on the
#: images as they are (its own augmentation is ``teacher_flip``).
OBJECTIVE_ONLY = (
    (("paper",), ("quantity", "area_weight", "change_weight", "area_target", "train_targets")),
    (("teacher",), ("teacher_budget", "teacher_targets", "teacher_loss", "teacher_batch", "teacher_seed",
                    "teacher_flip", "student_map")),
    (("nested",), ("games", "min_scale", "preservation_bound", "preservation_weight", "targets_per_image",
                   "present_fraction", "temperature")),
    (("paper", "teacher"), ("init_keep",)),
    (("nested", "paper"), ("flip",)),
)


def _data_key(data: Any, seen=None) -> dict:
    """What a resume point records of its training data, so that a re-run on other data is refused, not mixed
    into the fit: a map-style Dataset's (or a DataLoader's) length and images (one read of each), a list's
    batches; nothing for a one-shot iterable. ``seen``: the hash a pass over exactly these items (in this order)
    has already been fed (:meth:`NEMt._set_mean_image`'s), so that they are not read again."""
    from torch.utils.data import DataLoader, Dataset

    from nemt.explainers.nemt.teacher import items_fingerprint
    ds = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(ds, Dataset) and hasattr(ds, "__len__"):
        xs = () if seen is not None else (torch.as_tensor(split_xy(ds[i])[0]) for i in range(len(ds)))
        return {"data": {"items": len(ds), "items_sha256": items_fingerprint(xs, seen)}}
    if isinstance(data, (list, tuple)):
        xs = () if seen is not None else (torch.as_tensor(x) for x, _ in batches(data))
        return {"data": {"batches": len(data), "batches_sha256": items_fingerprint(xs, seen)}}
    return {}


def _versions(model: nn.Module) -> tuple:
    """Each parameter's and buffer's identity and in-place version counter (a tensor replaced, or its values
    changed in place, changes the tuple); a fraction of a millisecond for a ResNet-18."""
    return tuple((id(v), v._version) for v in itertools.chain(model.parameters(), model.buffers()))


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(u, v) for u, v in zip(a, b))
    if _is_number(a) and _is_number(b):
        return float(a) == float(b)
    return a == b


DEFAULT_MAP_AREAS = (0.01,)  # chosen on the demo's validation split (docs/results.md); the logits rank every pixel anyway
# parameters that shape only the map made from the fitted logits (set_map_areas, set_map_smoothing): no refit
#: (a student's map kind first: the areas and smoothing apply to its fixed-area map only)
EXPLANATION_TIME_PARAMS = ("student_map", "map_areas", "map_smoothing")


class CollapseError(NemtError):
    """A fitted explainer whose maps are empty or full for some targets (see ``NEMt.collapse_report``)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@register("nemt")
class NEMt(_MaskExplainer):
    """Targeted neural explanation masks (Møller et al., NLDL 2025), one map per model output, one pass.

    The decoder has one channel per output (classes, labels, or the single
    regression output). Two training objectives (``objective``):

    - ``nested`` (default), robust to saturated classifiers by construction:
      each channel's logits are cut at fixed areas (``areas``, e.g. the top
      1/2.5/5/10/20 % of pixels; one area drawn per sample and step), so a
      mask can be neither empty nor full; the straight-through gradient
      moves the pixels at the mask's edge. Rewards are the target's
      log-odds (never saturates) in a deletion game (delete the mask: the
      evidence should fall by its own size, max(|c|, ``min_scale``)) and a
      preservation game (keep only the mask on the filled image: the
      evidence should stay), hinged once won
      (:func:`~nemt.explainers.nemt.losses.game_loss`); a preservation
      game lost by more than ``preservation_bound`` (default 2: the kept mask
      alone moves the target's log-odds twice its clean evidence the wrong
      way) gives no gradient, since a small mask kept on the filled image is
      far from the model's data and its log-odds there can reward a fixed
      place over the finding (the demo's opacity); ``None``: unbounded (a
      bound of 1 loses the saturated toy's finding, see docs/results.md); the
      preservation term is weighted by ``preservation_weight`` (default
      0.5, against the deletion game's 1, chosen on the validation splits:
      with equal weights the demo's diffuse opacities were pointed at less
      often, since keeping a small part of one on the filled background
      reads as another class). The map is the
      smoothed mean of the nested masks of ``map_areas`` (default: the top
      1 %; ``None``: the training areas): about 1 in the smallest, about 0
      outside the largest, and a small share of the logits' own order
      keeps every pixel ranked (for insertion/deletion curves and
      relevance rank). ``set_map_areas`` changes them without a refit.
    - ``paper``: the published deletion loss ``area_weight * mean(1 - k) -
      change_weight * mean((q(x*k) - q(x))^2)``, kept for reproduction. Known
      failure: on a confident classifier q = softmax saturates, the change
      term has no gradient, and the area term empties the masks (the fit's
      collapse guard then refuses the result).

    Targets: each training image explains ``targets_per_image`` of the
    outputs, each one its "present" target (the true class; a positive label
    of a multi-label model; the predicted class without labels) with
    probability ``present_fraction`` and otherwise any output uniformly, so
    every channel learns on every kind of image. Every map shows evidence
    *for* its target: for a class the image argues against (negative
    log-odds) it is the region that supports the class most, and for a class
    with no localised evidence (e.g. "normal") the region whose deletion
    lowers it most; it always has its fixed area, never empty.
    ``explain`` returns the maps of the requested targets.
    """

    #: what a fitted explainer may change without a refit (``get_explainer(..., path=, map_smoothing=False)``,
    #: ``--param nemt.map_smoothing=false``): the setters ``set_map_areas`` / ``set_map_smoothing``
    EXPLANATION_TIME_PARAMS = EXPLANATION_TIME_PARAMS

    def __init__(self, model: nn.Module, *, objective: str = "nested", areas: Sequence[float] = DEFAULT_AREAS,
                 map_areas: Sequence[float] | None = DEFAULT_MAP_AREAS, temperature: float = 1.0, map_temperature: float = 0.02,
                 games: str = "both", min_scale: float = 1.0,
                 preservation_bound: float | None = DEFAULT_PRESERVATION_BOUND,
                 preservation_weight: float = DEFAULT_PRESERVATION_WEIGHT,
                 targets_per_image: int = 1,
                 present_fraction: float = 0.5, occlusion: str = DEFAULT_OCCLUSION, blur_sigma: float | None = None,
                 quantity: str = "prob", area_weight: float = 1.0, change_weight: float = 2.0,
                 area_target: float | None = None, train_targets: str | None = None,
                 teacher: str | None = None, teacher_params: dict | None = None, teacher_budget: int | None = None,
                 teacher_targets: str | None = None, teacher_loss: str = "bce", teacher_batch: int = 16,
                 teacher_seed: int = 0, student_map: str = "sigmoid", teacher_flip: bool = False,
                 flip: bool = False, map_smoothing: bool = False, **kw: Any):
        super().__init__(model, **kw)
        self._params.update({k: v for k, v in locals().items() if k not in ("self", "__class__", "model", "kw")})
        if objective not in OBJECTIVES:
            raise _BadParameter("objective", f"must be one of {OBJECTIVES}, got {objective!r}")
        if occlusion not in OCCLUSIONS:
            raise _BadParameter("occlusion", f"must be one of {OCCLUSIONS}, got {occlusion!r}")
        if quantity not in QUANTITIES:
            raise _BadParameter("quantity", f"must be one of {QUANTITIES}, got {quantity!r}")
        if games not in GAMES:
            raise _BadParameter("games", f"must be one of {GAMES}, got {games!r}")
        areas = [areas] if _is_number(areas) else areas  # one area, as `--param map_areas=0.05` gives it
        map_areas = [map_areas] if _is_number(map_areas) else map_areas
        for name, a in (("areas", areas), ("map_areas", map_areas or areas)):
            if isinstance(a, (str, bytes)) or not a or not all(_is_number(v) and 0 < v < 1 for v in a):
                raise _BadParameter(name, f"must be fractions strictly between 0 and 1, got {a!r}")
        if not _is_count(targets_per_image):
            raise _BadParameter("targets_per_image", f"must be a whole number >= 1, got {targets_per_image!r}")
        if not (_is_number(present_fraction) and 0 <= present_fraction <= 1):
            raise _BadParameter("present_fraction", f"must be a fraction in [0, 1], got {present_fraction!r}")
        card = getattr(model, "card", None)
        if card is not None and targets_per_image > card.out_channels:
            raise _BadParameter("targets_per_image", f"{targets_per_image} is more than the model's "
                                f"{card.out_channels} outputs")
        for name, v in (("temperature", temperature), ("map_temperature", map_temperature), ("min_scale", min_scale)):
            if not (_is_finite(v) and v > 0):
                raise _BadParameter(name, f"must be a finite number > 0, got {v!r}")
        if blur_sigma is not None and not (_is_finite(blur_sigma) and blur_sigma > 0):
            raise _BadParameter("blur_sigma", f"must be a finite number of pixels > 0 (or unset for the size's "
                                f"default), got {blur_sigma!r}")
        if area_target is not None and (not _is_number(area_target) or not 0 < area_target < 1):
            raise _BadParameter("area_target", f"must be a fraction strictly between 0 and 1, got {area_target!r}")
        for name, v in (("area_weight", area_weight), ("change_weight", change_weight)):
            if not (_is_finite(v) and v >= 0):
                raise _BadParameter(name, f"must be a finite number >= 0, got {v!r}")
        for name, flag in (("map_smoothing", map_smoothing), ("flip", flip), ("teacher_flip", teacher_flip)):
            if not isinstance(flag, bool):
                raise _BadParameter(name, f"must be true or false, got {flag!r}")
        if teacher_params is not None and not isinstance(teacher_params, dict):
            raise _BadParameter("teacher_params", f"must be an object of the teacher's parameters, "
                                f"got {teacher_params!r}")
        if teacher_params and teacher is None:
            raise _BadParameter("teacher_params", f"{sorted(teacher_params)} need a teacher (teacher=METHOD, "
                                "--teacher): they would be ignored")
        self.task = card.task if card else "multiclass"
        if train_targets not in (None, "true", "predicted", "all"):
            raise _BadParameter("train_targets", f"must be true, predicted or all, got {train_targets!r}")
        if (objective == "teacher") != (teacher is not None):
            raise _BadParameter("teacher", "and objective='teacher' go together (a student of METHOD)")
        if teacher is not None:
            from nemt.explainers.base import available
            if teacher in ("nemt", "nem") or teacher not in available():
                raise _BadParameter("teacher", f"must be one of {[m for m in available() if m not in ('nemt', 'nem')]}"
                                    f", got {teacher!r}")
        if teacher_loss not in TEACHER_LOSSES:
            raise _BadParameter("teacher_loss", f"must be one of {TEACHER_LOSSES}, got {teacher_loss!r}")
        if teacher_budget is not None and not _is_count(teacher_budget):
            raise _BadParameter("teacher_budget", f"must be a positive number of images, got {teacher_budget!r}")
        from nemt.explainers.nemt.teacher import TEACHER_TARGETS
        if teacher_targets is not None and teacher_targets not in TEACHER_TARGETS:
            raise _BadParameter("teacher_targets", f"must be one of {TEACHER_TARGETS}, got {teacher_targets!r}")
        if not _is_count(teacher_batch):
            raise _BadParameter("teacher_batch", f"must be a whole number >= 1, got {teacher_batch!r}")
        if not _is_count(teacher_seed, 0):
            raise _BadParameter("teacher_seed", f"must be a whole number >= 0, got {teacher_seed!r}")
        self.teacher, self.teacher_params, self.teacher_budget = teacher, dict(teacher_params or {}), teacher_budget
        self.teacher_targets = teacher_targets or ("true" if self.task == "multiclass" else "all")
        self.teacher_loss, self.teacher_batch = teacher_loss, int(teacher_batch)
        self.teacher_seed = int(teacher_seed)  # the teacher's own draws: students of any seed share its maps
        # a student's augmentation: each image and its teacher map mirrored together (last axis), half the time
        self.teacher_flip = bool(teacher_flip)
        # NEMt's augmentation (nested and paper objectives): each training image mirrored (last axis) half the
        # time; the frozen model is then explained on the mirrored image, so the games stay exact
        self.flip = bool(flip)
        if student_map not in ("sigmoid", "areas"):
            raise _BadParameter("student_map", f"must be 'sigmoid' or 'areas', got {student_map!r}")
        self.student_map = student_map
        # whether the fixed-area map passes the smoothing operator at explanation time (training always smooths);
        # off by default since 2026-11-29 (with the larger training box, NESTED_BOX_AT_224)
        self.map_smoothing = bool(map_smoothing)
        self.teacher_seconds_: float | None = None
        self.objective = objective
        self.areas = [float(a) for a in areas]
        self.map_areas = [float(a) for a in map_areas] if map_areas else None
        self.temperature, self.map_temperature = float(temperature), float(map_temperature)
        self.games, self.min_scale = games, float(min_scale)
        if preservation_bound is not None and not (_is_number(preservation_bound) and preservation_bound > 0):
            raise _BadParameter("preservation_bound", f"must be positive, got {preservation_bound!r}")
        self.preservation_bound = None if preservation_bound is None else float(preservation_bound)
        if not (_is_finite(preservation_weight) and preservation_weight >= 0):
            raise _BadParameter("preservation_weight", f"must be a finite number >= 0, got {preservation_weight!r}")
        self.preservation_weight = float(preservation_weight)
        self.targets_per_image, self.present_fraction = int(targets_per_image), float(present_fraction)
        self.occlusion, self.quantity = occlusion, quantity
        self.blur_sigma = blur_sigma
        self.area_weight, self.change_weight, self.area_target = area_weight, change_weight, area_target
        self.train_targets = train_targets
        self.collapse_: dict | None = None
        self._last_report: dict | None = None
        self._n_outputs: int | None = None

    def _default_kernel_size(self) -> int:
        """The nested objective's images and volumes: :data:`NESTED_BOX_AT_224` (13 px at 96 px, 17 at 128);
        the paper's objective, students and signals keep the paper's box."""
        if self.objective == "nested" and len(self._input_size) >= 2:
            return kernel_size_for(tuple(self._input_size), NESTED_BOX_AT_224)
        return super()._default_kernel_size()

    def _map_kwargs(self) -> dict:
        if self.objective == "paper":
            return {"map_kind": "keep"}
        if self.objective == "teacher" and self.student_map == "sigmoid":
            return {"map_kind": "sigmoid"}
        return {"map_kind": "nested", "map_areas": self.map_areas or self.areas,
                "map_temperature": self.map_temperature, "map_smoothing": self.map_smoothing}

    def set_student_map(self, student_map: str, map_areas: Sequence[float] | None = None) -> "NEMt":
        """A student's map (no refit): ``"sigmoid"`` (the teacher's map as learnt) or ``"areas"`` (the nested
        fixed-area map of its logits, like NEMt's, at ``map_areas``: e.g. the teacher's own area)."""
        if self.objective != "teacher":
            raise NemtError("student_map applies to students (objective='teacher') only")
        if student_map not in ("sigmoid", "areas"):
            raise ParameterError(f"student_map must be 'sigmoid' or 'areas', got {student_map!r}")
        self.student_map = self._params["student_map"] = student_map
        if map_areas is not None:
            self.map_areas = [float(a) for a in map_areas]
            self._params["map_areas"] = map_areas
        if self.module_ is not None:
            for k, v in self._map_kwargs().items():
                setattr(self.module_, k, tuple(v) if k == "map_areas" else v)
        return self

    def _refuse_sigmoid_student(self, what: str) -> None:
        if self.objective == "teacher" and self.student_map == "sigmoid":
            raise NemtError(f"{what} applies to a student's fixed-area map; this student's map is its sigmoid: "
                            "set student_map='areas' first (--param student_map=areas)")

    def set_map_areas(self, map_areas: Sequence[float] | None) -> "NEMt":
        """Change the areas the map is built from (no refit: the logits rank the pixels whatever the areas)."""
        if self.objective == "paper":
            raise NemtError("map_areas apply to the nested objective only")
        self._refuse_sigmoid_student("map_areas")
        if _is_number(map_areas):
            map_areas = [map_areas]  # one area, as `--param map_areas=0.05` gives it
        if map_areas is not None and not (isinstance(map_areas, (list, tuple))
                                          and all(_is_number(v) and 0 < v < 1 for v in map_areas)):
            raise NemtError(f"map_areas must be fractions strictly between 0 and 1, got {map_areas!r}")
        self.map_areas = [float(a) for a in map_areas] if map_areas else None
        self._params["map_areas"] = map_areas
        if self.module_ is not None:
            self.module_.map_areas = tuple(self.map_areas or self.areas)
        return self

    def set_map_smoothing(self, map_smoothing: bool) -> "NEMt":
        """Whether the fixed-area map is smoothed at explanation time (no refit; training always smooths the
        masks it plays the games with). Unsmoothed (the default since 2026-11-29), the map is the top
        ``map_areas`` of the logits themselves and its peak their largest logit; smoothed, its peak is the
        densest box of that top area (docs/results.md, "NEMt's objective")."""
        if self.objective == "paper":
            raise NemtError("map_smoothing applies to fixed-area maps (nested objective, students' 'areas' map)")
        self._refuse_sigmoid_student("map_smoothing")
        if not isinstance(map_smoothing, bool):
            raise ParameterError(f"map_smoothing must be true or false, got {map_smoothing!r}")
        self.map_smoothing = self._params["map_smoothing"] = bool(map_smoothing)
        if self.module_ is not None:
            self.module_.map_smoothing = self.map_smoothing
        return self

    def _n_maps(self) -> int:
        card = getattr(self.model, "card", None)
        if card is not None:
            return card.out_channels
        if self._n_outputs is None:  # a plain module: its outputs on one blank input
            dev = next(iter(self.model.parameters()), torch.zeros(())).device
            self._n_outputs = n_outputs_of(self.model, x=torch.zeros(1, self._in_channels, *self._input_size,
                                                                    device=dev))
        return self._n_outputs

    def _scale(self) -> float:
        ts = getattr(getattr(self.model, "card", None), "target_scale", None)
        return float(ts["std"]) if ts else 1.0

    def _zero_value(self) -> torch.Tensor | None:
        pre = getattr(self.model, "preprocessing", None)
        if pre is None:
            return None
        return pre.normalise(torch.zeros(1, self._in_channels, *([1] * self.spatial_dims)))[0].flatten()

    def _fill_sigma(self) -> float:
        """The blur and inpainting sigma in pixels: ``blur_sigma``, or one that follows the input's size."""
        return float(self.blur_sigma) if self.blur_sigma is not None else fill_sigma_for(tuple(self._input_size))

    def _occlude(self, x: torch.Tensor, keep: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """``x`` with ``1 - keep`` deleted by the fill ``kind`` (default: this explainer's, see ``game_fills``)."""
        kind = kind or first_fill(self.occlusion)
        if kind == MEAN_IMAGE:  # the training images' mean where the mask is deleted
            return x * keep + self._mean_image(x) * (1 - keep)
        return occlude(x, keep, kind, zero_value=self._zero_value(), sigma=self._fill_sigma())

    def _filled(self, x: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """The fully filled image (nothing kept): the background of the preservation game."""
        if kind == MEAN_IMAGE:
            return self._mean_image(x).expand_as(x)
        return self._occlude(x, torch.zeros_like(x[:, :1]), kind)

    def _outpaint(self, x: torch.Tensor, keep: torch.Tensor, prior: float = 0.1) -> torch.Tensor:
        """``x`` kept on ``keep``, the rest filled by normalised convolution from the kept pixels with the mean
        image as a prior of weight ``prior``: (blur(x·k) + prior·mean) / (blur(k) + prior). Next to a kept region
        the fill continues it (a kept ring of dark tissue stays dark inside, where a fixed background would put
        a contrast the image does not have); far from it the fill is the mean image."""
        return diffusion_fill(x, keep, self._fill_sigma(), prior=self._mean_image(x), prior_weight=prior)

    mean_image_: torch.Tensor | None = None

    def _mean_image(self, x: torch.Tensor) -> torch.Tensor:
        """The training images' mean (set by ``fit``); a step taken outside ``fit`` uses its batch's mean."""
        return (self.mean_image_ if self.mean_image_ is not None else x.mean(0, keepdim=True)).to(x)

    def _set_mean_image(self, data: Any, ctx: Context | None = None,
                        observe: Callable[[torch.Tensor], None] | None = None) -> bool:
        """The training images' pixel-wise mean (``mean_image_``, (1, C, *spatial)), when a game plays on it.

        A map-style data set is read whole (on every rank under torchrun); data given as batches are read as
        given, and under torchrun their sums are added over the ranks, so every rank plays on the same mean.
        ``observe`` sees each item (a Dataset's) or batch (a list's) as read; True when it saw all of them in
        their order (a map-style Dataset or a list of batches read), False otherwise (nothing or a loader)."""
        if not uses_mean_image(self.occlusion):
            return False
        from collections.abc import Iterator

        from torch.utils.data import DataLoader, Dataset
        if isinstance(data, Iterator):  # a generator: this pass would leave nothing to train on
            raise NemtError(f"occlusion {self.occlusion!r} reads the training images' mean image before training, "
                            "a second pass over the data, and the data given are a one-shot iterator; pass a list "
                            "of batches, a DataLoader or a Dataset")
        whole = isinstance(data, Dataset) and not isinstance(data, DataLoader)
        items = (data[i] for i in range(len(data))) if whole else data
        in_order = whole or isinstance(data, (list, tuple))
        total = torch.zeros(1, self._in_channels, *self._input_size, dtype=torch.float64)
        n, bad = 0, 0
        with preserved_rng():  # an extra pass over a shuffled loader draws nothing from the caller's generators
            for b in items:
                x = torch.as_tensor(split_xy(b)[0])
                if observe is not None and in_order:
                    observe(x)
                x = x.unsqueeze(0) if x.ndim == self.spatial_dims + 1 else x
                if tuple(x.shape[1:]) != tuple(total.shape[1:]):
                    bad += 1  # the training loop's input check names it, at its first batch
                    continue
                total += x.detach().to("cpu", torch.float64).sum(0, keepdim=True)
                n += x.shape[0]
        if ctx is not None and ctx.distributed and not whole:
            flat = torch.cat([total.flatten(), torch.tensor([float(n), float(bad)], dtype=torch.float64)])
            flat = flat.to(self.device)
            torch.distributed.all_reduce(flat)
            total, n, bad = flat[:-2].view_as(total).cpu(), int(flat[-2].item()), int(flat[-1].item())
        # no images or images of another shape: no mean image; the training loop then stops with its own error
        # ("gave no batch", the shape it expects), as it does for every fill (NaN images too, at the first batch)
        self.mean_image_ = (total / n).float() if n and not bad else None
        return in_order

    # -- the paper's objective -----------------------------------------------
    def _train_targets(self, y: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        mode = self.train_targets or ("true" if self.task == "multiclass" else "all")
        if mode == "true" and y is None:
            mode = "predicted"
        if mode == "true":
            if self.task != "multiclass":
                raise NemtError("train_targets='true' is for multi-class models; use 'all'")
            return y.long().view(-1, 1)
        return resolve_targets(mode, self.model, outputs=out)

    def _deletion(self, x: torch.Tensor, y: torch.Tensor | None):
        """Paper objective: keep-masks of each sample's training targets and the target quantity before/after.

        Returns keep (B, T', *spatial), q_clean (B, T') and q_deleted (B, T'),
        every quantity gathered per sample (sample i, its own target(s)).
        """
        logits, out = self._logits(x)
        keep_all = self.module_.smoothing(torch.sigmoid(logits))
        t = self._train_targets(y, out)  # (B, T')
        b, tt = t.shape
        keep = _select_maps(keep_all, t)
        # one occluded copy of each image per target: (B*T', C, *spatial)
        occluded = self._occlude(x.repeat_interleave(tt, dim=0), keep.reshape(b * tt, 1, *x.shape[2:]))
        q_del = target_quantity(self.model(occluded).view(b, tt, -1), self.task, self.quantity, self._scale())
        q_clean = target_quantity(out, self.task, self.quantity, self._scale())
        return keep, torch.gather(q_clean, 1, t), torch.gather(q_del, 2, t.unsqueeze(2)).squeeze(2)

    # -- the nested objective --------------------------------------------------
    def _sample_targets(self, y: torch.Tensor | None, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B, K) training targets: the present one with probability ``present_fraction``, else any output."""
        b, n = out.shape
        k = self.targets_per_image
        if n == 1:
            return torch.zeros(b, 1, dtype=torch.long, device=out.device)
        if self.task == "multiclass":
            present = (y.long().view(-1) if y is not None else out.argmax(1)).cpu()
            present = present.view(b, 1).expand(b, k)
        else:
            pos = ((y > 0.5) if y is not None else (out > 0)).float().cpu().view(b, n)
            none = pos.sum(1, keepdim=True) == 0
            w = torch.where(none, torch.ones_like(pos), pos)
            present = torch.multinomial(w, k, replacement=True, generator=gen)
        rand = torch.randint(n, (b, k), generator=gen)
        pick = torch.rand(b, k, generator=gen) < self.present_fraction
        return torch.where(pick, present, rand).to(out.device)

    def _games(self, x: torch.Tensor, logits: torch.Tensor, out: torch.Tensor, t: torch.Tensor,
               areas: torch.Tensor, hard: bool = True):
        """The games for targets ``t`` (B, K) at ``areas`` (B*K,): log-odds deleted, preserved, clean."""
        b, k = t.shape
        sp = x.shape[2:]
        lg = _select_maps(logits, t).reshape(b * k, *sp)
        m = nested_masks(lg, areas.to(lg.device), self.temperature, hard=hard)
        m = self.module_.smoothing(m.view(b, k, *sp)).reshape(b * k, 1, *sp)
        xr = x.repeat_interleave(k, dim=0)
        fills = game_fills(self.occlusion)  # one deletion and one preservation game per pair, in this order
        parts = []
        for kind, background in fills:
            for fill in deletion_kinds(kind):  # the mask deleted (a counterfactual fill for inpainting)
                parts.append(self._occlude(xr, 1 - m, fill))
            if background == OUTPAINT:  # only the mask kept, the rest filled from it, then the mean image
                parts.append(self._outpaint(xr, m))
            else:  # ... and only the mask kept, on the reference
                parts.append(xr * m + self._filled(x, background).repeat_interleave(k, dim=0) * (1 - m))
        o = log_odds(self.model(torch.cat(parts)), self.task, self._scale()).view(len(parts), b * k, -1)
        o = o.gather(2, t.reshape(1, -1, 1).expand(len(parts), -1, 1)).squeeze(2)  # (games' inputs, B*K)
        m_del, m_pres, i = [], [], 0
        for kind, _ in fills:
            n = len(deletion_kinds(kind))
            m_del.append(o[i:i + n].amin(0))  # several fills: the one that removes more of the evidence
            m_pres.append(o[i + n])
            i += n + 1
        clean = log_odds(out, self.task, self._scale()).gather(1, t).reshape(-1).repeat(len(fills))
        return torch.cat(m_del), torch.cat(m_pres), clean

    # -- the teacher objective (a student of another explainer) ------------------
    def make_teacher(self):
        """The teacher explainer, built from ``teacher`` and ``teacher_params`` (with this explainer's seed)."""
        from nemt.explainers.base import get_explainer
        return get_explainer(self.teacher, self.model, seed=self.teacher_seed, device=self.device,
                             **self.teacher_params)

    def _teacher_data(self, data: Any, out_dir: str | Path | None, progress: bool, log: Callable[[str], None],
                      ctx: Context | None = None):
        """A loader of (x, (y, teacher maps, their targets)) over the training items (at most ``teacher_budget``,
        a seeded draw), the teacher's maps computed or read from ``out_dir/teacher``."""
        from nemt.explainers.nemt.teacher import TeacherCache, items_fingerprint
        items = _Items(data)
        if self.teacher_budget is not None and self.teacher_budget < len(items):
            perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(self.teacher_seed)).tolist()
            items = items.subset(sorted(perm[:int(self.teacher_budget)]))
        key = {"teacher": self.teacher, "params": self.teacher_params, "targets": self.teacher_targets,
               "seed": self.teacher_seed,
               "model": model_checksum(self.model), "items": len(items),
               "items_sha256": items_fingerprint(items[i][0] for i in range(len(items))),  # every image: one read
               "code": code_fingerprint()}
        teacher = self.make_teacher()  # a bad teacher parameter is refused before the cache folder is written
        cache = TeacherCache(Path(out_dir) / "teacher" if out_dir else None, key)
        cache.fill(teacher, items, self.model, targets=self.teacher_targets, seed=self.teacher_seed,
                   device=self.device,
                   batch_size=self.teacher_batch, progress=progress, log=log, ctx=ctx)
        maps, targets, seconds = cache.load(len(items))
        self.teacher_seconds_ = seconds
        log(f"teacher {self.teacher}: {len(items)} training images, {seconds:.1f} s of explaining "
            f"({1000 * seconds / max(len(items), 1):.0f} ms/image)")
        paired = _Paired(items, maps, targets)
        return self._loader(paired, ctx)

    def _teacher_step(self, x, y, gen):
        _, maps, targets = y
        m = maps.float().clamp(0, 1)
        if self.teacher_flip:
            x, m = _flip_half(gen, x, m)
        logits, _ = self._logits(x)  # (B, n_maps, *spatial), at the image's size
        lg = _select_maps(logits, targets.long())
        if self.teacher_loss == "bce":
            loss = F.binary_cross_entropy_with_logits(lg, m)
        else:  # KL(teacher || student) between maps normalised to distributions over the pixels
            p = m.flatten(2)
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
            logq = lg.flatten(2).log_softmax(-1)
            loss = (p * (p.clamp_min(1e-12).log() - logq)).sum(-1).mean()
        with torch.no_grad():
            err = (torch.sigmoid(lg) - m).abs().mean()
        return loss, {"teacher_mae": float(err)}

    def _step(self, x, y, gen):
        if self.objective == "teacher":
            return self._teacher_step(x, y, gen)
        gen = gen if gen is not None else torch.Generator().manual_seed(self.seed)
        if self.flip:
            x, = _flip_half(gen, x)
        if self.objective == "paper":
            keep, qc, qd = self._deletion(x, y)
            return deletion_loss(keep, qc, qd, area_weight=self.area_weight, change_weight=self.change_weight,
                                 area_target=self.area_target)
        logits, out = self._logits(x)
        t = self._sample_targets(y, out, gen)
        idx = torch.randint(len(self.areas), (t.numel(),), generator=gen)
        areas = torch.tensor(self.areas)[idx]
        loss, parts = game_loss(*self._games(x, logits, out, t, areas), min_scale=self.min_scale, games=self.games,
                                preservation_bound=self.preservation_bound,
                                preservation_weight=self.preservation_weight)
        parts["area"] = float(areas.mean())
        return loss, parts

    # -- validation and the collapse guard --------------------------------------
    @torch.no_grad()
    def collapse_report(self, data: Iterable, *, empty_below: float = 0.5) -> dict:
        """Per target, on held-out batches: how its maps look and what deleting them does.

        For every image and every output t: the map of t. A map is *empty*
        when no pixel of it before the smoothing operator reaches
        ``empty_below`` (nothing is marked; the smoothing spreads a small
        mask's peak, so it is left out of this test), *full* when every
        pixel does (everything is). Per target: ``area`` (mean map
        value), ``empty`` and ``full`` (fractions of maps), ``change`` (mean
        |Δ log-odds| of t when the map is deleted, keep = 1 - map, with this
        explainer's fill), and ``collapsed``: more than half of its maps
        empty or full. Returns {"targets": {name: {...}}, "collapsed": [names]}.
        """
        with evaluating(self.model):
            return self._collapse_report(data, empty_below)

    def _collapse_report(self, data: Iterable, empty_below: float) -> dict:
        mod = self._check_fitted()
        mod.eval()
        n_maps = self._n_maps()
        labels = label_names_of(self.model)
        names = (labels[:1] or ["output"]) if self.task == "regression" else \
            (labels or [f"output {i}" for i in range(n_maps)])
        sums = {k: torch.zeros(n_maps, dtype=torch.float64) for k in ("area", "empty", "full", "change")}
        n = 0
        for x, _ in self._eval_batches(data):
            logits, out = mod.logits(x, native=True)
            maps = mod.maps(logits, size=x.shape[2:])  # (B, T, *spatial), as explain makes them
            b = x.shape[0]
            raw = mod.maps(logits, smooth=False, size=x.shape[2:]).flatten(2)
            sums["area"] += maps.flatten(2).mean(2).sum(0).double().cpu()
            sums["empty"] += (raw.amax(2) < empty_below).sum(0).double().cpu()
            sums["full"] += (raw.amin(2) >= empty_below).sum(0).double().cpu()
            keep = (1 - maps).reshape(b * n_maps, 1, *x.shape[2:])
            occluded = self._occlude(x.repeat_interleave(n_maps, dim=0), keep)
            lo = log_odds(self.model(occluded), self.task, self._scale()).view(b, n_maps, -1)
            clean = log_odds(out, self.task, self._scale())
            diag = torch.diagonal(lo, dim1=1, dim2=2)  # output t under map t deleted: (B, T)
            sums["change"] += (diag - clean).abs().sum(0).double().cpu()
            n += b
        targets = {}
        for i, name in enumerate(names[:n_maps]):
            row = {k: round(float(v[i]) / max(n, 1), 4) for k, v in sums.items()}
            row["collapsed"] = bool(row["empty"] > 0.5 or row["full"] > 0.5)
            targets[name] = row
        return {"n_images": n, "empty_below": empty_below, "targets": targets,
                "collapsed": [k for k, v in targets.items() if v["collapsed"]]}

    def _check_collapse(self, val_data, out_dir, guard, log) -> None:
        # the last epoch's validation already scored these weights on this data; a resumed, finished run has none
        rep = self._last_report or self.collapse_report(val_data)
        self._last_report = None
        self.collapse_ = rep
        if out_dir:
            write_json(Path(out_dir) / "collapse.json", rep)
        for name, row in rep["targets"].items():
            log(f"  target {name}: map area {row['area']:.3f}, empty {row['empty']:.0%}, full {row['full']:.0%}, "
                f"|change of log-odds| {row['change']:.3f}" + ("  COLLAPSED" if row["collapsed"] else ""))
        if rep["collapsed"] and guard:
            stale = [Path(out_dir) / f for f in (CARD, WEIGHTS)] if out_dir else []
            if any(f.is_file() for f in stale):  # another fit's explainer: it must not pass for this refused one
                for f in stale:
                    f.unlink(missing_ok=True)
                log(f"  removed the explainer an earlier fit had saved in {out_dir} (it is not this fit's)")
            raise CollapseError(
                f"NEMt collapsed for target(s) {', '.join(rep['collapsed'])}: more than half of their validation "
                f"maps are empty or full (figures in {Path(out_dir) / 'collapse.json' if out_dir else 'collapse_'}); "
                "the explainer was not saved. " + {
                    "paper": "The paper's objective collapses on confident classifiers (docs/results.md); the default "
                             "objective (nested) cannot, by construction. ",
                    "teacher": f"A student learns its teacher's maps ({self.teacher}): are the teacher's own maps "
                               "empty or full here? ",
                }.get(self.objective, "") + "Pass --allow-collapse to save it anyway", rep)

    @torch.no_grad()
    def validate(self, data: Iterable) -> dict:
        """Mean over targets of the collapse report's figures: map area, empty share, |Δ log-odds|."""
        rep = self._last_report = self.collapse_report(data)
        rows = list(rep["targets"].values())
        return {k: round(sum(r[k] for r in rows) / max(len(rows), 1), 4) for k in ("area", "empty", "change")}

    def explain(self, x: torch.Tensor, target: Target = None) -> torch.Tensor:
        """Maps (B, T, *spatial) in [0, 1]: where each target's evidence is (see the class docstring)."""
        return self.explain_with_outputs(x, target)[0]

    def explain_and_predict(self, x: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and predictions from one pass of the model (see :meth:`Explainer.explain_and_predict`)."""
        maps, out = self.explain_with_outputs(x, target)
        return maps, output_score(out, task_of(self.model), "prob")

    def explain_with_outputs(self, x: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``explain``'s maps and the model's raw outputs on ``x`` (B, n_outputs), from the same pass."""
        x = self.check_input(x)
        with evaluating(self.model):
            maps, out = self._maps(x)
        maps = _select_maps(maps, resolve_targets(target, self.model, x, outputs=out))
        return postprocess(maps, self.postprocess, x.ndim - 2), out


@register("nem")
class NEM(_MaskExplainer):
    """Unsupervised neural explanation masks for an encoder's representation (Møller et al., ICML 2024).

    Loss d(Φ(x), Φ(m⊙x)) + λ1·mean(m) + λ2·B with B = −d(Φ(m⊙x), Φ((1−m)⊙x)) +
    d(Φ(x), Φ(m⊙x)), d = (1 − cos)/2; ``explain`` returns the kept region m,
    one map (T = 1). ``model`` maps (B, C, *spatial) to embeddings (B, …);
    masking replaces removed pixels by 0 (the mean in normalised space).
    """

    targeted = False

    def __init__(self, model: nn.Module, *, lambda1: float = 1 / 8, lambda2: float = 1 / 4, **kw: Any):
        super().__init__(model, **kw)
        self._params.update({k: v for k, v in locals().items() if k not in ("self", "__class__", "model", "kw")})
        for name, v in (("lambda1", lambda1), ("lambda2", lambda2)):
            if not (_is_finite(v) and v >= 0):
                raise _BadParameter(name, f"must be a finite number >= 0, got {v!r}")
        self.lambda1, self.lambda2 = lambda1, lambda2

    def _n_maps(self) -> int:
        return 1

    def _step(self, x, y, gen):
        logits, e_clean = self._logits(x)
        keep = self.module_.smoothing(torch.sigmoid(logits))
        return nem_loss(e_clean, self.model(x * keep), self.model(x * (1 - keep)), keep,
                        lambda1=self.lambda1, lambda2=self.lambda2)

    @torch.no_grad()
    def validate(self, data: Iterable) -> dict:
        with evaluating(self.model):
            return self._validate(data)

    def _validate(self, data: Iterable) -> dict:
        self.module_.eval()
        tot = {"area": 0.0, "distance": 0.0}
        n = 0
        for x, _ in self._eval_batches(data):
            maps, e = self.module_(x)
            keep = 1 - maps
            _, parts = nem_loss(e, self.model(x * keep), self.model(x * (1 - keep)), keep)
            for k in tot:
                tot[k] += parts[k] * len(x)
            n += len(x)
        return {k: round(v / max(n, 1), 4) for k, v in tot.items()}

    def explain(self, x: torch.Tensor, target: Target = None) -> torch.Tensor:
        """The kept region (B, 1, *spatial) in [0, 1]; ``target`` is ignored (no output is targeted)."""
        x = self.check_input(x)
        with evaluating(self.model):
            maps, _ = self._maps(x)
        return postprocess(1 - maps, self.postprocess, x.ndim - 2)
