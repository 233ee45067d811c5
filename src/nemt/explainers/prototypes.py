"""Prototype explanations of a Pantypes model (:mod:`nemt.models.pantypes`): which learned prototypes an
input is close to, what they look like, and which pixels make it close.

A Pantypes model classifies by the similarities ``s_j`` of the input's latent
code to ``K x M`` prototypes (``M`` per class); its explanation is the list of
the nearest prototypes with their similarities and decoded images
(:func:`~nemt.models.pantypes.top_prototypes`, drawn by :func:`prototype_figure`).
The explainer ``prototypes`` turns this into the ``(B, T, H, W)`` maps every
method returns, one per target class ``t``, with ``a_j = s_j / sum_{i in P_t} s_i``
the weights of class ``t``'s prototypes ``P_t`` for this input (the weights of
the model's KL term):

- ``kind="decoded"`` (default): the similarity-weighted decoded prototype of
  class ``t``, ``sum_{j in P_t} a_j D(p_j)``, as an intensity in [0, 1] (mean
  over channels; post-processing ``"none"``). It answers "what does class t
  look like at its prototypes nearest this input"; it is an image, not an
  attribution of the input, so localisation metrics do not apply to it.
- ``kind="contribution"``: the input's pixels weighted by how much they raise
  the similarity to class ``t``'s prototypes, gradient x input of
  ``sum_{j in P_t} a_j s_j(x)`` (``a_j`` held fixed), summed over channels
  (post-processing ``"positive"``: the pixels that pull the input towards the
  prototypes, min-max normalised). With the model's standardised inputs the
  implicit baseline is the training mean intensity. This is the map to score
  with the benchmark's metrics (a gradient stand-in for ProtoVAE's PRP).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from nemt.errors import NemtError
from nemt.explainers.base import Explainer, frozen_parameters, register
from nemt.models.pantypes import pantypes_of, top_prototypes
from nemt.ops import ParameterError, evaluating

__all__ = ["PrototypeExplainer", "prototype_figure", "top_prototypes"]

KINDS = ("decoded", "contribution")


@register("prototypes")
class PrototypeExplainer(Explainer):
    """Maps (B, T, H, W) from a Pantypes model's prototypes (see the module docstring for ``kind``).

    >>> from nemt.models.pantypes import Pantypes
    >>> net = Pantypes(out_channels=2, latent_dim=16, seed=0)
    >>> PrototypeExplainer(net).explain(torch.zeros(3, 1, 28, 28), target="all").shape
    torch.Size([3, 2, 28, 28])
    """

    #: the architecture this method needs (None for methods that take any model): it reads a Pantypes model's prototypes
    model_arch = "pantypes"

    def __init__(self, model: nn.Module, device=None, kind: str = "decoded", **kw):
        if kind not in KINDS:
            raise ParameterError(f"kind must be one of {KINDS}, got {kind!r}")
        try:
            self.net = pantypes_of(model)
        except NemtError as exc:
            raise ParameterError(f"method 'prototypes': {exc}") from exc
        kw.setdefault("postprocess", "none" if kind == "decoded" else "positive")
        super().__init__(model, device, **kw)
        self.kind = kind
        self.needs_grad = kind == "contribution"  # a gradient of the similarities

    def _weights(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities (b, T, M) of each target class's prototypes and their weights ``a_j`` (summing to 1)."""
        net = self.net
        s = s.view(len(s), net.n_classes, net.per_class)
        st = s[torch.arange(len(s), device=s.device)[:, None], t]  # (b, T, M)
        return st, st / st.sum(-1, keepdim=True)

    def _attribute(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        net = self.net
        if self.kind == "decoded":
            with torch.no_grad():
                mu, _ = net.encode(x)
                _, a = self._weights(net.similarities(mu), t)
                images = net.decoded_prototypes(x.shape[2:]).mean(1)  # (K * M, H, W)
                images = images.view(net.n_classes, net.per_class, *images.shape[1:])[t]  # (b, T, M, H, W)
                return (a[..., None, None] * images).sum(2)
        with torch.enable_grad(), frozen_parameters(self.model):
            xg = x.detach().clone().requires_grad_(True)
            mu, _ = net.encode(xg)
            st, a = self._weights(net.similarities(mu), t)
            score = (a.detach() * st).sum(-1)  # (b, T)
            cols = []
            for i in range(t.shape[1]):  # samples are independent in eval mode: one gradient per target
                (g,) = torch.autograd.grad(score[:, i].sum(), xg, retain_graph=i + 1 < t.shape[1])
                cols.append((g * xg).sum(1).detach())
        return torch.stack(cols, dim=1)


def _unit_images(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The inputs (B, C, H, W) as intensities in [0, 1] for display: the card's standardisation undone,
    else each image min-max scaled."""
    pre = getattr(model, "preprocessing", None)
    if pre is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).view(shape)
        u = x * std + mean
    else:
        flat = x.flatten(1)
        lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
        u = (x - lo) / (hi - lo).clamp_min(1e-12)
    return u.clamp(0, 1).detach().cpu().numpy()


def _show(ax, img: np.ndarray) -> None:
    ax.imshow(img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def prototype_figure(model: nn.Module, x: torch.Tensor, k: int = 3, *, path: str | Path | None = None,
                     label_names: Sequence[str] | None = None):
    """A matplotlib Figure: one row per input (B, C, H, W), the input then its ``k`` nearest prototypes
    decoded, titled with class, prototype index and similarity. Written as PNG to ``path`` when given.

    Drawn on a bare :class:`~matplotlib.figure.Figure` (no pyplot, no backend change).
    """
    from nemt.files import atomic_path
    from nemt.visualize import subplots

    if x.ndim != 4:
        raise ParameterError(f"x must be 2D images (B, C, H, W), got shape {tuple(x.shape)}")
    net = pantypes_of(model)
    names = list(label_names or getattr(getattr(model, "card", None), "label_names", None) or
                 [str(i) for i in range(net.n_classes)])
    dev = next(net.parameters()).device
    x = x.detach().to(dev)
    with evaluating(model):
        top = top_prototypes(model, x, k)
    shown = _unit_images(model, x)
    b, k = top["index"].shape
    fig, axes = subplots(b, k + 1, figsize=(1.9 * (k + 1), 2.1 * b), squeeze=False)
    for i in range(b):
        _show(axes[i, 0], shown[i])
        axes[i, 0].set_title(f"input: {names[int(top['predicted'][i])]}", fontsize=8)
        for j in range(k):
            _show(axes[i, j + 1], top["image"][i, j].cpu().numpy())
            axes[i, j + 1].set_title(f"{names[int(top['class'][i, j])]} p{int(top['index'][i, j])} "
                                     f"s={float(top['similarity'][i, j]):.2f}", fontsize=8)
    fig.tight_layout()
    if path is not None:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    return fig
