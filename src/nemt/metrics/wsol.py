"""Weakly supervised object localisation: MaxBoxAccV2 (Choe et al., CVPR 2020, "Evaluating weakly supervised
object localization methods right"; the authors' ``wsolevaluation`` code, ``BoxEvaluator`` with
``box_v2_metric=True``).

For a data set of maps and ground-truth masks:

1. each map is min-max normalised to [0, 1] (a constant map becomes 0 everywhere, as their
   ``normalize_scoremap``);
2. for every threshold tau of a grid (``thresholds`` values 0, 1/n, ..., (n-1)/n), the pixels with
   value > tau are split into connected components (scipy.ndimage.label, full connectivity: 8 in 2D,
   26 in 3D, as OpenCV's contour tracing), each component gives its bounding box, and the map's IoU at
   tau is the best IoU of those boxes with the ground-truth box (``multi_contour=True``, the V2 box
   mining), or the IoU of the largest component's box alone (``multi_contour=False``, the original
   MaxBoxAcc mining; largest by pixel count);
3. for each IoU threshold delta in ``iou_thresholds`` (0.3, 0.5, 0.7): BoxAcc(tau, delta) = the fraction of
   maps whose IoU at tau is >= delta, and MaxBoxAcc(delta) = max over tau;
4. MaxBoxAccV2 = the mean of MaxBoxAcc(delta) over delta.

The maximum over tau is taken over the whole data set, not per image, so the metric is *dataset-level*: it
is registered with a statistic per map (:func:`box_iou_curves`, the IoU at every tau) and a reduction of
the pooled statistics (:func:`max_box_acc_reduce`). The benchmark runner keeps every map's statistic and
reduces them once over the data set; :func:`max_box_acc_v2` does the same over the maps it is given. Its
per-map value is the map's share of the result: the mean over delta of "hit at the data set's best tau
for delta", so the mean over maps with ground truth equals MaxBoxAccV2 exactly.

Choices where the paper and code leave room (documented differences from ``wsolevaluation``):

- The ground-truth box is the bounding box of the whole mask (one box per map; a data set with boxes gives
  masks that are boxes, :meth:`nemt.data.preprocess.Preprocessing.box_mask`). Maps whose mask is empty get
  NaN and take no part (the official test sets have a box in every image).
- Boxes are exact: a component covering columns x0..x1 gives the box x0..x1 inclusive. The official code
  takes OpenCV's exclusive end ``x + w`` as an inclusive coordinate, so its boxes are one pixel too wide and
  tall (except at the image border).
- Thresholds apply to the float map (value > tau), not to the 8-bit copy the official code thresholds at
  ``int(tau * 255)``; the default grid has 100 values (step 0.01) where the official default has 1000
  (step 0.001) on 256 grey levels.
- No foreground above tau gives IoU 0 (the official code scores a 1-pixel box at the origin).
- Components, not contours: the official V2 mining also boxes the inner contours of holes, which can only
  add boxes inside a component's box.
- ``multi_contour=False`` (the original MaxBoxAcc) keeps the largest component by pixel count; the official
  code keeps the contour of largest ``cv2.contourArea``, the area its outline encloses (holes included, a
  one-pixel-wide component's area 0), which can pick another component.

Maps are checked as every metric's (:func:`~nemt.metrics._common.check_maps`): 1 to 3 spatial axes (1D
intervals, 2D boxes, 3D cuboids), no NaN/inf; square (B, H, W) maps warn that they are read as (B, T, L).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from nemt.errors import NemtError
from nemt.metrics._common import check_maps, expand_masks, float_maps, metric
from nemt.metrics._common import normalise as _normalise

#: the IoU thresholds of MaxBoxAccV2 (Choe et al. 2020)
IOU_THRESHOLDS = (0.3, 0.5, 0.7)
#: thresholds on the normalised map: 0, 1/n, ..., (n - 1)/n
DEFAULT_THRESHOLDS = 100


def threshold_grid(thresholds: int = DEFAULT_THRESHOLDS) -> np.ndarray:
    """The thresholds tau: ``thresholds`` values 0, 1/n, ..., (n-1)/n (the official ``np.arange(0, 1, 1/n)``)."""
    n = int(thresholds)
    if n < 1:
        raise NemtError(f"thresholds must be a positive number of grid values, got {thresholds}")
    return np.arange(n, dtype=np.float64) / n


def _box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive bounding box (lo, hi) per axis of the True pixels of ``mask``; None when it has none."""
    pts = np.argwhere(mask)
    if pts.size == 0:
        return None
    return pts.min(0), pts.max(0)


def _ious(lo: np.ndarray, hi: np.ndarray, gt_lo: np.ndarray, gt_hi: np.ndarray) -> np.ndarray:
    """IoU of boxes (n, d) lo/hi inclusive with one box (d,), counted in pixels; (n,)."""
    inter = np.clip(np.minimum(hi, gt_hi) - np.maximum(lo, gt_lo) + 1, 0, None).prod(1)
    area = (hi - lo + 1).prod(1)
    gt_area = (gt_hi - gt_lo + 1).prod()
    return inter / (area + gt_area - inter)


def _component_boxes(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive boxes (n, d) lo/hi of the labelled components (labels > 0) of ``lab``, vectorised (a noisy map
    has thousands of components at a low threshold)."""
    flat = lab.ravel()
    nz = np.flatnonzero(flat)
    order = np.argsort(flat[nz], kind="stable")
    labels = flat[nz][order]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    coords = np.unravel_index(nz[order], lab.shape)
    lo = np.stack([np.minimum.reduceat(c, starts) for c in coords], 1)
    hi = np.stack([np.maximum.reduceat(c, starts) for c in coords], 1)
    return lo, hi


def _iou_curve(a: np.ndarray, gt_box: tuple[np.ndarray, np.ndarray], taus: np.ndarray,
               multi_contour: bool) -> np.ndarray:
    """IoU with ``gt_box`` of the box(es) of ``a > tau`` for every tau; (len(taus),)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(a.ndim, a.ndim)
    values = np.unique(a)
    # a > tau depends only on how many distinct values lie above tau: maps with few values (superpixelified,
    # binary) reuse one labelling for many thresholds
    above = np.searchsorted(values, taus, side="right")
    out = np.zeros(len(taus), dtype=np.float64)
    cache: dict[int, float] = {}
    for j, k in enumerate(above):
        k = int(k)
        if k not in cache:
            if k >= len(values):
                cache[k] = 0.0
            else:
                lab, n = ndimage.label(a >= values[k], structure=structure)
                if n == 0:
                    cache[k] = 0.0
                else:
                    if not multi_contour:
                        sizes = np.bincount(lab.ravel())[1:]
                        lab = np.where(lab == int(np.argmax(sizes)) + 1, 1, 0)
                    lo, hi = _component_boxes(lab)
                    cache[k] = float(_ious(lo, hi, *gt_box).max())
        out[j] = cache[k]
    return out


def box_iou_curves(maps: torch.Tensor, masks: torch.Tensor, *, thresholds: int = DEFAULT_THRESHOLDS,
                   multi_contour: bool = True, normalise: str | None = "minmax",
                   iou_thresholds: Sequence[float] = IOU_THRESHOLDS) -> torch.Tensor:
    """Per map, the IoU of its estimated box with the ground-truth box at every threshold: (B, T, thresholds).

    ``maps`` (B, T, *spatial); ``masks`` (B, 1 or T, *spatial) bool. NaN rows where the mask is empty. See
    the module docstring for the steps; ``iou_thresholds`` is not used here (it belongs to the reduction; it
    is accepted so that one parameter set serves both). The statistic of :func:`max_box_acc_v2`.
    """
    maps = float_maps(maps)
    # the shared checks: rank, empty batch, NaN/inf (a NaN map has no box: it scored IoU 0 at every threshold,
    # a silent miss), and the warning for square (B, H, W) maps, read as (B, T, L) signals
    check_maps(maps)
    m = expand_masks(masks, maps).reshape(maps.shape)
    a = _normalise(maps, normalise, maps.ndim - 2).detach().cpu().double().numpy()
    m = m.detach().cpu().numpy()
    taus = threshold_grid(thresholds)
    b, t = maps.shape[:2]
    out = np.full((b, t, len(taus)), np.nan)
    for i in range(b):
        for j in range(t):
            gt_box = _box(m[i, j])
            if gt_box is not None:
                out[i, j] = _iou_curve(a[i, j], gt_box, taus, bool(multi_contour))
    return torch.from_numpy(out)


def max_box_acc_reduce(curves: torch.Tensor, *, iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                       thresholds: int = DEFAULT_THRESHOLDS, multi_contour: bool = True,
                       normalise: str | None = "minmax") -> tuple[torch.Tensor, dict]:
    """MaxBoxAccV2 of pooled IoU curves (N, thresholds) (rows of NaN: maps without ground truth, left out).

    Returns the per-map share (N,) (mean over delta of "IoU >= delta at the best tau for delta", NaN for
    the maps left out; its mean over the others is MaxBoxAccV2) and a dict: ``max_box_acc_v2``,
    ``max_box_acc`` {delta: MaxBoxAcc}, ``best_threshold`` {delta: tau, the smallest on ties}, ``n`` maps
    scored, ``n_excluded``. With no map scored every value is NaN.
    """
    c = torch.as_tensor(curves, dtype=torch.float64).detach().cpu().numpy()
    if c.ndim != 2:
        raise NemtError(f"curves must be (N, thresholds), got shape {c.shape}")
    taus = np.arange(c.shape[1]) / c.shape[1]
    valid = ~np.isnan(c).any(1)
    deltas = [float(v) for v in iou_thresholds]
    if not deltas:
        raise NemtError("iou_thresholds must not be empty")
    share = np.full(c.shape[0], np.nan)
    info: dict = {"max_box_acc_v2": float("nan"), "max_box_acc": {}, "best_threshold": {},
                  "n": int(valid.sum()), "n_excluded": int((~valid).sum()), "thresholds": int(c.shape[1]),
                  "iou_thresholds": deltas}
    if valid.any():
        hits_at_best = []
        for delta in deltas:
            hits = c[valid] >= delta  # (n, thresholds)
            acc = hits.mean(0)
            best = int(np.argmax(acc))  # the first (smallest) tau on ties
            info["max_box_acc"][str(delta)] = float(acc[best])
            info["best_threshold"][str(delta)] = float(taus[best])
            hits_at_best.append(hits[:, best])
        share[valid] = np.mean(hits_at_best, axis=0)
        info["max_box_acc_v2"] = float(np.mean(list(info["max_box_acc"].values())))
    return torch.from_numpy(share), info


@metric("higher", inputs=("maps", "gt"), dataset=(box_iou_curves, max_box_acc_reduce))
def max_box_acc_v2(maps: torch.Tensor, masks: torch.Tensor, *, thresholds: int = DEFAULT_THRESHOLDS,
                   iou_thresholds: Sequence[float] = IOU_THRESHOLDS, multi_contour: bool = True,
                   normalise: str | None = "minmax") -> torch.Tensor:
    """MaxBoxAccV2 (Choe et al. 2020) over the maps given, as per-map shares (B, T).

    The best threshold is chosen over all B x T maps with ground truth together (a data-set-level maximum),
    and each map's value is the mean over ``iou_thresholds`` of 1 if its box hits at that threshold, so
    ``nanmean(max_box_acc_v2(maps, masks))`` is MaxBoxAccV2 of the set (NaN where the mask is empty). Higher
    is better, in [0, 1]. ``multi_contour=False``: boxes from the largest component only (the original
    MaxBoxAcc's mining). The benchmark runner pools every batch before taking the maximum.
    """
    curves = box_iou_curves(maps, masks, thresholds=thresholds, multi_contour=multi_contour,
                            normalise=normalise)
    b, t, n = curves.shape
    share, _ = max_box_acc_reduce(curves.reshape(b * t, n), iou_thresholds=iou_thresholds, thresholds=thresholds)
    return share.reshape(b, t).to(float_maps(maps).dtype)
