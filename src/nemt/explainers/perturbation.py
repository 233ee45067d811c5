"""Perturbation explainers that only run the model forward: occlusion, RISE, RELAX and U-RELAX.

All three score batches of perturbed copies of the input, so they share one
engine (:func:`_score_batches`): perturbed inputs are built chunk by chunk
(``batch_size`` copies per model call, the memory bound), the model runs in
inference mode, and **every target comes from the same passes**: a
multi-label model's T maps cost no more than one map. Masks are drawn from a
``torch.Generator`` seeded by ``seed`` and are the same for every image, so
a result never depends on what else is in the batch.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nemt.explainers.base import Explainer, Target, baseline_image, register, resize_linear
from nemt.explainers.fast import inference_copy
from nemt.explainers.layers import FeatureTap, layer_name, tapped_output
from nemt.ops import ParameterError, checked_outputs, chunks, output_score, task_of

Score = str  # "logit" | "prob" (see :func:`nemt.ops.output_score`)


def _check_score(score: Score) -> Score:
    if score not in ("logit", "prob"):
        raise ParameterError(f"score must be 'logit' or 'prob', got {score!r}")
    return score


def _sums_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype maps are summed in: the input's (a float64 model's), at least float32 (a half model's
    thousands of masked scores are not summed in half precision)."""
    return torch.promote_types(x.dtype, torch.float32)


def _score_batches(model: nn.Module, n_jobs: int, build: Callable[[Sequence[int]], tuple[torch.Tensor, Any]],
                   batch_size: int) -> Iterator[tuple[Sequence[int], torch.Tensor, Any]]:
    """Yield (job indices, model outputs, what ``build`` made besides the inputs) per ``batch_size`` jobs.

    ``build(jobs)`` returns the perturbed inputs and anything the caller needs
    again (RISE's masks), so that nothing is built twice.
    """
    with torch.inference_mode():
        for start in range(0, n_jobs, batch_size):
            jobs = range(start, min(start + batch_size, n_jobs))
            inputs, extra = build(jobs)
            yield jobs, model(inputs), extra


# --------------------------------------------------------------------------- occlusion


def _window_slices(spatial: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> list[tuple[slice, ...]]:
    """Every window position, with Captum's convention: ceil((n - w) / s) + 1 starts per axis, the last clipped."""
    axes = []
    for n, w, s in zip(spatial, window, stride):
        if w > n:
            raise ParameterError(f"occlusion window {tuple(window)} is larger than the input {tuple(spatial)}")
        if s > w and n != w:
            raise ParameterError(f"occlusion stride {tuple(stride)} must not exceed the window {tuple(window)}")
        count = math.ceil((n - w) / s) + 1
        axes.append([slice(i * s, min(i * s + w, n)) for i in range(count)])
    if math.prod(len(a) for a in axes) < 2:  # one window covers everything: every pixel gets the same value
        raise ParameterError(f"occlusion window {tuple(window)} covers the whole input {tuple(spatial)} at one "
                             f"position: the map would be constant; use a smaller window (e.g. "
                             f"window={max(1, min(spatial) // 2)})")
    return list(itertools.product(*axes))


def _per_axis(value: int | Sequence[int], d: int, what: str) -> tuple[int, ...]:
    v = (int(value),) * d if isinstance(value, int) else tuple(int(i) for i in value)
    if len(v) != d:
        raise ParameterError(f"{what} needs {d} values (one per spatial axis), got {v}")
    return v


@register("occlusion")
class Occlusion(Explainer):
    """Zeiler & Fergus occlusion: the drop of the score when a window is replaced by a baseline.

    Each pixel's value is the mean, over the windows covering it, of
    ``score(x) − score(x with the window set to baseline)`` (all channels
    occluded together). This is exactly ``captum.attr.Occlusion`` with
    ``sliding_window_shapes=(C, *window)``, ``strides=(C, *stride)`` and the
    same scalar baseline, but every target is read from the same forward passes
    and windows of several images share a model call.

    Parameters: ``window`` and ``stride`` (int or one per spatial axis;
    default 16 and 8), ``baseline`` (a number, or ``"min"``/``"mean"`` of each
    image; default 0), ``score`` (``"logit"``, default, as Captum, or
    ``"prob"``), ``batch_size`` (occluded copies per model call), ``signed``
    (keep negative values; default False: the map is the positive part,
    min-max normalised), ``fast`` (score with :class:`~nemt.explainers.fast.InferenceCopy`,
    BatchNorm folded and channels-last; default True). :meth:`attribute`
    returns the raw values.
    """

    def __init__(self, model: nn.Module, device=None, window: int | Sequence[int] = 16,
                 stride: int | Sequence[int] = 8, baseline: float | str = 0.0, score: Score = "logit",
                 batch_size: int = 64, signed: bool = False, fast: bool = True, **kw):
        kw.setdefault("postprocess", "signed" if signed else "positive")
        super().__init__(model, device, **kw)
        self.forward_model = inference_copy(self.model, fast)
        self.window, self.stride, self.baseline = window, stride, baseline
        self.score, self.batch_size, self.signed = _check_score(score), int(batch_size), signed

    def _baseline(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, …) fill value per image."""
        b = baseline_image(x, self.baseline)
        if torch.is_tensor(b):
            return b
        return torch.full((x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2), b, device=x.device, dtype=x.dtype)

    def attribute(self, x: torch.Tensor, target: Target = None) -> torch.Tensor:
        """Raw occlusion values, (B, T, *spatial)."""
        return self.raw(x, target)

    def _attribute(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = x.ndim - 2
        slices = _window_slices(x.shape[2:], _per_axis(self.window, d, "window"), _per_axis(self.stride, d, "stride"))
        task = task_of(self.model)
        with torch.inference_mode():  # the clean pass too: at most batch_size images per model call
            out0 = torch.cat([self.forward_model(x[sl]) for sl in chunks(x.shape[0], self.batch_size)])
        s0 = output_score(out0, task, self.score).gather(1, t)  # (B, T)
        fill = self._baseline(x)
        n_win = len(slices)

        def build(jobs):
            xs = x[[j // n_win for j in jobs]].clone()
            for i, j in enumerate(jobs):
                b, w = divmod(j, n_win)
                xs[(i, slice(None)) + slices[w]] = fill[b]
            return xs, None

        total = torch.zeros(x.shape[0], t.shape[1], *x.shape[2:], device=x.device, dtype=_sums_dtype(x))
        for jobs, out, _ in _score_batches(self.forward_model, x.shape[0] * n_win, build, self.batch_size):
            bs = torch.tensor([j // n_win for j in jobs], device=x.device)
            drop = (s0[bs] - output_score(out, task, self.score).gather(1, t[bs])).tolist()
            for i, j in enumerate(jobs):
                b, w = divmod(j, n_win)
                view = total[(b, slice(None)) + slices[w]]
                view += torch.tensor(drop[i], device=x.device, dtype=total.dtype).view(-1, *(1,) * d)
        counts = torch.zeros(x.shape[2:], device=x.device, dtype=total.dtype)
        for sl in slices:
            counts[sl] += 1
        return total / counts


# --------------------------------------------------------------------------- random masks (RISE, RELAX)


class RandomMasks:
    """Petsiuk et al.'s smooth random masks, drawn once from ``seed`` and upsampled on demand.

    ``n`` binary grids of ``grid`` cells per axis (each cell kept with
    probability ``p``) are upsampled (bi/trilinear) to ``(grid + 1) × cell``
    and cropped at a random shift in ``[0, cell)`` per axis, so that the soft
    mask edges fall anywhere. Only the small grids and the shifts are stored:
    4000 masks of a 512² image would take 4 GB; chunks are built when needed.
    """

    def __init__(self, n: int, spatial: Sequence[int], grid: int = 7, p: float = 0.5, seed: int = 0,
                 device=None):
        if not 0 < p <= 1:
            raise ParameterError(f"mask probability p must be in (0, 1], got {p}")
        self.n, self.spatial, self.grid, self.p = int(n), tuple(int(s) for s in spatial), int(grid), float(p)
        g = torch.Generator().manual_seed(int(seed))
        d = len(self.spatial)
        self.cells = [math.ceil(s / self.grid) for s in self.spatial]
        self.grids = (torch.rand(self.n, 1, *(self.grid,) * d, generator=g) < self.p).float().to(device)
        self.shifts = torch.stack([torch.randint(0, c, (self.n,), generator=g) for c in self.cells], dim=1).tolist()

    def chunk(self, index: Sequence[int] | range) -> torch.Tensor:
        """(len(index), 1, *spatial) masks in [0, 1]."""
        up = [(self.grid + 1) * c for c in self.cells]
        big = resize_linear(self.grids[list(index)], up)
        out = torch.empty(len(index), 1, *self.spatial, device=big.device)
        for i, k in enumerate(index):
            sl = tuple(slice(s, s + n) for s, n in zip(self.shifts[k], self.spatial))
            out[i] = big[(i, slice(None)) + sl]
        return out


def _masked_jobs(x: torch.Tensor, masks: RandomMasks, fill: float | torch.Tensor = 0.0):
    """A builder for (image, mask) jobs: job j is image j // n under mask j % n, x·m + fill·(1 − m).

    It returns the masked inputs and the masks.
    """
    n = masks.n

    def build(jobs):
        m = masks.chunk([j % n for j in jobs]).to(x.device)
        xs = x[[j // n for j in jobs]]
        return (xs * m + fill * (1 - m) if not (isinstance(fill, float) and fill == 0.0) else xs * m), m

    return build


@register("rise")
class RISE(Explainer):
    """RISE (Petsiuk et al. 2018): saliency = Σ_i score(x ⊙ M_i) · M_i / (N · p).

    ``n_masks`` (default 4000), ``grid`` (7) and ``p`` (0.5) as in the paper;
    ``score`` ``"prob"`` (default: softmax or sigmoid, as the paper) or
    ``"logit"``; ``batch_size`` masked copies per model call; ``seed`` draws
    the masks; ``fast`` as for :class:`Occlusion`. Every label of a multi-label model is read from the same
    N passes. Maps are min-max normalised to [0, 1]; :meth:`attribute` gives
    the raw sums.
    """

    def __init__(self, model: nn.Module, device=None, n_masks: int = 4000, grid: int = 7, p: float = 0.5,
                 score: Score = "prob", batch_size: int = 64, seed: int = 0, fast: bool = True, **kw):
        super().__init__(model, device, **kw)
        self.forward_model = inference_copy(self.model, fast)
        self.n_masks, self.grid, self.p, self.score = int(n_masks), int(grid), float(p), _check_score(score)
        self.batch_size, self.seed = int(batch_size), int(seed)

    def masks(self, spatial: Sequence[int]) -> RandomMasks:
        return RandomMasks(self.n_masks, spatial, self.grid, self.p, self.seed, self.device)

    def attribute(self, x: torch.Tensor, target: Target = None) -> torch.Tensor:
        """The raw sums, (B, T, *spatial)."""
        return self.raw(x, target)

    def _attribute(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        masks = self.masks(x.shape[2:])
        task, n = task_of(self.model), masks.n
        total = torch.zeros(x.shape[0], t.shape[1], *x.shape[2:], device=x.device, dtype=_sums_dtype(x))
        for jobs, out, m in _score_batches(self.forward_model, x.shape[0] * n, _masked_jobs(x, masks),
                                           self.batch_size):
            bs = torch.tensor([j // n for j in jobs], device=x.device)
            s = output_score(out, task, self.score).gather(1, t[bs])  # (k, T); m: (k, 1, *spatial)
            total.index_add_(0, bs, (s.view(*s.shape, *(1,) * (x.ndim - 2)) * m).to(total.dtype))
        return total / (n * self.p)


@register("relax")
class RELAX(Explainer):
    """RELAX (Wickstrøm et al. 2022): importance of pixels for an encoder's representation.

    With h the representation (the model's output, or the output of module
    ``layer`` of the network, flattened) and N random masks M_i as in RISE,
    s_i = cos(h(x), h(x ⊙ M_i)); per pixel the importance is the mask-weighted
    mean of the s_i, R = Σ s_i M_i / Σ M_i, and the uncertainty their
    mask-weighted variance, U = Σ (s_i − R)² M_i / Σ M_i. ``uncertainty=True``
    gives U-RELAX: R where U is at or below its median (per image), else 0.

    Defaults as the paper: 3000 masks, 7×7 grid, p = 0.5. The map has one
    channel (T = 1; ``target`` is ignored: an encoder has no classes).
    :meth:`importance_and_uncertainty` returns both raw maps.
    """

    def __init__(self, model: nn.Module, device=None, n_masks: int = 3000, grid: int = 7, p: float = 0.5,
                 layer: str | None = None, uncertainty: bool = False, batch_size: int = 64, seed: int = 0,
                 fast: bool = True, **kw):
        super().__init__(model, device, **kw)
        self.n_masks, self.grid, self.p, self.layer = int(n_masks), int(grid), float(p), layer
        self.uncertainty, self.batch_size, self.seed = uncertainty, int(batch_size), int(seed)
        self._encoder = inference_copy(self.model, fast) if layer is None else \
            _LayerOutput(self.model, layer_name(self.model, layer))

    targeted = False

    def targets(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        """One map per image whatever ``target`` says: an encoder's representation has no classes."""
        return torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)

    def importance_and_uncertainty(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw R and U, each (B, 1, *spatial)."""
        x = self.check_input(x)
        with self.running(x):
            return self._importance_and_uncertainty(x)

    def _importance_and_uncertainty(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks = RandomMasks(self.n_masks, x.shape[2:], self.grid, self.p, self.seed, self.device)
        n, d = masks.n, x.ndim - 2
        with torch.inference_mode():  # a half model's representation: compared in float32
            h0 = torch.cat([_representation(self._encoder(x[sl]), x[sl]).float()
                            for sl in chunks(x.shape[0], self.batch_size)])
        scores = torch.empty(x.shape[0], n, device=x.device)
        for jobs, h, _ in _score_batches(self._encoder, x.shape[0] * n, _masked_jobs(x, masks), self.batch_size):
            bs = [j // n for j in jobs]
            scores[bs, [j % n for j in jobs]] = F.cosine_similarity(h.flatten(1).float(), h0[bs], dim=1)
        # weighted mean and variance over masks, accumulated chunk by chunk (two passes over the masks)
        shape = (x.shape[0], 1, *x.shape[2:])
        wsum, ssum = torch.zeros(shape, device=x.device), torch.zeros(shape, device=x.device)
        mask_runs = [range(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        for idx in mask_runs:
            m = masks.chunk(idx).to(x.device)[:, 0]  # (k, *spatial)
            s = scores[:, idx.start:idx.stop]  # (B, k)
            wsum[:, 0] += m.sum(dim=0)
            ssum[:, 0] += torch.tensordot(s, m, dims=1)
        importance = ssum / wsum.clamp_min(1e-12)
        vsum = torch.zeros(shape, device=x.device)
        for idx in mask_runs:
            m = masks.chunk(idx).to(x.device)[:, 0]
            s = scores[:, idx.start:idx.stop].view(x.shape[0], -1, *(1,) * d)  # (B, k, 1…)
            vsum[:, 0] += ((s - importance) ** 2 * m).sum(dim=1)
        return importance, vsum / wsum.clamp_min(1e-12)

    def _attribute(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = x.ndim - 2
        r, u = self._importance_and_uncertainty(x)
        if self.uncertainty:
            med = u.flatten(1).median(dim=1).values.view(-1, 1, *(1,) * d)
            r = torch.where(u <= med, r, torch.zeros_like(r))
        return r


@register("u-relax")
class URELAX(RELAX):
    """U-RELAX: RELAX importance kept only where its uncertainty is at or below the median."""

    def __init__(self, model: nn.Module, device=None, **params):
        params.setdefault("uncertainty", True)  # the rest: RELAX's parameters
        super().__init__(model, device, **params)


def _representation(h, x: torch.Tensor) -> torch.Tensor:
    """An encoder's output for ``x`` as (B, D); a tuple, a dict or a (B,) vector is the clear error every
    method gives for a model's output of another form (:func:`nemt.ops.checked_outputs`)."""
    if not torch.is_tensor(h) or h.ndim < 2 or h.shape[0] != x.shape[0]:
        checked_outputs(h, x.shape[0])  # raises, saying how to wrap the model
    return h.flatten(1)


class _LayerOutput(nn.Module):
    """The output of one named module of a model (a Classifier's network), as the representation."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x):
        with FeatureTap(self.model, [self.layer]) as tap:
            self.model(x)
            return tapped_output(tap, self.layer, self.layer, x, spatial=False)
