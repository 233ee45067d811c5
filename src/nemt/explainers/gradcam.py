"""Grad-CAM and Grad-CAM++ on a chosen or automatically found last convolutional stage.

Correct for batches whose samples have different targets: the score of each
sample's own target is back-propagated (``gather`` per sample, never the
B x B indexing of a shared class vector), and since samples do not interact
in an eval-mode network, the gradient of their sum gives each sample its own
gradient. By default (``fast=True``) the network runs as the BatchNorm-folded,
channels-last inference copy, tapped at the leaf module that makes the
stage's output (no BatchNorm is folded into or out of that leaf, so it
outputs what it outputs in the model: equal maps to float rounding);
``fast=False`` uses the model as it is. Works for 2D and 3D; maps are
upsampled to the input size (bi/trilinear) and min-max normalised per map.
A layer that never runs, whose output is not (B, C, *spatial), or that has
fewer than 2 cells (after global pooling, the map would be one value) is
refused naming it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemt.errors import NemtError
from nemt.explainers.base import Explainer, register, resize_linear
from nemt.explainers.fast import InferenceCopy, inference_copy
from nemt.explainers.layers import FeatureTap, find_stages, layer_name, output_leaf, tapped_output
from nemt.ops import ParameterError


MIN_CAM_CELLS = 3
"""Cells per axis the default layer needs. A map of 2 cells per axis, upsampled linearly (edges replicated),
always peaks in a corner block of a quarter of each side, whatever the model saw: a 32³ volume's last 2³
stage (smallcnn, ResNet) gave Grad-CAM++ pointing game 0.000 on the 3D phantoms, the 4³ stage before it 0.297
(Grad-CAM 0.500). 3 cells is the fewest whose peak can lie inside the image."""


def default_cam_layer(model: nn.Module, shape) -> str:
    """The default Grad-CAM layer for inputs of ``shape`` (C, *spatial): see :data:`MIN_CAM_CELLS`."""
    try:
        return find_stages(model, shape, min_cells=MIN_CAM_CELLS)[-1]
    except NemtError:  # every downsampled stage is coarser: the deepest spatial one, as before
        return find_stages(model, shape)[-1]


@register("gradcam")
class GradCAM(Explainer):
    """Selvaraju et al. 2017: weights = spatial mean of the gradient; map = ReLU(Σ_k w_k A_k).

    ``layer``: a module name of the network or the module itself (default: the
    deepest stage with at least :data:`MIN_CAM_CELLS` cells along every axis, else
    the deepest spatial one; found on the first input for a plain module);
    ``batch_size``: images per forward/backward pass (the memory bound).
    """

    needs_grad = True

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, device=None, batch_size: int = 32,
                 fast: bool = True, **kw):
        super().__init__(model, device, **kw)
        self.images_per_call = self.batch_size = int(batch_size)
        self.layer, self.fast = (None if layer is None else layer_name(model, layer)), fast
        self.net, self.tap_name = None, None
        if self.card is not None:  # find the layer now: a wrong name fails at construction
            self._setup((self.card.in_channels, *self.card.input_size))

    def _setup(self, shape) -> None:
        """Find the layer for inputs of ``shape`` (C, *spatial) and, with ``fast``, the folded copy that has it."""
        self.layer = self.layer or default_cam_layer(self.model, shape)
        # run on the folded channels-last copy when the stage's output is a leaf module's output there
        self.net, self.tap_name = self.model, self.layer
        if self.fast:
            leaf = output_leaf(self.model, self.layer, shape)
            if leaf is not None:
                # no BatchNorm folded into the tapped leaf (a conv ending the stage, followed by a BatchNorm
                # outside it, would output BN(conv) in the copy), nor the leaf folded away (a BatchNorm)
                copy = inference_copy(self.model, keep={leaf, "net." + leaf})
                names = dict(copy.net.named_modules())
                name = next((n for n in (leaf, "net." + leaf) if n in names), None)
                if copy.folded and name is not None:
                    self.net, self.tap_name = copy, name

    def _weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads.flatten(2).mean(dim=2)

    def _attribute(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            self._setup(tuple(x.shape[1:]))
        x = x.requires_grad_(True)  # a graph exists even for a frozen model
        d = x.ndim - 2
        if isinstance(self.net, InferenceCopy):
            self.net.refresh()  # rebuilt now if the model changed: the hook goes on the copy that runs
        with FeatureTap(self.net, [self.tap_name]) as tap, torch.enable_grad():
            out = self.net(x)
            acts = tapped_output(tap, self.tap_name, self.layer, x)
            if acts.shape[2:].numel() < 2:
                raise ParameterError(f"Grad-CAM layer {self.layer!r} outputs {tuple(acts.shape)}: fewer than 2 "
                                     "cells (after global pooling?), so every pixel would get the same value; "
                                     "choose an earlier layer")
            maps = []
            for j in range(t.shape[1]):
                score = out.gather(1, t[:, j:j + 1]).sum()  # each sample's own target
                grads, = torch.autograd.grad(score, acts, retain_graph=j + 1 < t.shape[1])
                w = self._weights(acts.detach(), grads)
                cam = F.relu((w.view(*w.shape, *([1] * d)) * acts.detach()).sum(dim=1))
                maps.append(cam)
        return resize_linear(torch.stack(maps, dim=1), x.shape[2:])


@register("gradcam++")
class GradCAMPlusPlus(GradCAM):
    """Chattopadhay et al. 2018: weights = Σ ReLU(g) · g² / (2g² + ΣA · g³)."""

    def _weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        g2, g3 = grads ** 2, grads ** 3
        sum_a = acts.flatten(2).sum(dim=2).view(*acts.shape[:2], *([1] * (acts.ndim - 2)))
        denom = 2 * g2 + sum_a * g3
        alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(g2))
        return (alpha * F.relu(grads)).flatten(2).sum(dim=2)
