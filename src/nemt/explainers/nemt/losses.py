"""Losses of NEMt (targeted, deletion form) and NEM (unsupervised), and the occlusion values.

Shapes: inputs x (B, C, *spatial) in the model's normalised space; keep-masks
k (B, T, *spatial) in [0, 1]; model outputs (B, n_outputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nemt.errors import NemtError

OCCLUSIONS = ("mean", "zero", "blur", "inpaint")
QUANTITIES = ("prob", "logit", "one_minus_prob")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *spatial) with reflect padding, any spatial_dims."""
    d = x.ndim - 2
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
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
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = radius
        mode = "reflect" if all(s > radius for s in out.shape[2:]) else "replicate"
        out = conv(F.pad(out, pad, mode=mode), k, groups=c)
    return out


def occlude(x: torch.Tensor, keep: torch.Tensor, kind: str, *, zero_value: torch.Tensor | None = None,
            sigma: float = 8.0) -> torch.Tensor:
    """``x`` with the region ``1 - keep`` deleted: x·k + fill·(1 − k).

    ``x`` (N, C, *spatial), ``keep`` (N, 1, *spatial). What fills the deleted region:

    - ``mean``: 0, the data set's mean intensity in the normalised space (the paper);
    - ``zero``: black, i.e. ``zero_value`` = normalise(0) per channel;
    - ``blur``: the image blurred with a Gaussian of ``sigma`` pixels;
    - ``inpaint``: a counterfactual fill from the kept surroundings by normalised
      convolution, blur(x·k) / blur(k) with a Gaussian of ``sigma`` pixels (0,
      the mean, where no kept pixel is near). A dark lesion is replaced by the
      tissue around it, which blurring (it leaves a smooth region as it is)
      and mean-filling (a weak change for a dark region) do not do.
      Differentiable, torch-only and any spatial_dims, unlike the classical
      biharmonic or Telea inpainters, which are too slow to run per training step.
    """
    if kind == "mean":
        fill = torch.zeros_like(x)
    elif kind == "zero":
        if zero_value is None:
            raise NemtError("occlusion 'zero' needs the normalised value of black")
        fill = zero_value.to(x).view(1, -1, *([1] * (x.ndim - 2))).expand_as(x)
    elif kind == "blur":
        fill = gaussian_blur(x, sigma)
    elif kind == "inpaint":
        weight = gaussian_blur(keep, sigma)
        fill = gaussian_blur(x * keep, sigma) / (weight + 1e-3)
    else:
        raise NemtError(f"unknown occlusion {kind!r}; choose one of {OCCLUSIONS}")
    return x * keep + fill * (1 - keep)


def target_quantity(out: torch.Tensor, task: str, quantity: str, scale: float = 1.0) -> torch.Tensor:
    """The per-output quantity whose change is rewarded: (…, n_outputs), outputs on the last axis.

    Classification: softmax/sigmoid probability, the logit, or 1 - p.
    Regression: the predicted value divided by ``scale`` (the training
    targets' spread), whatever ``quantity`` says.
    """
    if task == "regression":
        return out / scale
    if quantity == "logit":
        return out
    p = out.softmax(dim=-1) if task == "multiclass" else out.sigmoid()  # outputs on the last axis
    if quantity == "prob":
        return p
    if quantity == "one_minus_prob":
        return 1 - p
    raise NemtError(f"unknown target quantity {quantity!r}; choose one of {QUANTITIES}")


def deletion_loss(keep: torch.Tensor, q_clean: torch.Tensor, q_occluded: torch.Tensor, *,
                  area_weight: float = 1.0, change_weight: float = 2.0,
                  area_target: float | None = None) -> tuple[torch.Tensor, dict]:
    """NEMt's loss: ``area_weight * area - change_weight * mean(change^2)``.

    ``keep`` is (B, T, *spatial); ``q_clean`` / ``q_occluded`` are (B, T): the
    target quantity of each sample's own target(s), gathered per sample.
    ``area`` is the mean deleted fraction mean(1 - k), or, with an
    ``area_target`` a, the mean of |deleted fraction of each map - a|.
    """
    deleted = (1 - keep).flatten(2).mean(dim=2)  # (B, T)
    area = deleted.mean() if area_target is None else (deleted - area_target).abs().mean()
    change = q_occluded - q_clean
    loss = area_weight * area - change_weight * (change ** 2).mean()
    return loss, {"area": deleted.detach().mean().item(), "change": change.detach().abs().mean().item()}


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d = (1 - cos)/2 per sample, for (B, D) embeddings."""
    return (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)) / 2


def nem_loss(e_clean: torch.Tensor, e_kept: torch.Tensor, e_removed: torch.Tensor, keep: torch.Tensor, *,
             lambda1: float = 1 / 8, lambda2: float = 1 / 4) -> tuple[torch.Tensor, dict]:
    """Unsupervised NEM: d(Φ(x), Φ(m⊙x)) + λ1·mean(m) + λ2·B,
    B = −d(Φ(m⊙x), Φ((1−m)⊙x)) + d(Φ(x), Φ(m⊙x))."""
    keep_d = cosine_distance(e_clean, e_kept)
    contrast = -cosine_distance(e_kept, e_removed) + keep_d
    area = keep.flatten(1).mean(dim=1)
    loss = (keep_d + lambda1 * area + lambda2 * contrast).mean()
    return loss, {"area": area.detach().mean().item(), "distance": keep_d.detach().mean().item()}
