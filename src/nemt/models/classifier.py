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

from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nemt.data.preprocess import Preprocessing
from nemt.errors import CardError, NemtError
from nemt.files import atomic_path, sha256_file
from nemt.models.card import ModelCard
from nemt.models.zoo import ARCHITECTURES, build_model
from nemt.ops import ParameterError, checked_outputs, evaluating, float_dtype_of, preserved_rng

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
        """Probabilities (multi-class softmax, multi-label sigmoid) or regression values, (B, T)."""
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
        pre = preprocessing or Preprocessing(size=tuple(input_size), channels=in_channels)
        card = ModelCard.from_dict({
            "arch": arch, "spatial_dims": spatial_dims, "in_channels": in_channels, "task": task,
            "label_names": list(label_names), "input_size": list(input_size),
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


def _probe(module: nn.Module, card: ModelCard) -> None:
    """``module`` takes the card's input and gives one output per label (one for regression)."""
    p = next(iter(module.parameters()), None)
    x = torch.zeros(2, card.in_channels, *card.input_size, device=p.device if p is not None else "cpu",
                    dtype=float_dtype_of(module) or torch.float32)
    try:
        with torch.no_grad(), evaluating(module):
            out = checked_outputs(module(x), 2)
    except ParameterError:
        raise
    except Exception as e:
        raise NemtError(f"the module cannot take the described input (2, {card.in_channels}, "
                        f"{', '.join(map(str, card.input_size))}): {type(e).__name__}: {str(e).splitlines()[0]}") from e
    want = 1 if card.task == "regression" else len(card.label_names)
    if out.shape[1] != want:
        raise NemtError(f"the module gives {out.shape[1]} outputs, the card describes {want} "
                        + ("(regression: one)" if card.task == "regression" else f"labels {card.label_names}"))


def load_model(directory: str | Path, *, module: nn.Module | None = None,
               device: str | torch.device = "cpu") -> Classifier:
    """Read a saved classifier, validating card and weights; returned in eval mode.

    ``module`` supplies the network for a card whose ``arch`` is not one of
    nemt's (a wrapped user model); its weights are loaded into it.
    """
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
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
                module = build_model(card.arch, spatial_dims=card.spatial_dims, in_channels=card.in_channels,
                                     out_channels=card.out_channels, **card.arch_kwargs)
        except NemtError as exc:  # build_model's own message names the architecture and the keywords
            raise CardError(directory / CARD, "arch_kwargs", str(exc)) from exc
        except (TypeError, ValueError) as exc:  # an unknown or ill-typed keyword of the architecture
            raise CardError(directory / CARD, "arch_kwargs", f"{card.arch} cannot be built with "
                            f"{card.arch_kwargs}: {type(exc).__name__}: {exc}") from exc
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
    module.load_state_dict(state)
    clf = Classifier(module, card).to(device)
    clf.eval()
    return clf
