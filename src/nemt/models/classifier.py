"""A network together with its card: the object every explainer receives.

>>> net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=2)
>>> clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(64, 64),
...                              task="multiclass", label_names=["normal", "lesion"])
>>> clf(torch.zeros(1, 1, 64, 64)).shape
torch.Size([1, 2])

Any ``nn.Module`` that maps ``(B, C, *spatial)`` to ``(B, T)`` can be wrapped
with :meth:`Classifier.from_module`; models trained by ``nemt train`` are read
back with :func:`load_model`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nemt.data.preprocess import Preprocessing
from nemt.errors import CardError, NemtError
from nemt.files import atomic_path, sha256_file
from nemt.models.card import ModelCard
from nemt.models.zoo import ARCHITECTURES, SIZED_BY_INPUT, build_model
from nemt.ops import (ArgumentTypeError, ParameterError, checked_outputs, evaluating, float_dtype_of,
                      is_whole_number, preserved_rng)

WEIGHTS = "model.safetensors"
CARD = "model.json"


def predictions_from_outputs(out: torch.Tensor, task: str) -> torch.Tensor:
    """A model's raw outputs (B, T) as predictions: softmax over the classes (multi-class), a sigmoid
    per label (multi-label), or the values themselves (regression): :func:`nemt.ops.output_score` with ``"prob"``."""
    from nemt.ops import output_score
    return output_score(out, task, "prob")


class Classifier(nn.Module):
    """``net`` plus its :class:`ModelCard`.

    ``forward`` returns raw outputs ``(B, T)``: logits for classification,
    the predicted value in the target's units for regression. ``predict``
    returns probabilities (softmax or sigmoid) or values.
    """

    def __init__(self, net: nn.Module, card: ModelCard):
        super().__init__()
        self.net = net
        self.card = card
        self.preprocessing = Preprocessing.from_dict(card.preprocessing)
        scale = card.target_scale or {"mean": 0.0, "std": 1.0}
        self.register_buffer("_t_mean", torch.tensor(float(scale["mean"])), persistent=False)
        self.register_buffer("_t_std", torch.tensor(float(scale["std"])), persistent=False)

    @property
    def task(self) -> str:
        return self.card.task

    @property
    def label_names(self) -> list[str]:
        return self.card.label_names

    @property
    def spatial_dims(self) -> int:
        return self.card.spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.card.task == "regression":
            out = out * self._t_std + self._t_mean
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (multi-class softmax, multi-label sigmoid) or regression values, (B, T).

        Always in eval mode (no dropout, BatchNorm's running statistics used and left unchanged); every
        module's ``training`` flag is restored after, so a model in training mode stays in it."""
        with evaluating(self):
            return predictions_from_outputs(self(x), self.card.task)

    @classmethod
    def from_module(cls, module: nn.Module, *, spatial_dims: int, in_channels: int,
                    input_size: Sequence[int], task: str, label_names: Sequence[str],
                    preprocessing: Preprocessing | None = None, target_scale: dict | None = None,
                    arch: str = "custom") -> "Classifier":
        """Wrap a user's network with a small description of its input.

        The network answers one probe batch (zeros of the described input, in eval mode, no gradients; its
        state is left as it was): an input it cannot take, or outputs that are not one per label, are an
        error here rather than at the first explanation.
        """
        if not isinstance(module, nn.Module):
            raise ArgumentTypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        for name, v in (("spatial_dims", spatial_dims), ("in_channels", in_channels)):
            if not is_whole_number(v):
                raise ArgumentTypeError(f"{name} must be a whole number (int), got {v!r}")
            if v < 1:
                raise ParameterError(f"{name} must be at least 1, got {v}")
        if isinstance(input_size, (str, bytes)) or is_whole_number(input_size) or not hasattr(input_size, "__len__"):
            raise ArgumentTypeError(f"input_size must be one size per spatial axis, e.g. (224, 224), got "
                                    f"{input_size!r}")
        if not all(is_whole_number(v) and v >= 1 for v in input_size):
            raise ParameterError(f"input_size must be positive whole numbers, got {list(input_size)!r}")
        input_size = [int(v) for v in input_size]
        if isinstance(label_names, (str, bytes)) or not hasattr(label_names, "__iter__"):
            raise ArgumentTypeError(f"label_names must be a list of names, one per output (e.g. "
                                    f"['normal', 'lesion']), got {label_names!r}")
        label_names = [str(n) if isinstance(n, str) else n for n in label_names]  # NumPy's str_ as str
        if isinstance(preprocessing, dict):  # a card's "preprocessing" as it is stored
            preprocessing = Preprocessing.from_dict(preprocessing)
        if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
            raise ArgumentTypeError(f"preprocessing must be a Preprocessing (or its dict), got "
                                    f"{type(preprocessing).__name__}")
        pre = preprocessing or Preprocessing(size=tuple(input_size), channels=int(in_channels))
        card = ModelCard.from_dict({
            "arch": arch, "spatial_dims": int(spatial_dims), "in_channels": int(in_channels), "task": task,
            "label_names": label_names, "input_size": input_size,
            "preprocessing": pre.to_dict(), "target_scale": target_scale, "format": ModelCard.format,
        })
        _probe(module, card)
        return cls(module, card)

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``model.json`` (with the weights' SHA-256), atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        with atomic_path(directory / WEIGHTS) as tmp:
            save_file(state, str(tmp))
        self.card.weights_sha256 = sha256_file(directory / WEIGHTS)
        self.card.save(directory / CARD)
        return directory


def _probe(module: nn.Module, card: ModelCard, card_path: Path | None = None) -> None:
    """``module`` takes the card's input and gives one output per label (one for regression). With
    ``card_path`` (a saved card being loaded) a failure is a :class:`CardError` naming the card's field."""
    def fail(field: str, msg: str) -> NemtError:
        return CardError(card_path, field, msg) if card_path is not None else NemtError(msg)

    p = next(iter(module.parameters()), None)
    x = torch.zeros(2, card.in_channels, *card.input_size, device=p.device if p is not None else "cpu",
                    dtype=float_dtype_of(module) or torch.float32)
    try:
        with torch.no_grad(), evaluating(module):
            out = checked_outputs(module(x), 2)
    except ParameterError:
        raise
    except Exception as e:
        raise fail("input_size", f"the module cannot take the described input (2, {card.in_channels}, "
                   f"{', '.join(map(str, card.input_size))}): {type(e).__name__}: {str(e).splitlines()[0]}") from e
    want = 1 if card.task == "regression" else len(card.label_names)
    if out.shape[1] != want:
        raise fail("label_names", f"the module gives {out.shape[1]} outputs, the card describes {want} "
                   + ("(regression: one)" if card.task == "regression" else f"labels {card.label_names}"))


def load_model(directory: str | Path, *, module: nn.Module | None = None,
               device: str | torch.device = "cpu") -> Classifier:
    """Read a saved classifier, validating card and weights; returned in eval mode.

    ``module`` supplies the network for a card whose ``arch`` is not one of
    nemt's (a wrapped user model); its weights are loaded into it.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise ArgumentTypeError(f"load_model takes a model folder (str or Path), got {type(directory).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParameterError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda:0'): {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {str(device)!r}: no CUDA device is available here; use device='cpu'")
    given = directory = Path(directory)
    if not directory.exists():
        raise CardError(directory, None, "no such model folder")
    if directory.is_file():  # a file of a model folder (model.json, model.safetensors) names its folder
        directory = directory.parent
        if not (directory / CARD).is_file():
            raise CardError(given, None, f"a file, and its folder holds no {CARD}; give the model folder "
                            f"({CARD} + {WEIGHTS}, as `nemt train` or Classifier.save writes it)")
    card = ModelCard.load(directory / CARD)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CardError(weights, None, "weights file not found")
    if card.weights_sha256 is None:
        raise CardError(directory / CARD, "weights_sha256", "missing (null): the weights cannot be checked "
                        f"against the card; write the SHA-256 of {WEIGHTS} (sha256sum) into the card")
    if sha256_file(weights) != card.weights_sha256:
        raise CardError(weights, "weights_sha256", "weights do not match the card's checksum "
                        "(file changed or belongs to another model)")
    if module is None:
        if card.arch not in ARCHITECTURES:
            raise CardError(directory / CARD, "arch", f"{card.arch!r} is not a nemt architecture; "
                            "pass the network as module=")
        try:
            with preserved_rng():  # the initial weights, overwritten below, draw nothing from the caller's RNG
                kwargs = dict(card.arch_kwargs)
                if card.arch in SIZED_BY_INPUT:  # a card of a run that crashed before it wrote input_size there:
                    kwargs.setdefault("input_size", list(card.input_size))  # the card's input is the training size
                module = build_model(card.arch, spatial_dims=card.spatial_dims, in_channels=card.in_channels,
                                     out_channels=card.out_channels, **kwargs)
        except NemtError as exc:  # build_model's own message names the architecture and the keywords
            raise CardError(directory / CARD, "arch_kwargs", str(exc)) from exc
        except (TypeError, ValueError) as exc:  # an unknown or ill-typed keyword of the architecture
            raise CardError(directory / CARD, "arch_kwargs", f"{card.arch} cannot be built with "
                            f"{card.arch_kwargs}: {type(exc).__name__}: {exc}") from exc
        except (RuntimeError, MemoryError) as exc:  # e.g. an absurd in_channels: memory for its weights
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CardError(directory / CARD, None, f"{card.arch} ({card.spatial_dims}D, {card.in_channels} ch, "
                            f"{card.out_channels} outputs, {card.arch_kwargs}) cannot be built: "
                            f"{type(exc).__name__}: {first}") from exc
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise CardError(weights, None, f"unreadable safetensors file ({exc})") from exc
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, network wants "
            f"{tuple(own[wrong[0]].shape)}" if wrong else ""]))
        raise CardError(weights, "state_dict", f"weights do not fit {card.arch} "
                        f"({card.spatial_dims}D, {card.in_channels} ch, {card.out_channels} outputs): {detail}")
    params = {name for name, _ in module.named_parameters()}
    for k, v in own.items():
        if own[k].is_floating_point() and not state[k].is_floating_point():
            raise CardError(weights, "state_dict", f"{k} is stored as {state[k].dtype}, the network's tensor is "
                            f"{own[k].dtype}: not this network's weights")
        if k in params and state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            n = int((~torch.isfinite(state[k])).sum())
            raise CardError(weights, "state_dict", f"{k} holds {n} NaN or infinite values of {state[k].numel()}: "
                            "every output would be NaN (a diverged training run?)")
        if k in params and state[k].is_floating_point() and state[k].dtype != own[k].dtype:
            # load_state_dict casts to the network's dtype: a value beyond its range would become infinite there
            n = int((~torch.isfinite(state[k].to(own[k].dtype))).sum())
            if n:
                raise CardError(weights, "state_dict", f"{k} is stored as {state[k].dtype} and {n} of its values "
                                f"lie beyond the range of the network's {own[k].dtype}: they would load as infinite")
    module.load_state_dict(state)
    clf = Classifier(module, card).to(device)
    clf.eval()
    # a card edited to a size its network cannot take fails here, naming the field, not at first use: nemt's own
    # networks take any size from 32 px on (adaptive pooling), a user's module= is probed always (one pass)
    if card.arch not in ARCHITECTURES or min(card.input_size) < 32:
        _probe(clf.net, card, directory / CARD)
    return clf
