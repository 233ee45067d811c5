"""Losses of NEMt (targeted, deletion form) and NEM (unsupervised), and the occlusion values.

Shapes: inputs x (B, C, *spatial) in the model's normalised space; keep-masks
k (B, T, *spatial) in [0, 1]; model outputs (B, n_outputs).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from nemt.errors import NemtError
from nemt.ops import SCORES, diffusion_fill, fill_values, output_score

OCCLUSION_FILLS = ("mean", "zero", "blur", "inpaint")
#: a preservation background that is no fill of the image itself: the mean of the training images, pixel by pixel
MEAN_IMAGE = "mean-image"
#: a preservation input: the mask kept, the rest filled from it near it and the training mean image far from it
OUTPAINT = "outpaint"
# NEMt's games only: (deletion fill, preservation background) pairs, each pair one game of each kind, equally weighted
GAME_FILLS = {"inpaint+blur": (("inpaint", "inpaint"), ("blur", "blur")),  # both games with each fill
              "inpaint+blur-background": (("inpaint", "blur"),),  # deletion by inpainting, preservation on the blur
              "inpaint+mean-image": (("inpaint", MEAN_IMAGE),),  # deletion by inpainting, preservation on it
              "inpaint+outpaint": (("inpaint", OUTPAINT),),  # deletion by inpainting, preservation outpainted
              MEAN_IMAGE: ((MEAN_IMAGE, MEAN_IMAGE),),  # the mask replaced by the mean image; kept on it
              "inpaint-and-mean-image": (("inpaint", "inpaint"), (MEAN_IMAGE, MEAN_IMAGE)),  # both, each game twice
              # one deletion game scored by the fill that removes more of the evidence; preservation on the mean image
              "inpaint-or-mean-image": ((("inpaint", MEAN_IMAGE), MEAN_IMAGE),)}
OCCLUSIONS = (*OCCLUSION_FILLS, *GAME_FILLS)
QUANTITIES = SCORES


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
        fill = fill_values(x, "zero")  # 0 in the normalised space: the data set's mean
    elif kind == "zero":
        if zero_value is None:
            raise NemtError("occlusion 'zero' needs the normalised value of black")
        fill = zero_value.to(x).view(1, -1, *([1] * (x.ndim - 2))).expand_as(x)
    elif kind == "blur":
        fill = fill_values(x, "blur", sigma=sigma)
    elif kind == "inpaint":
        return diffusion_fill(x, keep, sigma)
    else:
        raise NemtError(f"unknown occlusion {kind!r}; choose one of {OCCLUSION_FILLS}")
    return x * keep + fill * (1 - keep)


def game_fills(occlusion: str) -> tuple[tuple[str | tuple[str, ...], str], ...]:
    """The (deletion fill, preservation background) pairs an ``occlusion`` plays NEMt's games with.

    A deletion fill given as a tuple of fills is one game that each of them plays, scored by the one that
    removes more of the target's evidence (a region matters if some fill of it removes the evidence). The
    first pair's (first) deletion fill is the fill wherever one image is occluded once (collapse guard,
    paper objective): see :func:`first_fill`."""
    return GAME_FILLS.get(occlusion, ((occlusion, occlusion),))


def deletion_kinds(kind: str | tuple[str, ...]) -> tuple[str, ...]:
    """The fills of one deletion game (see :func:`game_fills`)."""
    return kind if isinstance(kind, tuple) else (kind,)


def first_fill(occlusion: str) -> str:
    """The fill an ``occlusion`` deletes with where one image is occluded once."""
    return deletion_kinds(game_fills(occlusion)[0][0])[0]


def uses_mean_image(occlusion: str) -> bool:
    """Whether any game of ``occlusion`` reads the training images' mean image."""
    return any(f in (MEAN_IMAGE, OUTPAINT) for kind, bg in game_fills(occlusion) for f in (*deletion_kinds(kind), bg))


def target_quantity(out: torch.Tensor, task: str, quantity: str, scale: float = 1.0) -> torch.Tensor:
    """The per-output quantity whose change is rewarded: :func:`nemt.ops.output_score` (``quantity`` one of
    :data:`QUANTITIES`; a regression value divided by ``scale``, the training targets' spread)."""
    return output_score(out, task, quantity, scale)


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


# -- the robust objective: nested fixed-area masks and normalised games ------------------------------------

def log_odds(out: torch.Tensor, task: str, scale: float = 1.0) -> torch.Tensor:
    """Every output's evidence on an unbounded scale, (…, n_outputs) -> (…, n_outputs).

    Multi-class: the smooth margin ``z_t - logsumexp_{j != t} z_j``, which is
    exactly ``log(p_t / (1 - p_t))`` for the softmax p, computed from the
    logits so that it never saturates (the probability's gradient ``p(1-p)``
    vanishes on a confident model; this one does not). Multi-label: the
    logit, the same log-odds for a sigmoid. Regression: the value divided by
    the training targets' spread.
    """
    if task == "regression":
        return out / scale
    if task != "multiclass":
        return out
    n = out.shape[-1]
    if n == 1:
        return out
    eye = torch.eye(n, dtype=torch.bool, device=out.device)
    others = out.unsqueeze(-2).expand(*out.shape[:-1], n, n).masked_fill(eye, float("-inf"))
    return out - torch.logsumexp(others, dim=-1)


def area_thresholds(logits: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
    """Per map, the logit value above which a fraction ``area`` of its pixels lies.

    ``logits`` (N, P) flattened maps; ``areas`` (N, A) or (A,) fractions in
    (0, 1). Returns (N, A): the midpoint between the k-th and (k+1)-th
    largest logit, k = round(area · P) (at least 1, at most P - 1), so that
    ``logits > threshold`` keeps exactly k pixels when there are no ties.
    """
    n, p = logits.shape
    a = areas.to(logits).expand(n, -1) if areas.ndim == 1 else areas.to(logits)
    k = (a * p).round().long().clamp(1, p - 1)
    # only the largest k + 1 values are needed: a partial sort (TopK), far cheaper than a full sort for small areas
    top = torch.topk(logits, int(k.max()) + 1, dim=1, sorted=True).values
    return 0.5 * (torch.gather(top, 1, k - 1) + torch.gather(top, 1, k))


def nested_masks(logits: torch.Tensor, areas: torch.Tensor, temperature: float = 1.0,
                 hard: bool = True) -> torch.Tensor:
    """Masks of fixed area from one logit map: the top ``area`` of its pixels.

    ``logits`` (N, *spatial), ``areas`` (N,) -> masks (N, *spatial) in [0, 1].
    The area is a constraint, not a penalty: each mask selects exactly its
    share of pixels, so it can be neither empty nor full whatever the reward
    does. With ``hard`` the forward value is the binary top-k mask and the
    gradient is that of ``sigmoid((l - threshold) / (temperature · std(l)))``
    (straight-through); masks of several areas from the same logits are
    nested, so the logits rank every pixel.
    """
    flat = logits.flatten(1)
    thr = area_thresholds(flat.detach(), areas.view(-1, 1)).detach()  # (N, 1)
    spread = flat.detach().std(dim=1, keepdim=True).clamp_min(1e-6)
    soft = torch.sigmoid((flat - thr) / (temperature * spread))
    if not hard:
        return soft.view_as(logits)
    binary = (flat > thr).to(flat.dtype)
    return (binary + soft - soft.detach()).view_as(logits)


def staircase(logits: torch.Tensor, areas: Sequence[float], temperature: float = 0.02,
              tie_break: float = 1e-3, max_samples: int = 16384, order: str = "sigmoid") -> torch.Tensor:
    """The explanation map from mask logits: the mean of the nested masks of ``areas``.

    ``logits`` (B, T, *spatial) -> (B, T, *spatial) in [0, 1]. A pixel in
    the smallest mask scores about 1, one outside the largest about 0; the
    soft edges (``temperature`` times the map's logit spread) and a
    ``tie_break`` share of ``sigmoid((l - mean) / spread)`` keep the
    logits' order inside and between the steps, so the map ranks every pixel.
    ``order`` is the tie-break's transform of the logits: ``"sigmoid"``,
    ``sigmoid((l - mean) / std)``, or ``"linear"``, ``(l - min) / (max - min)``.
    Both are monotone, so the ranking is the same; they differ in float32
    resolution at the top. Inside the smallest step the map is ``1 - tie_break``
    plus the tie-break, i.e. within a few float32 ulps of 1, where a sigmoid
    of logits 6-11 standard deviations above their mean (BUSI) is 1 to within
    an ulp: half the unsmoothed maps there had up to 30 tied maxima. The
    linear order keeps the top pixels apart by their logit gap over the
    range; a smoothed map has its top resolved by the box instead.
    The thresholds come from every s-th pixel, s = ceil(P / ``max_samples``)
    (a 224 px map sorts 16,725 values instead of 50,176): the steps' areas
    are then exact to the sampling error of a regular subsample, about
    sqrt(area / samples), i.e. below 0.2 % of the image at 224 px.
    """
    b, t = logits.shape[:2]
    flat = logits.reshape(b * t, -1)
    step = -(-int(flat.shape[1]) // max_samples)  # a Python int: the map size is fixed (and constant in ONNX)
    a = torch.tensor(list(areas), dtype=flat.dtype, device=flat.device)
    sample = flat[:, ::step] if step > 1 else flat
    thr = area_thresholds(sample, a)  # (N, A): one partial sort (ONNX TopK)
    std, mean = torch.std_mean(flat, dim=1, keepdim=True)
    scale = 1.0 / (temperature * std.clamp_min(1e-6))
    out = torch.zeros_like(flat)
    for i in range(len(areas)):  # one area at a time: (N, P) memory instead of (N, A, P)
        out += torch.sigmoid((flat - thr[:, i:i + 1]) * scale)
    if order == "linear":
        lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
        rank = (flat - lo) / (hi - lo).clamp_min(1e-12)
    elif order == "sigmoid":
        rank = torch.sigmoid((flat - mean) * (scale * temperature))  # monotone in the logit: keeps their order
    else:
        raise NemtError(f"order must be 'sigmoid' or 'linear', got {order!r}")
    return ((1 - tie_break) * out / len(areas) + tie_break * rank).view_as(logits)


def game_loss(m_del: torch.Tensor, m_pres: torch.Tensor, clean: torch.Tensor, *, min_scale: float = 1.0,
              games: str = "both", preservation_bound: float | None = None,
              preservation_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Deletion and preservation games on the target's evidence, normalised by the clean evidence's size.

    All arguments (N,): the target's log-odds (see :func:`log_odds`) with the
    mask deleted (``m_del``), with only the mask kept on the fully filled
    image (``m_pres``), and on the clean image (``clean``, c). With
    S = max(|c|, ``min_scale``), the scores ``s = (m - c) / S`` measure the
    change in units of the clean evidence; the loss is
    ``relu(1 + s_del) + relu(-s_pres)``: deleting the mask should remove one
    S of evidence (a confident positive c falls to the decision boundary),
    keeping only the mask should keep all of it; a game already won pushes
    no further. The reference is the clean image, not the filled one: a
    fill can itself look like a class (on BUSI the mean image is "benign"
    with log-odds 9, more than the benign images' 3), and a gap to it would
    point the games at evidence against the target.

    ``preservation_bound`` B: the preservation term becomes ``clamp(-s_pres, 0, B)``, so a preservation game
    lost by more than B (with B = 1: the kept mask alone leaves the target less likely than not) gives no
    gradient. Keeping a small mask on the filled image is far from the data the model knows, and there its
    log-odds can reward a fixed place (the demo's opacity maps on the body's upper edge) over the finding.

    ``preservation_weight`` w scales the preservation term: ``relu(1 + s_del) + w * pres``.
    """
    scale = clean.detach().abs().clamp_min(min_scale)
    s_del = (m_del - clean.detach()) / scale
    s_pres = (m_pres - clean.detach()) / scale
    parts = []
    if games in ("both", "deletion"):
        parts.append(F.relu(1 + s_del))
    if games in ("both", "preservation"):
        pres = F.relu(-s_pres) if preservation_bound is None else (-s_pres).clamp(0, preservation_bound)
        parts.append(preservation_weight * pres)
    if not parts:
        raise NemtError(f"games must be both, deletion or preservation, got {games!r}")
    loss = torch.stack(parts).sum(0).mean()
    return loss, {"s_del": s_del.detach().mean().item(), "s_pres": s_pres.detach().mean().item()}
