"""Synthetic radiograph-like phantoms with pixel-exact ground truth.

The toolkit's built-in data: seeded images (2D) or volumes (3D) of a chest-like
body with lesion-like *findings* of several kinds, each with the exact mask of
the pixels it changed. They serve to train small classifiers and to check that
explanations point at the finding.

Look
----
Background ("anatomy"), all with soft edges and dimension-agnostic geometry
(axis 0 is cranio-caudal, the last axis is left-right, any axes between are
antero-posterior depth):

- a large body ellipse/ellipsoid of soft tissue on a dark surround;
- two darker lung lobes, wider at the base, with faint rib arcs;
- a brighter heart shadow over the lower middle and a spine band (a rod in 3D);
- slowly varying intensity (a few random low-frequency cosines and a gradient);
- band-pass filtered noise texture, then per-image gain and offset (so global
  brightness says nothing about the label), then pixel noise of std ``noise``;
- clipped to ``[0, 1]``.

Findings (``FINDINGS``), placed wholly inside the body, not overlapping where
possible, each added to the background only on its mask:

- ``"nodule"``: bright compact round blob, radius 4-8 % of the size, flat core
  and cosine-tapered soft edge, contrast +0.20..+0.32;
- ``"opacity"``: diffuse, irregular brighter patch (smoothed noise thresholded
  inside an ellipse of semi-axes 11-18 % of the size), contrast +0.13..+0.20;
- ``"cyst"``: dark, sharply bounded ellipse (semi-axes 6-10 %) of contrast
  -0.18..-0.28 with a thin slightly bright rim (+0.05..+0.09).

"Size" for finding dimensions is ``min(shape)``.

Every sample ``i`` depends only on ``(seed, i)`` (and on the shape, task and
finding list), so the first ``m`` samples of a larger set equal a set of ``m``.
"""
from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from nemt.data.generated import claim_folder
from nemt.errors import DataError
from nemt.files import atomic_open, atomic_path, write_json

__all__ = [
    "FINDINGS",
    "TASKS",
    "SEVERITY_REF_CONTRAST",
    "PhantomSet",
    "make_phantoms",
    "write_phantom_dataset",
]

FINDINGS: tuple[str, ...] = ("nodule", "opacity", "cyst")
TASKS: tuple[str, ...] = ("multiclass", "multilabel", "regression")

#: Reference contrast of the regression target (see :func:`make_phantoms`).
SEVERITY_REF_CONTRAST = 0.2

_MIN_SIZE = 8


# --------------------------------------------------------------------------
# public container
# --------------------------------------------------------------------------


@dataclass(eq=False)
class PhantomSet:
    """A batch of phantoms.

    images: float32 ``(N, 1, *spatial)`` in ``[0, 1]``.
    masks: bool ``(N, K, *spatial)``, one channel per finding kind.
    present: bool ``(N, K)``.
    labels: multiclass int64 ``(N,)`` (0 = normal, k = ``findings[k-1]``);
        multilabel float32 ``(N, K)`` (= present); regression float32 ``(N,)``.
    label_names: ``["normal", *findings]`` / ``list(findings)`` / ``["severity"]``.
    """

    images: np.ndarray
    masks: np.ndarray
    present: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    task: str
    spatial_dims: int
    findings: tuple[str, ...] = FINDINGS

    @property
    def union_masks(self) -> np.ndarray:
        """bool ``(N, 1, *spatial)``: pixels changed by any finding."""
        return self.masks.any(axis=1, keepdims=True)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, idx: Any) -> "PhantomSet":
        """A subset (slice, index array or boolean mask) as a new PhantomSet."""
        if isinstance(idx, (int, np.integer)):
            idx = [int(idx)]
        return PhantomSet(
            images=self.images[idx],
            masks=self.masks[idx],
            present=self.present[idx],
            labels=self.labels[idx],
            label_names=list(self.label_names),
            task=self.task,
            spatial_dims=self.spatial_dims,
            findings=tuple(self.findings),
        )


# --------------------------------------------------------------------------
# geometry helpers (dimension-agnostic)
# --------------------------------------------------------------------------


class _Grid(NamedTuple):
    shape: tuple[int, ...]
    pix: list[np.ndarray]  # sparse pixel-index grids, one per axis
    uni: list[np.ndarray]  # sparse normalised grids in (-1, 1), one per axis
    scale: float  # min(shape): the length finding sizes are fractions of


def _grid(shape: tuple[int, ...]) -> _Grid:
    pix = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij", sparse=True)
    uni = [(p + 0.5) / s * 2.0 - 1.0 for p, s in zip(pix, shape)]
    return _Grid(shape, pix, uni, float(min(shape)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ellipsoid_radius(coords: Sequence[np.ndarray], center: Sequence[float],
                      axes: Sequence[float], rot: np.ndarray | None = None) -> np.ndarray:
    """Normalised radius ``||diag(1/axes) R^T (x - c)||`` over a (sparse) grid."""
    d = len(coords)
    diffs = [coords[k] - center[k] for k in range(d)]
    acc = None
    for j in range(d):
        if rot is None:
            y = diffs[j]
        else:
            y = sum(rot[k, j] * diffs[k] for k in range(d))
        term = (y / axes[j]) ** 2
        acc = term if acc is None else acc + term
    return np.sqrt(np.broadcast_to(acc, tuple(np.broadcast_shapes(*[c.shape for c in coords]))))


def _random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _smooth_step(t: np.ndarray) -> np.ndarray:
    """0 for t<=0, 1 for t>=1, C1-smooth in between."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _std_normalise(x: np.ndarray) -> np.ndarray:
    s = float(x.std())
    return (x - float(x.mean())) / s if s > 0 else np.zeros_like(x)


# --------------------------------------------------------------------------
# background
# --------------------------------------------------------------------------


class _Background(NamedTuple):
    raw: np.ndarray  # float64, unclipped, includes gain/offset and pixel noise
    body_r: np.ndarray  # normalised radius of the body ellipsoid (body is r < 1)


def _background(rng: np.random.Generator, g: _Grid, noise: float) -> _Background:
    d = len(g.shape)
    u = g.uni
    u0, ulat = u[0], u[-1]
    depth = u[1:-1]

    # body
    bc = rng.uniform(-0.03, 0.03, d)
    ba = np.array([0.88] + [0.72] * (d - 2) + [0.92]) * rng.uniform(0.95, 1.03, d)
    body_r = _ellipsoid_radius(u, bc, ba)
    body = _sigmoid((1.0 - body_r) / 0.008)

    # lungs: wider towards the base (larger u0)
    lungs = np.zeros(g.shape)
    lc0 = bc[0] - 0.10 + rng.uniform(-0.04, 0.04)
    for side in (-1.0, 1.0):
        c = np.zeros(d)
        c[0] = lc0
        c[1:-1] = bc[1:-1] - 0.05
        c[-1] = bc[-1] + side * ba[-1] * rng.uniform(0.42, 0.50)
        ax0 = ba[0] * rng.uniform(0.60, 0.68)
        axl = ba[-1] * rng.uniform(0.28, 0.33) * (1.0 + 0.35 * (u0 - lc0))
        axd = [ba[k] * 0.62 for k in range(1, d - 1)]
        r = _ellipsoid_radius(u, c, [ax0, *axd, 1.0])  # lateral handled below
        r = np.sqrt(np.maximum(r**2 - (ulat - c[-1]) ** 2, 0.0) + ((ulat - c[-1]) / axl) ** 2)
        lungs = np.maximum(lungs, _sigmoid((1.0 - r) / 0.06))
    lungs *= body

    # heart shadow (lower middle, towards image right) and spine band/rod
    hc = np.array([bc[0] + 0.30] + [bc[k] - 0.25 for k in range(1, d - 1)]
                  + [bc[-1] + 0.12 * ba[-1]]) + rng.uniform(-0.04, 0.04, d)
    ha = np.array([0.30] + [0.30] * (d - 2) + [0.30]) * rng.uniform(0.85, 1.15, d)
    heart = _sigmoid((1.0 - _ellipsoid_radius(u, hc, ha)) / 0.08)
    spine = np.exp(-0.5 * ((ulat - bc[-1]) / 0.06) ** 2)
    for k, dd in enumerate(depth, start=1):
        spine = spine * np.exp(-0.5 * ((dd - (bc[k] + 0.55)) / 0.12) ** 2)

    # rib arcs inside the lungs
    n_ribs = rng.uniform(7.0, 9.0)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    ribs = (0.5 + 0.5 * np.cos(np.pi * n_ribs * (u0 + 0.45 * (ulat - bc[-1]) ** 2) + phase)) ** 6

    tissue = 0.50 + 0.10 * spine + 0.14 * heart
    img = 0.05 + body * tissue
    img = img - 0.30 * lungs * (1.0 - 0.75 * heart) + 0.06 * ribs * lungs

    # slowly varying intensity: a gradient and three low-frequency cosines
    low = sum(rng.uniform(-0.04, 0.04) * uk for uk in u)
    for _ in range(3):
        f = rng.normal(0.0, 1.0, d) * 1.2
        ph = rng.uniform(0.0, 2.0 * np.pi)
        low = low + rng.uniform(0.0, 0.03) * np.cos(np.pi * sum(fk * uk for fk, uk in zip(f, u)) + ph)
    img = img + body * low

    # band-pass texture (stronger in the lungs: vessel-like mottling)
    white = rng.standard_normal(g.shape)
    s1 = max(0.6, 0.006 * g.scale)
    s2 = max(1.5, 0.025 * g.scale)
    band = _std_normalise(gaussian_filter(white, s1, mode="reflect") - gaussian_filter(white, s2, mode="reflect"))
    img = img + band * body * (0.015 + 0.02 * lungs * (1.0 - 0.75 * heart))

    # per-image gain and offset, then pixel noise
    gain = rng.uniform(0.80, 1.15)
    offset = rng.uniform(-0.06, 0.06)
    img = img * gain + offset
    img = img + noise * rng.standard_normal(g.shape)
    return _Background(np.ascontiguousarray(img), np.ascontiguousarray(body_r))


# --------------------------------------------------------------------------
# findings
# --------------------------------------------------------------------------


@dataclass
class _Finding:
    kind: str
    center: np.ndarray  # pixel coordinates
    axes: np.ndarray  # semi-axes in pixels (before the rotation)
    rot: np.ndarray
    amp: float
    rim_amp: float = 0.0
    field_seed: int = 0


def _draw_finding(kind: str, rng: np.random.Generator, g: _Grid) -> _Finding:
    d = len(g.shape)
    L = g.scale
    rot = _random_rotation(rng, d)
    if kind == "nodule":
        r = max(1.6, rng.uniform(0.04, 0.08) * L)
        axes = r * rng.uniform(0.9, 1.1, d)
        return _Finding(kind, np.zeros(d), axes, rot, amp=rng.uniform(0.20, 0.32))
    if kind == "opacity":
        axes = np.maximum(3.0, rng.uniform(0.11, 0.18, d) * L)
        return _Finding(kind, np.zeros(d), axes, rot, amp=rng.uniform(0.13, 0.20),
                        field_seed=int(rng.integers(2**31)))
    if kind == "cyst":
        a = max(2.5, rng.uniform(0.06, 0.10) * L)
        axes = a * rng.uniform(0.8, 1.2, d)
        return _Finding(kind, np.zeros(d), axes, rot, amp=-rng.uniform(0.18, 0.28),
                        rim_amp=rng.uniform(0.05, 0.09))
    raise DataError(None, "findings", f"unknown finding kind {kind!r}; known: {', '.join(FINDINGS)}")


def _extent(f: _Finding) -> np.ndarray:
    """Half-extent per axis (pixels) of the finding's support, rotation included."""
    outer = f.axes * (1.0 + (2.5 / float(f.axes.min()) if f.kind == "cyst" else 0.0))
    return np.sqrt(((f.rot * outer[None, :]) ** 2).sum(axis=1))


def _render_finding(f: _Finding, g: _Grid, opacity_field: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(delta, mask)``: the additive change (float64, 0 off the mask) and its support."""
    r = _ellipsoid_radius(g.pix, f.center, f.axes, f.rot)
    if f.kind == "nodule":
        prof = 1.0 - _smooth_step((r - 0.55) / 0.45)  # 1 in the core, 0 from r = 1 on
        mask = r < 1.0
        delta = np.where(mask, f.amp * prof, 0.0)
    elif f.kind == "opacity":
        if opacity_field is None:
            opacity_field = _opacity_field(f.field_seed, g)
        field = 0.75 * opacity_field + (1.0 - r**2) - 0.45
        mask = (field > 0.0) & (r < 1.0)
        if not mask.any():  # degenerate noise draw: fall back to the plain ellipse
            field = 1.0 - r**2
            mask = r < 1.0
        prof = np.clip(field / 0.3, 0.0, 1.0) * np.clip(1.0 - r**2, 0.0, 1.0) ** 0.25
        mask = mask & (prof > 0.0)
        delta = np.where(mask, f.amp * prof, 0.0)
    elif f.kind == "cyst":
        pix_r = 1.0 / float(f.axes.min())  # one pixel in normalised radius (along the short axis)
        w_in, w_rim = 1.2 * pix_r, 2.5 * pix_r
        inside = np.clip((1.0 - r) / w_in, 0.0, 1.0)
        rim = np.sin(np.pi * np.clip((r - 1.0 + 0.5 * w_in) / (w_rim + 0.5 * w_in), 0.0, 1.0))
        mask = r < 1.0 + w_rim
        delta = np.where(mask, f.amp * inside + f.rim_amp * rim, 0.0)
        mask = mask & (delta != 0.0)
    else:  # pragma: no cover - _draw_finding already rejects
        raise DataError(None, "findings", f"unknown finding kind {f.kind!r}")
    return delta, mask


def _opacity_field(field_seed: int, g: _Grid) -> np.ndarray:
    frng = np.random.default_rng(field_seed)
    n = frng.standard_normal(g.shape)
    return _std_normalise(gaussian_filter(n, max(1.0, 0.035 * g.scale), mode="reflect"))


def _place_findings(kinds: Sequence[str], rng: np.random.Generator, g: _Grid, body_r: np.ndarray,
                    tries: int = 40) -> list[tuple[_Finding, np.ndarray, np.ndarray]]:
    """Draw and place findings wholly inside the body, avoiding overlap where possible."""
    shape = np.array(g.shape, dtype=np.float64)
    inner = body_r < 0.95
    taken = np.zeros(g.shape, dtype=bool)
    placed: list[tuple[_Finding, np.ndarray, np.ndarray]] = []
    for kind in kinds:
        f = _draw_finding(kind, rng, g)
        field = _opacity_field(f.field_seed, g) if kind == "opacity" else None
        ext = _extent(f)
        best = None
        for _ in range(tries):
            # candidate centre: uniform over the region where the extent box fits the image
            lo = ext + 1.0
            hi = shape - 1.0 - ext - 1.0
            if np.any(hi < lo):
                c = (shape - 1.0) / 2.0
            else:
                c = rng.uniform(lo, hi)
            ci = tuple(int(round(x)) for x in c)
            if body_r[ci] > 0.9:
                continue
            f.center = c
            delta, mask = _render_finding(f, g, field)
            if not mask.any() or np.any(mask & ~inner):
                continue
            if np.any(mask & taken):
                if best is None:
                    best = (c.copy(), delta, mask)
                continue
            best = (c.copy(), delta, mask)
            break
        if best is None:  # nothing fitted: shrink towards the body centre and accept
            f.axes = f.axes * 0.6
            idx = np.unravel_index(int(np.argmin(body_r)), g.shape)
            f.center = np.array(idx, dtype=np.float64)
            delta, mask = _render_finding(f, g, field)
            mask &= inner
            delta = np.where(mask, delta, 0.0)
            if not mask.any():  # tiny images: keep at least the centre pixel
                mask[idx] = True
                delta[idx] = f.amp
            best = (f.center, delta, mask)
        f.center = best[0]
        placed.append((f, best[1], best[2]))
        taken |= best[2]
    return placed


def _severity(delta: np.ndarray, union: np.ndarray) -> float:
    """Severity = 100 * area_fraction * mean|contrast| / SEVERITY_REF_CONTRAST.

    ``area_fraction`` is the union lesion mask's share of all pixels and
    ``mean|contrast|`` the mean absolute (unclipped) intensity change over that
    mask; equivalently ``100 * sum|delta| / (n_pixels * ref)``. 0 without findings.
    """
    n = union.size
    a = int(union.sum())
    if a == 0:
        return 0.0
    area = a / n
    contrast = float(np.abs(delta[union]).mean())
    return 100.0 * area * contrast / SEVERITY_REF_CONTRAST


# --------------------------------------------------------------------------
# one sample
# --------------------------------------------------------------------------


class _Sample(NamedTuple):
    image: np.ndarray  # float32 (*spatial)
    background: np.ndarray  # float32 (*spatial): the same image without findings
    masks: np.ndarray  # bool (K, *spatial)
    present: np.ndarray  # bool (K,)
    label: Any
    severity: float
    body: np.ndarray  # bool (*spatial): body region (normalised body radius < 1)
    specs: list  # the placed _Finding objects


def _choose_kinds(rng: np.random.Generator, task: str, findings: Sequence[str], p_finding: float) -> list[str]:
    k = len(findings)
    if task == "multiclass":
        c = int(rng.integers(k + 1))
        return [] if c == 0 else [findings[c - 1]]
    if task == "multilabel":
        draws = rng.random(k)
        return [f for f, x in zip(findings, draws) if x < p_finding]
    # regression: normal with probability 1/(K+1), else 1-3 findings of random kinds
    if rng.random() < 1.0 / (k + 1):
        return []
    m = int(rng.integers(1, 4))
    return [findings[int(j)] for j in rng.integers(k, size=m)]


def _generate_sample(seed: int, i: int, shape: tuple[int, ...], task: str, findings: Sequence[str],
                     noise: float, p_finding: float) -> _Sample:
    master = np.random.default_rng([seed, i])
    bg_seed, choice_seed, place_seed = (int(x) for x in master.integers(2**63, size=3))
    g = _grid(shape)
    bg = _background(np.random.default_rng(bg_seed), g, noise)
    kinds = _choose_kinds(np.random.default_rng(choice_seed), task, findings, p_finding)
    placed = _place_findings(kinds, np.random.default_rng(place_seed), g, bg.body_r)

    k = len(findings)
    masks = np.zeros((k, *shape), dtype=bool)
    delta = np.zeros(shape, dtype=np.float64)
    for f, dl, m in placed:
        masks[findings.index(f.kind)] |= m
        delta += dl
    present = masks.reshape(k, -1).any(axis=1)
    union = masks.any(axis=0)

    background = np.clip(bg.raw, 0.0, 1.0).astype(np.float32)
    image = np.clip(bg.raw + delta, 0.0, 1.0).astype(np.float32)
    # off the union mask delta is exactly 0, so image == background there
    sev = _severity(delta, union)
    if task == "multiclass":
        label: Any = 0 if not present.any() else int(np.flatnonzero(present)[0]) + 1
    elif task == "multilabel":
        label = present.astype(np.float32)
    else:
        label = sev
    return _Sample(image, background, masks, present, label, sev, bg.body_r < 1.0, [p[0] for p in placed])


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def _check_args(n: int, size: int | Sequence[int], spatial_dims: int, task: str,
                findings: Sequence[str], noise: float, p_finding: float) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(None, "n", f"must be a non-negative integer, got {n!r}")
    if spatial_dims not in (2, 3):
        raise DataError(None, "spatial_dims", f"must be 2 or 3, got {spatial_dims!r}")
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        shape = (int(size),) * spatial_dims
    else:
        try:
            shape = tuple(int(s) for s in size)  # type: ignore[union-attr]
        except TypeError:
            raise DataError(None, "size", f"must be an int or a tuple of ints, got {size!r}") from None
        if len(shape) != spatial_dims:
            raise DataError(None, "size", f"has {len(shape)} entries but spatial_dims is {spatial_dims}")
    if any(s < _MIN_SIZE for s in shape):
        raise DataError(None, "size", f"every side must be at least {_MIN_SIZE} pixels, got {shape}")
    if task not in TASKS:
        raise DataError(None, "task", f"must be one of {', '.join(TASKS)}, got {task!r}")
    findings = tuple(findings)
    if not findings:
        raise DataError(None, "findings", "at least one finding kind is needed")
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise DataError(None, "findings", f"unknown kind(s) {unknown}; known: {', '.join(FINDINGS)}")
    if len(set(findings)) != len(findings):
        raise DataError(None, "findings", f"repeated kinds in {findings}")
    if not (noise >= 0.0):
        raise DataError(None, "noise", f"must be >= 0, got {noise!r}")
    if not (0.0 <= p_finding <= 1.0):
        raise DataError(None, "p_finding", f"must be in [0, 1], got {p_finding!r}")
    return shape, findings


def _label_names(task: str, findings: Sequence[str]) -> list[str]:
    if task == "multiclass":
        return ["normal", *findings]
    if task == "multilabel":
        return list(findings)
    return ["severity"]


def make_phantoms(n: int, size: int | tuple[int, ...] = 128, *, spatial_dims: int = 2,
                  task: str = "multiclass", seed: int = 0, findings: tuple[str, ...] = FINDINGS,
                  noise: float = 0.03, p_finding: float = 0.5) -> PhantomSet:
    """Generate ``n`` seeded phantoms with per-finding masks.

    ``size``: an int (square/cube of ``spatial_dims`` axes) or a tuple, one
    entry per axis (anisotropic allowed, each >= 8). Finding sizes scale with
    ``min(shape)``.

    Tasks:

    - ``"multiclass"``: at most one finding per image; normal with probability
      1/(K+1), else one kind uniformly. ``labels`` int64, 0 = normal,
      k = ``findings[k-1]``.
    - ``"multilabel"``: each kind present independently with probability
      ``p_finding`` (one instance per kind). ``labels`` float32 ``(N, K)``.
    - ``"regression"``: normal (severity 0) with probability 1/(K+1), else 1-3
      findings of uniformly drawn kinds (a kind may repeat; its mask channel
      holds all instances). ``labels`` float32 severity::

          severity = 100 * area_fraction * mean_abs_contrast / 0.2

      with ``area_fraction`` the union mask's share of all pixels and
      ``mean_abs_contrast`` the mean |intensity change| (before clipping) over
      the union mask, i.e. ``500 * sum|change| / n_pixels``: monotone in lesion
      area and contrast, 0 exactly when there is no finding. Typical range 0-10.

    ``p_finding`` only affects ``"multilabel"``. Sample ``i`` depends only on
    ``(seed, i)``: ``make_phantoms(10, seed=s)[:5]`` equals ``make_phantoms(5, seed=s)``.
    """
    shape, findings = _check_args(n, size, spatial_dims, task, findings, noise, p_finding)
    k = len(findings)
    images = np.empty((n, 1, *shape), dtype=np.float32)
    masks = np.empty((n, k, *shape), dtype=bool)
    present = np.empty((n, k), dtype=bool)
    if task == "multiclass":
        labels = np.empty((n,), dtype=np.int64)
    elif task == "multilabel":
        labels = np.empty((n, k), dtype=np.float32)
    else:
        labels = np.empty((n,), dtype=np.float32)
    for i in range(n):
        s = _generate_sample(seed, i, shape, task, findings, noise, p_finding)
        images[i, 0] = s.image
        masks[i] = s.masks
        present[i] = s.present
        labels[i] = s.label
    return PhantomSet(images, masks, present, labels, _label_names(task, findings), task,
                      spatial_dims, findings)


# --------------------------------------------------------------------------
# on-disk data set
# --------------------------------------------------------------------------


def _write_png(path: Path, arr_u8: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr_u8), mode="L").save(tmp, format="PNG", optimize=False)


def _write_nifti_gz(path: Path, arr: np.ndarray) -> None:
    """NIfTI-1 with identity affine, gzipped with a fixed header (mtime 0) for byte-identical reruns."""
    import nibabel as nib

    img = nib.Nifti1Image(arr, np.eye(4))
    img.header.set_xyzt_units("mm")
    raw = img.to_bytes()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            with gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=6, mtime=0) as gz:
                gz.write(raw)


def write_phantom_dataset(out_dir: str | Path, n: int, size: int | tuple[int, ...] = 128, *,
                          spatial_dims: int = 2, task: str = "multiclass", seed: int = 0,
                          overwrite: bool = False, **kwargs: Any) -> Path:
    """Write ``n`` phantoms as files plus ``manifest.csv`` and ``phantoms.json``; return the manifest path.

    Layout (paths in the manifest are relative to ``out_dir``)::

        images/00000.png   8-bit grey, round(255 * x)           (3D: .nii.gz, float32)
        masks/00000.png    union of the finding masks, 0/255    (3D: .nii.gz, uint8 0/1)
        manifest.csv       image,mask,<labels>,group
        phantoms.json      generation parameters

    Label columns: multiclass ``label`` (class name, ``"normal"`` or a kind);
    multilabel one 0/1 column per finding name; regression ``severity``.
    ``group`` is a synthetic patient id: images ``2j`` and ``2j+1`` share
    patient ``p{j:04d}``. 3D volumes are stored with axes in array order and an
    identity affine. ``kwargs`` go to :func:`make_phantoms` (``findings``,
    ``noise``, ``p_finding``). All files are written atomically and a rerun with
    the same arguments gives byte-identical files. A folder that holds another
    data set is refused before anything is written (``overwrite``: a phantom set
    of other settings is replaced, its files removed first; see
    :func:`nemt.data.generated.claim_folder`).
    """
    out = Path(out_dir)
    ps = make_phantoms(n, size, spatial_dims=spatial_dims, task=task, seed=seed, **kwargs)
    params = {
        "generator": "nemt.data.phantoms",
        "n": n,
        "size": list(ps.images.shape[2:]),
        "spatial_dims": spatial_dims,
        "task": task,
        "seed": seed,
        "findings": list(ps.findings),
        "label_names": list(ps.label_names),
        "noise": float(kwargs.get("noise", 0.03)),
        "p_finding": float(kwargs.get("p_finding", 0.5)),
    }
    claim_folder(out, "phantoms.json", params, command="nemt data phantoms", overwrite=overwrite)
    ext = ".png" if spatial_dims == 2 else ".nii.gz"
    width = max(5, len(str(max(n - 1, 0))))
    gwidth = max(4, len(str(max((n - 1) // 2, 0))))
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)

    if task == "multiclass":
        label_cols = ["label"]
    elif task == "multilabel":
        label_cols = list(ps.findings)
    else:
        label_cols = ["severity"]

    rows = []
    union = ps.union_masks
    for i in range(n):
        name = f"{i:0{width}d}{ext}"
        img_rel, mask_rel = f"images/{name}", f"masks/{name}"
        if spatial_dims == 2:
            _write_png(out / img_rel, np.round(ps.images[i, 0] * 255.0).astype(np.uint8))
            _write_png(out / mask_rel, union[i, 0].astype(np.uint8) * 255)
        else:
            _write_nifti_gz(out / img_rel, ps.images[i, 0].astype(np.float32))
            _write_nifti_gz(out / mask_rel, union[i, 0].astype(np.uint8))
        if task == "multiclass":
            labels = [ps.label_names[int(ps.labels[i])]]
        elif task == "multilabel":
            labels = [str(int(v)) for v in ps.labels[i]]
        else:
            labels = [f"{float(ps.labels[i]):.9g}"]
        rows.append([img_rel, mask_rel, *labels, f"p{i // 2:0{gwidth}d}"])

    manifest = out / "manifest.csv"
    with atomic_open(manifest, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image", "mask", *label_cols, "group"])
        w.writerows(rows)

    write_json(out / "phantoms.json", params)
    return manifest
