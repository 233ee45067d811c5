"""XAI-TRIS ground-truth benchmark images (2D only): tetrominoes on noise, with the true feature masks.

Re-implementation of the 64x64 data of Clark, Wilming & Haufe, "XAI-TRIS:
non-linear image benchmarks to quantify false positive post-hoc attribution
of feature importance", Machine Learning 113 (2024), following the authors'
generator (github.com/braindatalab/xai-tris, ``data/generate_data.py``,
``data/data_utils.py``, ``data/data_config.json`` of the paper's version,
``eval/eval_utils.py`` for the ground truth). XAI-TRIS defines 2D images only,
so this module is 2D only.

Patterns
--------
Two tetrominoes drawn on an 8x8 base grid of cells, each 3 rows x 2 columns:
``T = [[1,0],[1,1],[1,0]]`` and ``L = [[1,0],[1,0],[1,1]]``. A cell is
``cell x cell`` pixels with ``cell = size // 8`` (8 px at 64 px: 24x16-pixel
patterns) for LIN, MULT and XOR, and ``cell = size // 16`` (4 px: 12x8) for
RIGID. When ``cell > 3`` the pattern is smoothed with a Gaussian of
``blur_sigma = 1.5`` px, as XAI-TRIS does. XAI-TRIS thresholds the smoothed
pattern at 0.05 to obtain its binary ground truth; here the *signal itself*
is cut to zero below 0.05 as well, so that the ground truth is exactly the
set of pixels the pattern changed (the < 0.05 tails XAI-TRIS leaves in the
image carry a negligible part of its energy).

Scenarios (``SCENARIOS``); class 0 / class 1, with balanced classes
(``y[i] = i % 2``):

- ``"lin"`` (XAI-TRIS "linear", additive): T at cell (1, 1) (pixels
  (8, 8) at 64 px) / L at cell (4, 5) (pixels (32, 40));
- ``"mult"`` (XAI-TRIS "multiplicative"): the same placements, but the
  pattern P multiplies the background: ``x = (1 - alpha P) * B``;
- ``"rigid"`` (XAI-TRIS "translations_rotations", additive): T / L, rotated
  by a random multiple of 90 degrees and placed at a uniformly random
  position (the smoothed footprint lies wholly inside the image; XAI-TRIS
  lets the unsmoothed pattern touch the border and smooths with reflection);
- ``"xor"`` (additive): T at (1, 1) *and* L at (4, 5) in every image, each
  with a sign; class 0 has equal signs (++ or --), class 1 opposite signs
  (+- or -+), each sign pair in a quarter of the images (``(i // 2) % 2``).

Backgrounds (``BACKGROUNDS``): ``"white"``, i.i.d. standard Gaussian pixels;
``"corr"``, the same noise smoothed by a Gaussian of ``smoothing_sigma``
(10 px at 64 px, XAI-TRIS's value; scaled with the size by default; scipy's
``gaussian_filter`` with reflecting borders, applied as two matrix products).
A smooth background makes pixels next to the pattern *suppressors*: they are
independent of the label but help a model cancel the background.

Mixing
------
XAI-TRIS divides the stacked signals ``S`` and backgrounds ``B`` (N x D) by
their Frobenius norms, so each image's parts have, on average, unit norm.
Here the same is done with n-independent constants: the signal is divided
by its root-mean-square norm over the scenario's equally likely patterns and
the background by its expected norm (``sqrt(D)`` for white noise, the
smoothing operator's Frobenius norm for CORR), giving

- additive: ``x = sqrt(D) * (alpha * s + (1 - alpha) * b)``,
- multiplicative: ``x = sqrt(D) * (1 - alpha * P) * b``,

with ``D = H * W``. XAI-TRIS finally divides by the data set's largest
``|x|``; a global factor does not change the problem, so here the factor
``sqrt(D)`` instead makes the background's per-pixel RMS about ``1 - alpha``
(additive) or 1 (multiplicative) whatever ``n`` is. Images are signed and
centred on 0 (no [0, 1] scaling).

Signal weight ``alpha``: ``PAPER_ALPHA`` holds the paper's 64x64 values
(its ``data_config.json``): LIN 0.03 / 0.02, MULT 0.65 / 0.05, RIGID 0.575 /
0.375, XOR 0.075 / 0.03 (WHITE / CORR), tuned for N = 40 000 images (90/5/5
split) and up to 500 training epochs. ``DEFAULT_ALPHA`` equals them except
MULT/CORR and XOR/CORR, raised to 0.2: with a few thousand images and ~25
epochs (:func:`nemt.bench.xaitris.train_xaitris_models`) no model rose above
chance at the paper's values (the CNN still did not at XOR/CORR 0.1), while
at 0.2 the CNN reaches 0.99. A model that has not learned the task has no
correct explanation to find, so the benchmark needs learnable defaults.

Ground truth
------------
``gt`` marks the pixels whose values depend on the class by construction:
for LIN, MULT and XOR the union of the T and L footprints, the same mask for
every image (XAI-TRIS's ``combined_mask``; in LIN/MULT the *absence* of
the other class's pattern is class information too); for RIGID each image's
own rotated and translated footprint. ``placed`` marks where a pattern was
actually drawn in each image (for LIN/MULT only the image's own class
pattern; otherwise equal to ``gt``).

Determinism: backgrounds and RIGID geometry come from two independent
streams spawned from ``numpy.random.SeedSequence(seed)``; nothing reads or
changes a global random state, and ``alpha`` does not change the draws (the
same seed gives the same backgrounds at every alpha and in every scenario).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from nemt.errors import NemtError

__all__ = ["SCENARIOS", "BACKGROUNDS", "DEFAULT_ALPHA", "PAPER_ALPHA", "XaiTrisData", "make_xaitris", "split"]

SCENARIOS: tuple[str, ...] = ("lin", "mult", "rigid", "xor")
BACKGROUNDS: tuple[str, ...] = ("white", "corr")

#: Signal weight per (scenario, background) in the XAI-TRIS paper (64x64 data).
PAPER_ALPHA: dict[tuple[str, str], float] = {
    ("lin", "white"): 0.03, ("lin", "corr"): 0.02,
    ("mult", "white"): 0.65, ("mult", "corr"): 0.05,
    ("rigid", "white"): 0.575, ("rigid", "corr"): 0.375,
    ("xor", "white"): 0.075, ("xor", "corr"): 0.03,
}

#: The default signal weights: the paper's, except where small CPU-trained models cannot learn them.
DEFAULT_ALPHA: dict[tuple[str, str], float] = {**PAPER_ALPHA, ("mult", "corr"): 0.2, ("xor", "corr"): 0.2}

_T = np.array([[1, 0], [1, 1], [1, 0]], dtype=np.float64)
_L = np.array([[1, 0], [1, 0], [1, 1]], dtype=np.float64)
_POSITIONS = ((1, 1), (4, 5))  # top-left cells of T and L on the 8x8 base grid
_GT_THRESHOLD = 0.05  # XAI-TRIS's threshold on the smoothed pattern
_BLUR_SIGMA = 1.5
_SMOOTHING_SIGMA_64 = 10.0


@dataclass(eq=False)
class XaiTrisData:
    """A batch of XAI-TRIS images.

    x: float32 ``(N, 1, H, W)``; y: int64 ``(N,)`` in {0, 1};
    gt: bool ``(N, 1, H, W)``, the class-related pixels (see the module docstring);
    placed: bool ``(N, 1, H, W)``, where a pattern was drawn in each image;
    meta: scenario, background, alpha, seed and the other generation settings.
    """

    x: torch.Tensor
    y: torch.Tensor
    gt: torch.Tensor
    placed: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    label_names = ("class0", "class1")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, idx: Any) -> "XaiTrisData":
        """A subset (slice, index tensor/array or boolean mask) as a new XaiTrisData."""
        if isinstance(idx, (int, np.integer)):
            idx = [int(idx)]
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        return XaiTrisData(self.x[idx], self.y[idx], self.gt[idx], self.placed[idx], dict(self.meta))


# --------------------------------------------------------------------------
# patterns
# --------------------------------------------------------------------------


def _tile(cells: np.ndarray, cell: int, blur: float) -> tuple[np.ndarray, tuple[int, int]]:
    """The (smoothed, thresholded, cropped) pattern and its offset from the unsmoothed top-left."""
    p = np.kron(cells, np.ones((cell, cell)))
    if blur <= 0:
        return p, (0, 0)
    m = int(math.ceil(4.0 * blur)) + 1
    p = gaussian_filter(np.pad(p, m), blur, mode="constant", cval=0.0, truncate=4.0)
    p[p < _GT_THRESHOLD] = 0.0
    rows, cols = np.nonzero(p.any(1))[0], np.nonzero(p.any(0))[0]
    return p[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], (int(rows[0]) - m, int(cols[0]) - m)


def _smoothing_matrix(n: int, sigma: float) -> np.ndarray:
    """``G`` with ``G @ v == gaussian_filter1d(v, sigma)`` (reflecting borders, truncate 4)."""
    return gaussian_filter1d(np.eye(n), sigma, axis=0, mode="reflect", truncate=4.0)


def _paste(canvas: np.ndarray, idx: np.ndarray, tile: np.ndarray, top: np.ndarray, left: np.ndarray) -> None:
    """``canvas[idx[k], top[k]:, left[k]:] += tile`` for all k at once."""
    if len(idx) == 0:
        return
    h, w = tile.shape
    rr = top[:, None, None] + np.arange(h)[None, :, None]
    cc = left[:, None, None] + np.arange(w)[None, None, :]
    canvas[idx[:, None, None], rr, cc] += tile[None].astype(canvas.dtype)


# --------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------


def make_xaitris(scenario: str, background: str, n: int, size: int = 64, alpha: float | None = None,
                 seed: int = 0, smoothing_sigma: float | None = None,
                 blur_sigma: float | None = None) -> XaiTrisData:
    """``n`` XAI-TRIS images of ``size`` x ``size`` pixels (see the module docstring).

    ``alpha=None`` takes :data:`DEFAULT_ALPHA`; ``smoothing_sigma=None`` is
    ``10 * size / 64`` (CORR only); ``blur_sigma=None`` is 1.5 px when a
    pattern cell is more than 3 px wide and 0 (sharp pattern) otherwise.
    ``size`` must be a multiple of 8 (16 for RIGID).

    >>> d = make_xaitris("xor", "corr", 8)
    >>> d.x.shape, d.y.tolist(), d.gt.shape
    (torch.Size([8, 1, 64, 64]), [0, 1, 0, 1, 0, 1, 0, 1], torch.Size([8, 1, 64, 64]))
    """
    if scenario not in SCENARIOS:
        raise NemtError(f"unknown XAI-TRIS scenario {scenario!r}; choose one of {SCENARIOS}")
    if background not in BACKGROUNDS:
        raise NemtError(f"unknown XAI-TRIS background {background!r}; choose one of {BACKGROUNDS}")
    n, size = int(n), int(size)
    if n < 1:
        raise NemtError(f"n must be at least 1, got {n}")
    if size < 8 or size % (16 if scenario == "rigid" else 8):
        step = 16 if scenario == "rigid" else 8
        raise NemtError(f"size must be a multiple of {step} (at least {step}), got {size}")
    alpha = DEFAULT_ALPHA[(scenario, background)] if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise NemtError(f"alpha must be in [0, 1], got {alpha}")
    smoothing = _SMOOTHING_SIGMA_64 * size / 64 if smoothing_sigma is None else float(smoothing_sigma)
    cell = size // (16 if scenario == "rigid" else 8)
    blur = (_BLUR_SIGMA if cell > 3 else 0.0) if blur_sigma is None else float(blur_sigma)
    H = W = size
    D = H * W

    bg_ss, geo_ss = np.random.SeedSequence(seed).spawn(2)
    bg_rng, geo_rng = np.random.default_rng(bg_ss), np.random.default_rng(geo_ss)

    # background, unit expected norm
    b = bg_rng.standard_normal((n, H, W), dtype=np.float32)
    if background == "corr" and smoothing > 0:
        G = _smoothing_matrix(H, smoothing)
        b = (G.astype(np.float32) @ b.transpose(1, 0, 2).reshape(H, n * W)).reshape(H, n, W).transpose(1, 0, 2)
        b = np.ascontiguousarray(b).reshape(n * H, W) @ G.T.astype(np.float32)
        b = b.reshape(n, H, W)
        b_norm = float(np.linalg.norm(G) ** 2)  # ||G (x) G||_F = ||G||_F^2: sqrt of E||b||^2
    else:
        b_norm = math.sqrt(D)
    b *= np.float32(1.0 / b_norm)

    # patterns: signed signal image (unit RMS norm), unsigned pattern and masks
    y = (np.arange(n) % 2).astype(np.int64)
    tiles = [_tile(c, cell, blur) for c in (_T, _L)]
    signal = np.zeros((n, H, W), dtype=np.float32)
    idx_all = np.arange(n)
    if scenario == "rigid":
        k = geo_rng.integers(0, 4, size=n)
        top = np.empty(n, dtype=np.int64)
        left = np.empty(n, dtype=np.int64)
        for cls, (tile, _) in enumerate(tiles):
            for rot in range(4):
                sel = idx_all[(y == cls) & (k == rot)]
                t = np.rot90(tile, rot)
                top[sel] = geo_rng.integers(0, H - t.shape[0] + 1, size=len(sel))
                left[sel] = geo_rng.integers(0, W - t.shape[1] + 1, size=len(sel))
                _paste(signal, sel, t, top[sel], left[sel])
        placed = signal > 0
        gt = placed
        energy = np.mean([np.sum(t ** 2) for t, _ in tiles])
    else:
        origin = []
        for (tile, off), (r, c) in zip(tiles, _POSITIONS):
            r0, c0 = r * cell + off[0], c * cell + off[1]
            if r0 < 0 or c0 < 0 or r0 + tile.shape[0] > H or c0 + tile.shape[1] > W:
                raise NemtError(f"blur_sigma {blur} spreads the pattern outside a {size}px image")
            origin.append((r0, c0))
        if scenario == "xor":
            sub = (idx_all // 2) % 2  # which of the two sign pairs of the class
            s_t = np.where(sub == 0, 1.0, -1.0)
            s_l = np.where(y == 0, s_t, -s_t)
            for (tile, _), (r0, c0), sign in zip(tiles, origin, (s_t, s_l)):
                signal[:, r0:r0 + tile.shape[0], c0:c0 + tile.shape[1]] += (
                    sign[:, None, None] * tile[None]).astype(np.float32)
            energy = sum(np.sum(t ** 2) for t, _ in tiles)
        else:
            for cls, ((tile, _), (r0, c0)) in enumerate(zip(tiles, origin)):
                signal[y == cls, r0:r0 + tile.shape[0], c0:c0 + tile.shape[1]] = tile.astype(np.float32)
            energy = np.mean([np.sum(t ** 2) for t, _ in tiles])
        placed = signal != 0
        union = np.zeros((H, W), dtype=bool)
        for (tile, _), (r0, c0) in zip(tiles, origin):
            union[r0:r0 + tile.shape[0], c0:c0 + tile.shape[1]] |= tile > 0
        gt = np.broadcast_to(union, (n, H, W))

    scale = np.float32(math.sqrt(D))
    if scenario == "mult":
        x = (1.0 - np.float32(alpha) * signal) * b
        x *= scale
    else:
        x = np.float32(alpha / math.sqrt(energy)) * signal + np.float32(1.0 - alpha) * b
        x *= scale

    meta = {"scenario": scenario, "background": background, "alpha": alpha, "seed": int(seed), "n": n,
            "size": size, "pattern_cell": cell, "blur_sigma": blur,
            "smoothing_sigma": smoothing if background == "corr" else None}
    return XaiTrisData(
        x=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1),
        y=torch.from_numpy(y),
        gt=torch.from_numpy(np.ascontiguousarray(gt)).unsqueeze(1),
        placed=torch.from_numpy(np.ascontiguousarray(placed)).unsqueeze(1),
        meta=meta,
    )


def split(data: XaiTrisData, fractions: Sequence[float] = (0.8, 0.1, 0.1),
          seed: int = 0) -> tuple[XaiTrisData, XaiTrisData, XaiTrisData]:
    """Stratified, seeded train/val/test subsets (in the original order within each).

    Each class's indices are shuffled by ``numpy.random.default_rng(seed)``
    and cut at the cumulative ``fractions`` (rounded); the same data and seed
    give the same split. XAI-TRIS used 90/5/5 of 40 000 images; 80/10/10 here
    keeps the test set usable for small ``n``. ``meta["split"]`` names the part.
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise NemtError(f"need three non-negative fractions summing to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    y = data.y.numpy()
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in np.unique(y):
        idx = rng.permutation(np.nonzero(y == cls)[0])
        cuts = np.round(np.cumsum(f)[:2] * len(idx)).astype(int)
        for p, chunk in zip(parts, np.split(idx, cuts)):
            p.append(chunk)
    out = []
    for name, p in zip(("train", "val", "test"), parts):
        sub = data[torch.from_numpy(np.sort(np.concatenate(p)).astype(np.int64))]
        sub.meta["split"] = name
        out.append(sub)
    return out[0], out[1], out[2]
