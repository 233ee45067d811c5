"""Explanations found by optimising a mask per image: extremal perturbation and counterfactual inpainting.

Both methods optimise one smooth mask for every (sample, target) pair. All
pairs of a batch are optimised together as one batch of B·T masks (in chunks
of ``batch_size``, a memory bound). The loss is a *sum* of per-mask losses and
Adam's update is element-wise, so, since samples do not interact in an
eval-mode network, each mask follows the same path as if its sample were
explained alone (up to the network's float rounding, which differs with the
batch size and which a long optimisation can amplify where the score carries
almost no signal). Masks live on a low-resolution grid (one cell per
``mask_stride`` pixels) and are upsampled (bi/trilinear) to the input size,
so 2D and 3D share the code. Only the mask receives gradients: the model's
parameters are frozen for the duration of ``explain`` and restored after.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nemt.explainers.base import Explainer, check_range, register, resize_linear
from nemt.explainers.fast import inference_copy
from nemt.ops import (ParameterError, check_cells, diffusion_fill, fill_values, frozen_parameters, gaussian_blur,
                      output_score, task_of)


def _total_variation(m: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of (N, 1, *spatial) masks: Σ over axes of Σ |finite difference| / n_pixels, shape (N,).

    The mask is zero-padded, so a region pays for its whole boundary and is
    not drawn to the image border (where a replicate-padded TV is free).
    """
    m = F.pad(m, [1, 1] * (m.ndim - 2))
    n = math.prod(s - 2 for s in m.shape[2:])
    return sum(m.diff(dim=axis).abs().flatten(1).sum(dim=1) for axis in range(2, m.ndim)) / n


def _biharmonic(x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Biharmonic inpainting (scikit-image, any spatial_dims) of (N, C, *spatial) inside ``hole`` (N, 1, *spatial)."""
    from skimage.restoration import inpaint_biharmonic  # imported here: scikit-image is slow to import

    xs = x.detach().cpu().double().numpy()
    holes = hole[:, 0].cpu().numpy()
    out = xs.copy()
    for i, h in enumerate(holes):
        if h.all():  # nothing known to inpaint from: the data set's mean, 0 in the normalised space
            out[i] = 0.0
        elif h.any():
            out[i] = inpaint_biharmonic(xs[i], h, channel_axis=0)
    return torch.from_numpy(out).to(x)


class _MaskOptimisation(Explainer):
    """What both methods share: pairing samples with targets, chunking, the score, the mask grid, the seed."""

    scores = ("logit", "prob")
    default_postprocess = "mask"  # masks in [0, 1] as they are (a constant one becomes 0)
    needs_grad = True

    def __init__(self, model: nn.Module, device: str | torch.device | None = None, *, steps: int, lr: float,
                 mask_stride: int, score: str, direction: int, batch_size: int, seed: int, fast: bool = True,
                 **kw):
        super().__init__(model, device, **kw)
        # forward and backward through the BatchNorm-folded, channels-last copy (about 1.4x faster on a CPU)
        self.forward_model = inference_copy(self.model, fast)
        if score not in self.scores:
            raise ParameterError(f"score must be one of {self.scores}, got {score!r}")
        if direction not in (1, -1):
            raise ParameterError(f"direction must be 1 or -1, got {direction!r}")
        self.steps, self.lr, self.mask_stride = int(steps), check_range("lr", lr, 0.0), int(mask_stride)
        self.score, self.direction = score, int(direction)
        self.batch_size, self.seed = int(batch_size), int(seed)

    def _attribute(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Masks (B, T, *spatial) in [0, 1]: all (sample, target) pairs optimised in chunks of ``batch_size``."""
        b, n_t = t.shape
        sample = torch.arange(b, device=x.device).repeat_interleave(n_t)  # pair k = (sample k // T, target k % T)
        pair_target = t.reshape(-1)
        chunks = []
        with frozen_parameters(self.model), torch.enable_grad():
            for start in range(0, b * n_t, self.batch_size):
                k = slice(start, start + self.batch_size)
                chunks.append(self._optimise(x[sample[k]].detach(), pair_target[k]).detach())
        return torch.cat(chunks).view(b, n_t, *x.shape[2:])

    def _optimise(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """One mask (N, *spatial) in [0, 1] per input of ``x`` (N, C, *spatial) and its ``target`` (N,)."""
        raise NotImplementedError

    def _target_score(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The signed score of each input's own target, (N,): logit or probability, or the regression value."""
        q = output_score(self.forward_model(x), task_of(self.model), self.score)
        return self.direction * q.gather(1, target[:, None]).squeeze(1)

    def _grid(self, x: torch.Tensor, value: float, jitter: float = 0.0) -> torch.Tensor:
        """Mask parameters (N, 1, *grid), one cell per ``mask_stride`` pixels, set to ``value`` − jitter·U(0, 1).

        The jitter, which breaks the ties of a constant start, is one seeded draw
        shared by every mask, so a mask's start does not depend on its batch.
        """
        check_cells(self.name, x.shape[2:], self.mask_stride, "mask_stride", "mask cell")  # else a constant mask
        grid = [math.ceil(s / self.mask_stride) for s in x.shape[2:]]
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(1, 1, *grid, generator=g).to(device=x.device, dtype=x.dtype)
        return (value - jitter * noise).expand(x.shape[0], 1, *grid).clone()


@register("extremal")
class ExtremalPerturbation(_MaskOptimisation):
    r"""Extremal perturbation, preservation game (Fong, Patrick & Vedaldi, ICCV 2019).

    For each sample and target, find a smooth mask :math:`m` of area ``area``
    that best *preserves* the target score when only the masked region is
    kept and the rest is perturbed:

    .. math::
        m^* = \arg\max_m \; \Phi(m) - \lambda \,\lVert \operatorname{sort}(m) - r_a \rVert^2 / n,
        \qquad \Phi(m) = \frac{s_c(m \odot x + (1 - m) \odot \tilde x) - s_c(\tilde x)}
                              {\lvert s_c(x) - s_c(\tilde x) \rvert}

    where :math:`\tilde x` is the image blurred with a Gaussian of
    ``blur_sigma`` pixels (``perturbation="blur"``) or 0, the data set's mean
    in the normalised space (``"fade"``), :math:`n` the number of pixels and
    :math:`r_a` the sorted reference vector of :math:`(1-a)n` zeros followed by
    :math:`an` ones, the paper's area constraint.

    The score is measured from the fully perturbed image and divided by its
    clean-to-perturbed gap, so that :math:`\Phi` runs from 0 (all perturbed) to
    about 1 (all kept) whatever the model's scale; dividing by a per-sample
    constant only rescales :math:`\lambda`. A gap below 1e-3 (score units)
    counts as 1e-3: a score the perturbation barely moves carries no signal,
    and dividing by its gap would only amplify float noise. :math:`\lambda` grows
    geometrically from ``area_weight_start`` at the first step to
    ``area_weight`` (the paper's 300) at the last, as the authors' code lets it
    grow: early on the score decides which region survives, at the end the
    area constraint is nearly hard. (With Adam, whose steps ignore gradient
    magnitudes, a constraint that dominates from the start freezes whichever
    region it first keeps.)

    The mask is parametrised by values in [0, 1] on a grid of one cell per
    ``mask_stride`` pixels, initialised to 1 (everything kept; minus a seeded
    0.01·U(0, 1) that breaks the ties of the sort), clamped to [0, 1] after
    each Adam step and upsampled bi/trilinearly to the input size, which makes
    it smooth at the scale of ``mask_stride`` and keeps it in [0, 1]. Other
    differences from the authors' code: this upsampling instead of their 2D
    smooth-max generator, Adam instead of SGD with momentum, a blend with one
    blurred image instead of a blur pyramid, no horizontal-flip jitter
    (laterality matters in medical images).

    Parameters
    ----------
    area : float
        Fraction of the input the mask keeps (default 0.05).
    perturbation : {"blur", "fade"}
        What replaces the discarded region (default ``"blur"``).
    blur_sigma : float
        Standard deviation of the blur, in pixels (default 20, the authors'
        largest blur at 224 px).
    steps, lr : int, float
        Adam iterations and learning rate (defaults 300 and 0.05; the paper
        runs 800 iterations).
    area_weight, area_weight_start : float
        :math:`\lambda` at the last and at the first step (defaults 300 and 1).
    mask_stride : int
        Pixels per mask-grid cell (default 8).
    score : {"logit", "prob"}
        Target score of a classifier (default ``"logit"``, as in the paper):
        the logit, or the softmax (multi-class) or sigmoid (multi-label)
        probability; for regression always the predicted value.
    direction : {1, -1}
        Sign of the score to preserve: -1 keeps a *low* regression value.
    batch_size : int
        Masks optimised at once (memory bound; results do not depend on it beyond the float
        rounding of the network's kernels, see the module docstring).
    seed : int
        Seed of the tie-breaking jitter of the initial mask.
    postprocess : str or callable
        The last step on the masks (default ``"mask"``: as they are, a constant one 0; see
        :func:`nemt.ops.postprocess`).

    Returns maps (B, T, *spatial): the final masks, in [0, 1].

    >>> ex = ExtremalPerturbation(clf, area=0.05, steps=300)      # doctest: +SKIP
    >>> ex.explain(x, target="predicted").shape                   # doctest: +SKIP
    torch.Size([B, 1, 224, 224])
    """

    perturbations = ("blur", "fade")

    def __init__(self, model: nn.Module, device: str | torch.device | None = None, *, area: float = 0.05,
                 perturbation: str = "blur", blur_sigma: float = 20.0, steps: int = 300, lr: float = 0.05,
                 area_weight: float = 300.0, area_weight_start: float = 1.0, mask_stride: int = 8,
                 score: str = "logit", direction: int = 1, batch_size: int = 16, seed: int = 0, fast: bool = True,
                 **kw):
        super().__init__(model, device, steps=steps, lr=lr, mask_stride=mask_stride, score=score,
                         direction=direction, batch_size=batch_size, seed=seed, fast=fast, **kw)
        area, blur_sigma = check_range("area", area, 0.0, 1.0), check_range("blur_sigma", blur_sigma, 0.0)
        if perturbation not in self.perturbations:
            raise ParameterError(f"perturbation must be one of {self.perturbations}, got {perturbation!r}")
        if not 0 < area_weight_start <= area_weight:
            raise ParameterError(f"need 0 < area_weight_start <= area_weight, got {area_weight_start!r} "
                            f"and {area_weight!r}")
        self.area, self.perturbation, self.blur_sigma = float(area), perturbation, float(blur_sigma)
        self.area_weight, self.area_weight_start = float(area_weight), float(area_weight_start)

    def _perturb(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        fill = fill_values(x, "blur" if self.perturbation == "blur" else "zero", sigma=self.blur_sigma)
        return x * m + fill * (1 - m)

    def _optimise(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        n = math.prod(size)
        reference = torch.ones(n, device=x.device, dtype=x.dtype)
        reference[:int(n * (1 - self.area))] = 0
        with torch.no_grad():
            s_perturbed = self._target_score(self._perturb(x, torch.zeros_like(x[:, :1])), target)
            gap = (self._target_score(x, target) - s_perturbed).abs().clamp_min(1e-3)
        growth = (self.area_weight / self.area_weight_start) ** (1 / max(self.steps - 1, 1))
        param = self._grid(x, 1.0, jitter=0.01).requires_grad_(True)
        opt = torch.optim.Adam([param], lr=self.lr)
        for step in range(self.steps):
            m = resize_linear(param, size)
            preserved = (self._target_score(self._perturb(x, m), target) - s_perturbed) / gap
            area = ((m.flatten(1).sort(dim=1).values - reference) ** 2).mean(dim=1)
            loss = (self.area_weight_start * growth ** step * area - preserved).sum()  # a sum: each mask its own
            param.grad, = torch.autograd.grad(loss, [param])
            opt.step()
            with torch.no_grad():
                param.clamp_(0, 1)
        with torch.no_grad():
            return resize_linear(param, size)[:, 0]


@register("inpainting")
class CounterfactualInpainting(_MaskOptimisation):
    r"""Counterfactual impact by inpainting, deletion game (Major et al., ISBI 2020).

    For each sample and target, find the mask :math:`M` whose deletion, the
    masked pixels replaced by an inpainting from their surroundings, most
    lowers the target score, for a small and compact mask:

    .. math::
        M^* = \arg\min_M \; s_c\big((1 - M) \odot x + M \odot \hat x\big)
              + \lambda_{area}\,\overline{M} + \lambda_{tv}\,\mathrm{TV}(M)

    :math:`M = \mathrm{up}(\sigma(\theta))`: logits :math:`\theta` on a grid of
    one cell per ``mask_stride`` pixels, initialised to 0 (:math:`M = 0.5`),
    sigmoid, upsampled bi/trilinearly. TV is the anisotropic total variation
    of the zero-padded mask (Σ over axes of Σ |difference of neighbours|, over
    the number of pixels): a region of area A pays λ_area·A + λ_tv·(its
    perimeter), both in pixels over the image's pixel count, wherever it lies.

    The counterfactual :math:`\hat x` is a classical inpainting of the image
    inside the hole :math:`H = \{M > 0.5\}`, recomputed every ``refresh``
    steps and held constant (no gradient) in between. Outside :math:`H` it is
    the image blurred with a Gaussian of ``sigma`` pixels, so that a pixel not
    yet in the hole still has a counterfactual and the mask can grow there. At
    the start (:math:`M = 0.5` everywhere) the hole is empty and :math:`\hat x`
    is the blurred image. Inpainters:

    - ``"biharmonic"``: :func:`skimage.restoration.inpaint_biharmonic`, any
      dimension, on the CPU; 20-50 ms for a 224 px image with 10 % masked
      (once per ``refresh`` steps), but 1.5 s for a 64³ volume with 3 %;
    - ``"diffusion"``: normalised convolution, blur(x·(1-H)) / blur(1-H) with
      the Gaussian of ``sigma`` (0, the mean, deep inside holes far wider than
      ``sigma``), torch-only and fast on big volumes;
    - ``"auto"`` (default): biharmonic in 2D, diffusion in 3D.

    Parameters
    ----------
    steps, lr : int, float
        Adam iterations and learning rate on the logits (defaults 200 and 0.1).
    area_weight, tv_weight : float
        :math:`\lambda_{area}` and :math:`\lambda_{tv}` (defaults 1 and 1).
    refresh : int
        Steps between two inpaintings (default 10).
    inpainter : {"auto", "biharmonic", "diffusion"}
    sigma : float
        Gaussian of the blur outside the hole and of the diffusion fill, in
        pixels (default 8).
    mask_stride : int
        Pixels per mask-grid cell (default 8).
    score : {"prob", "logit"}
        Target score of a classifier (default ``"prob"``: softmax or sigmoid,
        bounded, so that deleting more cannot lower it without limit; a logit
        can, and the mask then spreads); for regression always the value.
    direction : {1, -1}
        Sign of the score to lower: -1 finds what keeps a regression value low.
    batch_size : int
        Masks optimised at once (memory bound; results do not depend on it beyond the float
        rounding of the network's kernels, see the module docstring).
    seed : int
        Unused (the method has no randomness); kept for a uniform signature.
    postprocess : str or callable
        The last step on the masks (default ``"mask"``: as they are, a constant one 0; see
        :func:`nemt.ops.postprocess`).

    Returns maps (B, T, *spatial): the final masks :math:`M`, in [0, 1].
    """

    inpainters = ("auto", "biharmonic", "diffusion")

    def __init__(self, model: nn.Module, device: str | torch.device | None = None, *, steps: int = 200,
                 lr: float = 0.1, area_weight: float = 1.0, tv_weight: float = 1.0, refresh: int = 10,
                 inpainter: str = "auto", sigma: float = 8.0, mask_stride: int = 8, score: str = "prob",
                 direction: int = 1, batch_size: int = 16, seed: int = 0, fast: bool = True, **kw):
        super().__init__(model, device, steps=steps, lr=lr, mask_stride=mask_stride, score=score,
                         direction=direction, batch_size=batch_size, seed=seed, fast=fast, **kw)
        sigma = check_range("sigma", sigma, 0.0)
        area_weight = check_range("area_weight", area_weight, 0.0, low_closed=True)
        if inpainter not in self.inpainters:
            raise ParameterError(f"inpainter must be one of {self.inpainters}, got {inpainter!r}")
        self.area_weight, self.tv_weight = float(area_weight), float(tv_weight)
        self.refresh, self.inpainter, self.sigma = int(refresh), inpainter, float(sigma)

    def _counterfactual(self, x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        """x̂: the inpainting of ``x`` (N, C, *spatial) inside ``hole`` (N, 1, *spatial), the blurred x outside."""
        blurred = gaussian_blur(x, self.sigma)
        if not hole.any():
            return blurred
        inpainter = self.inpainter if self.inpainter != "auto" else ("biharmonic" if x.ndim == 4 else "diffusion")
        if inpainter == "biharmonic":
            filled = _biharmonic(x, hole)
        else:
            filled = diffusion_fill(x, (~hole).to(x.dtype), self.sigma)
        return torch.where(hole, filled, blurred)

    def _optimise(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        logits = self._grid(x, 0.0).requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=self.lr)
        fill = self._counterfactual(x, torch.zeros_like(x[:, :1], dtype=torch.bool))
        for step in range(self.steps):
            m = resize_linear(logits.sigmoid(), size)
            if step and step % self.refresh == 0:
                fill = self._counterfactual(x, m.detach() > 0.5)
            score = self._target_score((1 - m) * x + m * fill, target)
            area = m.flatten(1).mean(dim=1)
            loss = (score + self.area_weight * area + self.tv_weight * _total_variation(m)).sum()
            logits.grad, = torch.autograd.grad(loss, [logits])
            opt.step()
        with torch.no_grad():
            return resize_linear(logits.sigmoid(), size)[:, 0]
