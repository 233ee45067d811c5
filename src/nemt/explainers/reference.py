"""Reference maps every method must beat on ground-truth data: random, Sobel and Laplace edges, the input, a centred Gaussian.

They look at no model output; they answer to the same ``explain(x, target)``
so that the benchmark treats them like any method. Maps are (B, T, *spatial)
in [0, 1], identical across targets.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nemt.explainers.base import Explainer, check_range, register


class _Reference(Explainer):
    def __init__(self, model: nn.Module, device=None, seed: int = 0, **kw):
        super().__init__(model, device, **kw)
        self.seed = seed

    def _map(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, *spatial)
        raise NotImplementedError

    def _attribute(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = self._map(x.float())  # maps of the image itself: in float32 whatever the model's dtype
        return m.expand(-1, t.shape[1], *m.shape[2:]).clone()


@register("random")
class RandomMap(_Reference):
    """Uniform noise from ``seed``: the same noise field for every image, so no map depends on its batch."""

    def _map(self, x):
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(1, 1, *x.shape[2:], generator=g).to(x.device).expand(x.shape[0], -1, *x.shape[2:])


@register("input")
class InputMap(_Reference):
    """The input image itself (mean over channels)."""

    def _map(self, x):
        return x.mean(dim=1, keepdim=True)


@register("sobel")
class SobelMap(_Reference):
    """Gradient magnitude of the input by Sobel filters along every spatial axis (1D: the central difference)."""

    def _map(self, x):
        d = x.ndim - 2
        img = x.mean(dim=1, keepdim=True)
        smooth = torch.tensor([1.0, 2.0, 1.0], device=x.device)
        diff = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
        conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
        padded = F.pad(img, [1, 1] * d, mode="replicate")
        mag = torch.zeros_like(img)
        for axis in range(d):
            k = torch.ones((1,) * 0, device=x.device)
            for a in range(d):
                k = torch.tensordot(k, diff if a == axis else smooth, dims=0) if k.ndim else (diff if a == axis else smooth)
            mag = mag + conv(padded, k.view(1, 1, *k.shape)) ** 2
        return mag.sqrt()


@register("laplace")
class LaplaceMap(_Reference):
    """Absolute discrete Laplacian of the input (second-difference edge detector, 2D or 3D)."""

    def _map(self, x):
        d = x.ndim - 2
        img = F.pad(x.mean(dim=1, keepdim=True), [1, 1] * d, mode="replicate")
        core = tuple(slice(1, -1) for _ in range(d))
        lap = -2 * d * img[(slice(None), slice(None)) + core]
        for axis in range(d):
            for shift in (0, 2):
                sl = list(core)
                sl[axis] = slice(shift, img.shape[2 + axis] - 2 + shift)
                lap = lap + img[(slice(None), slice(None)) + tuple(sl)]
        return lap.abs()


@register("gaussian")
class CentredGaussian(_Reference):
    """A centred Gaussian blob (peak 1) whose mean value over the image is ``area`` (default 0.1)."""

    def __init__(self, model: nn.Module, device=None, area: float = 0.1, seed: int = 0, **kw):
        super().__init__(model, device, seed, **kw)
        self.area = check_range("area", area, 0.0, 1.0)  # the blob's mean: 0 or 1 has no Gaussian

    @staticmethod
    def blob(spatial: tuple[int, ...], area: float, device=None) -> torch.Tensor:
        """(1, 1, *spatial) Gaussian with peak 1 and mean ``area`` (sigma found by bisection)."""
        axes = [torch.arange(s, dtype=torch.float64, device=device) - (s - 1) / 2 for s in spatial]
        r2 = sum(g ** 2 for g in torch.meshgrid(*axes, indexing="ij"))
        lo, hi = 1e-3, 10.0 * max(spatial)
        for _ in range(60):
            sigma = math.sqrt(lo * hi)
            if torch.exp(-r2 / (2 * sigma ** 2)).mean() < area:
                lo = sigma
            else:
                hi = sigma
        return torch.exp(-r2 / (2 * sigma ** 2)).float()[None, None]

    def _map(self, x):
        return self.blob(tuple(x.shape[2:]), self.area, x.device).expand(x.shape[0], 1, *x.shape[2:])
