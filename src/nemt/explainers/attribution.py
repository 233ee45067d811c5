"""Captum's attribution methods behind our API: saliency, Integrated Gradients, Gradient SHAP, LIME, KernelSHAP.

Captum does the attribution; this module adds what it lacks for medical
models: our target convention (``"all"`` labels, ``"predicted"``, per-sample
tensors, label names), a memory bound per method (``batch_size``: the most
inputs per model call: images of saliency, path points of Integrated
Gradients, perturbations of LIME/KernelSHAP, samples of Gradient SHAP),
seeded and batch-independent randomness (each sample of a
random method is explained on its own under ``seed``, the caller's global RNG
restored after, so its map does not depend on the rest of the batch), grid superpixels for
LIME/KernelSHAP that work in 2D and 3D, and maps reduced to (B, T, *spatial).

:meth:`attribute` returns Captum's raw attributions, (B, T, C, *spatial),
identical to calling Captum with the same arguments (``fast=False``) or
equal to float rounding when Captum is given the BatchNorm-folded,
channels-last :class:`~nemt.explainers.fast.InferenceCopy` of the model
(``fast=True``, the default: about 1.4x faster on a CPU). :meth:`explain` sums
them over channels and keeps ``sign``: ``"abs"`` (default) or
``"positive"`` (min-max normalised to [0, 1]) or ``"signed"`` (divided by
the largest magnitude, in [-1, 1]).
"""
from __future__ import annotations

import math

import torch
from captum import attr as ca
from captum.attr._utils.approximation_methods import SUPPORTED_METHODS as IG_METHODS
from torch import nn

from nemt.explainers.base import Explainer, Target, baseline_image, check_range, register
from nemt.ops import ParameterError, check_cells, chunks, seeded
from nemt.explainers.fast import inference_copy

SIGNS = ("abs", "positive", "signed")


class CaptumExplainer(Explainer):
    """Base: one Captum call per target column; random methods one image at a time, each column under ``seed``,
    the others ``batch_size`` images at a time."""

    captum_class: type = ca.Saliency
    random = False  # does the Captum method draw random numbers?
    needs_grad = True  # does it differentiate the model (then the input must require gradients)?

    def __init__(self, model: nn.Module, device=None, sign: str = "abs", seed: int = 0, batch_size: int = 64,
                 fast: bool = True, **kw):
        if sign not in SIGNS:
            raise ParameterError(f"sign must be one of {SIGNS}, got {sign!r}")
        kw.setdefault("postprocess", sign)  # "abs", "positive" or "signed": :func:`nemt.ops.postprocess`
        super().__init__(model, device, **kw)
        self.sign, self.seed, self.batch_size = sign, int(seed), int(batch_size)
        # random methods: one image per call, so that no map depends on the rest of its batch; the others:
        # at most batch_size images per Captum call (the memory bound)
        self.images_per_call = 1 if self.random else self.batch_size
        self.method = self.captum_class(inference_copy(self.model, fast))

    def captum_kwargs(self, x: torch.Tensor) -> dict:
        """Arguments for Captum's ``attribute`` (besides inputs and target)."""
        return {}

    def _call(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.method.attribute(x, target=target, **self.captum_kwargs(x))

    def _columns(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Captum's attributions (b, T, C, *spatial) for a chunk whose targets are resolved."""
        if self.needs_grad:
            x = x.requires_grad_(True)
        columns = []
        for j in range(t.shape[1]):
            if self.random:
                with seeded(self.seed, x.device):
                    columns.append(self._call(x, t[:, j]))
            else:
                columns.append(self._call(x, t[:, j]))
        return torch.stack(columns, dim=1).detach()

    def attribute(self, x: torch.Tensor, target: Target = None) -> torch.Tensor:
        """Captum's attributions, (B, T, C, *spatial)."""
        x = self.check_input(x)
        with self.running(x):
            t = self.targets(x, target)
            return torch.cat([self._columns(x[sl], t[sl]) for sl in chunks(x.shape[0], self.images_per_call)])

    def _attribute(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._columns(x, t).sum(dim=2)


def grid_segments(spatial: tuple[int, ...], cell: int, channels: int, device=None) -> torch.Tensor:
    """(1, C, *spatial) integer superpixels: a regular grid of ``cell``-sized blocks, shared by all channels."""
    ids = torch.zeros(spatial, dtype=torch.long, device=device)
    stride = 1
    for axis in reversed(range(len(spatial))):
        coord = torch.arange(spatial[axis], device=device) // cell
        shape = [1] * len(spatial)
        shape[axis] = -1
        ids = ids + coord.view(shape) * stride
        stride *= math.ceil(spatial[axis] / cell)
    return ids.expand(channels, *spatial).unsqueeze(0).contiguous()


@register("saliency")
class Saliency(CaptumExplainer):
    """Simonyan et al. 2014: the absolute gradient of the target score with respect to the input.

    ``batch_size`` (64): images per forward/backward pass (the memory bound).
    """

    captum_class = ca.Saliency

    def captum_kwargs(self, x):
        return {"abs": True}


@register("ig")
class IntegratedGradients(CaptumExplainer):
    """Sundararajan et al. 2017: (x − x') ∫ ∂f/∂x along the straight path from the baseline x' to x.

    ``n_steps`` (50) points of Captum's ``method`` (``"gausslegendre"``, or one
    of Captum's Riemann sums); ``baseline`` 0, ``"min"`` or ``"mean"``;
    ``batch_size`` (64): the most path points per forward/backward pass, the
    memory bound (images are explained ``batch_size`` at a time, and Captum's
    ``internal_batch_size`` groups as many of their steps as fit: with ``b``
    images, ``batch_size // b`` steps of each per pass).
    """

    captum_class = ca.IntegratedGradients

    def __init__(self, model: nn.Module, device=None, n_steps: int = 50, method: str = "gausslegendre",
                 baseline: float | str = 0.0, **kw):
        if method not in IG_METHODS:
            raise ParameterError(f"method must be one of Captum's {list(IG_METHODS)}, got {method!r}")
        super().__init__(model, device, **kw)
        self.n_steps, self.integration, self.baseline = int(n_steps), method, baseline

    def captum_kwargs(self, x):
        base = baseline_image(x, self.baseline)  # "min"/"mean": (b, C, 1, ...), which Captum refuses for b > 1
        if torch.is_tensor(base):
            base = base.expand_as(x).contiguous()
        return {"baselines": base, "n_steps": self.n_steps, "method": self.integration,
                "internal_batch_size": self.batch_size}


@register("gradshap")
class GradientShap(CaptumExplainer):
    """Lundberg & Lee 2017 (expected gradients): mean of ∂f/∂x(x̃)·(x − x') over baselines x' and noisy points x̃.

    Captum's ``GradientShap`` with ``n_samples`` (20) samples per image,
    Gaussian noise of ``stdevs`` (0.1, in input units) and baselines
    ``baselines`` (``"zero"``: one black image; ``"min"``/``"mean"``; or a
    tensor (N, C, *spatial) of reference images). When ``n_samples`` exceeds
    ``batch_size``, the samples are drawn in equal chunks and averaged (the
    same estimator, other random draws than a single call).
    """

    captum_class = ca.GradientShap
    random = True

    def __init__(self, model: nn.Module, device=None, n_samples: int = 20, stdevs: float = 0.1,
                 baselines: str | torch.Tensor = "zero", **kw):
        stdevs = check_range("stdevs", stdevs, 0.0, low_closed=True)
        super().__init__(model, device, **kw)
        self.n_samples, self.stdevs, self.baselines = int(n_samples), stdevs, baselines

    def _baselines(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(self.baselines):
            return self.baselines.to(x.device)
        if self.baselines == "zero":
            return torch.zeros_like(x[:1])
        return baseline_image(x, self.baselines).expand_as(x).contiguous()

    def _call(self, x, target):
        chunks = max(1, math.ceil(self.n_samples / max(self.batch_size, 1)))
        per = math.ceil(self.n_samples / chunks)
        base = self._baselines(x)
        total = 0
        for _ in range(chunks):
            total = total + self.method.attribute(x, baselines=base, n_samples=per, stdevs=self.stdevs, target=target)
        return total / chunks


class _SurrogateExplainer(CaptumExplainer):
    """LIME and KernelSHAP: a linear surrogate fitted on ``n_samples`` random on/off patterns of grid superpixels."""

    random = True
    needs_grad = False

    def __init__(self, model: nn.Module, device=None, n_samples: int = 200, cell: int = 16,
                 baseline: float | str = 0.0, **kw):
        super().__init__(model, device, **kw)
        self.n_samples, self.cell, self.baseline = int(n_samples), int(cell), baseline

    def captum_kwargs(self, x):
        spatial = tuple(x.shape[2:])
        check_cells(self.name, spatial, self.cell, "cell", "superpixel")  # one: KernelSHAP's weights are NaN
        return {"feature_mask": grid_segments(spatial, self.cell, x.shape[1], x.device),
                "baselines": baseline_image(x, self.baseline), "n_samples": self.n_samples,
                "perturbations_per_eval": max(self.batch_size, 1)}


@register("lime")
class Lime(_SurrogateExplainer):
    """Ribeiro et al. 2016, through ``captum.attr.Lime`` (its default Lasso surrogate and exponential kernel).

    Superpixels are grid cells of ``cell`` pixels (2D and 3D alike);
    ``n_samples`` (200) perturbations, ``batch_size`` of them per model call.
    """

    captum_class = ca.Lime


@register("kernelshap")
class KernelShap(_SurrogateExplainer):
    """Lundberg & Lee 2017, through ``captum.attr.KernelShap`` on the same grid superpixels as LIME."""

    captum_class = ca.KernelShap
