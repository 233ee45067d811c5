"""Eye gaze for a data set: fixation files, a gaze simulator, and heat maps as MIMIC-CXR-EGD's users make them.

Radiologists' gaze (MIMIC-CXR-EGD, Karargyris et al. 2021) is a list of
fixations per image: where the eye rested (x, y in pixels of the original
image) and for how long. nemt keeps it in one file format, read and written
here, for real and simulated gaze alike:

- a **fixation CSV**: columns ``image, x, y, duration`` (one row per fixation;
  ``x`` along the image's columns, ``y`` along its rows, continuous pixel
  coordinates of the *original* image with pixel i covering [i, i + 1);
  ``duration`` in seconds). ``image`` names a sample of the data set: its path
  as written in the manifest, its file name or its stem (EGD's ``DICOM_ID``).
  EGD's own ``fixations.csv`` reads as it is (``DICOM_ID``, ``X_ORIGINAL``,
  ``Y_ORIGINAL``, ``FPOGD``). :func:`read_fixations` checks every row;
  :func:`check_gaze` also checks the file against a data set (the images it
  names, 2D, each fixation inside its image: ``0 <= x < width``, ``0 <= y < height``).
- **Where it lives**: ``gaze.csv`` beside the data set's manifest (or in a
  class-per-folder tree's root) is found by default (:func:`default_gaze_path`);
  any other file is given by path (``nemt benchmark --gaze FILE``). The
  manifest itself is not changed, so a model's data fingerprint is the same
  with or without gaze.

Heat maps (:func:`gaze_heatmap`) follow the MIMIC authors (``learning-to-mimic``,
``utils.create_heatmap``): a box of 20 px per fixation (union, value 1) on
~2,500 px wide radiographs, a Gaussian blur of sigma = 150 px (about 6 % of the
width), min-max to [0, 1]. Here both are fractions of the image width
(:data:`BOX_FRACTION`, :data:`SIGMA_FRACTION`) and the map is made at the model's
input size directly. Fixation durations do not weight the map (the authors'
do not either).

The simulator (:func:`simulate_fixations`, :func:`simulate_gaze`) stands in for
readers where no gaze was recorded: a Poisson number of fixations per image
(mean ``n_fixations``), a share ``p_finding`` of them uniform inside the
finding's mask and the rest drawn from an anatomy prior (the image's smoothed
foreground times a centre bias, a Gaussian of 25 % of each side: Tatler 2007's
central fixation bias), gamma-distributed durations (shape 2.5, scale 0.1 s:
mean 0.25 s, the typical fixation in scene viewing). An image without a
finding (no mask, or an empty one) gets anatomy fixations only. Every image's
draws come from its own generator, seeded by (seed, the image's name), so a
simulation does not depend on the order of the manifest's rows.

Only 2D images: eye tracking is recorded on displayed slices, not volumes.
"""
from __future__ import annotations

import csv
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from nemt.data.manifest import Manifest, Sample, read_csv_table
from nemt.errors import DataError
from nemt.files import atomic_open, image_stem
from nemt.ops import gaussian_blur, minmax

GAZE_FILE = "gaze.csv"
#: side of the box around each fixation, as a fraction of the image width (20 px on a 2,544 px MIMIC-CXR image)
BOX_FRACTION = 20 / 2544
#: sigma of the heat map's Gaussian blur, as a fraction of the image width (150 px on 2,544 px: 5.9 %)
SIGMA_FRACTION = 150 / 2544
#: the fixation CSV's columns and the other names each is accepted under (case-insensitive; EGD's first)
COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "dicom_id", "image_id", "file", "filename", "path"),
    "x": ("x", "x_original"),
    "y": ("y", "y_original"),
    "duration": ("duration", "fpogd", "dur"),
}
#: gamma distribution of fixation durations, seconds (shape, scale): mean 0.25 s
DURATION_GAMMA = (2.5, 0.1)
#: centre bias of the anatomy prior: a Gaussian of this fraction of each side
CENTRE_SIGMA = 0.25
#: the anatomy prior is computed on a grid of at most this many pixels per side
PRIOR_GRID = 64
#: the largest mean number of simulated fixations per image (a radiologist's reading has tens to a few
#: hundred; a larger mean only fills memory: each fixation is 3 float64 numbers)
MAX_FIXATIONS = 10_000
#: a number as the fixation CSV writes it: ASCII digits, an optional sign, point and exponent (no ``1_0``,
#: which Python's ``float`` reads as 10); ``nan`` and ``inf`` are read by ``float`` and refused as not finite
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", re.ASCII)

Fixations = dict[str, np.ndarray]
"""Image key -> (N, 3) float64 array of fixations: x, y (original pixels), duration (s)."""


# ---------------------------------------------------------------------------- fixation files

def read_fixations(path: str | Path) -> Fixations:
    """A fixation CSV (see the module docstring) as {image: (N, 3) x, y, duration}.

    Every row is checked: the image cell non-empty, x and y finite numbers
    >= 0, the duration a finite number > 0, no more cells than the header has;
    a number is written with ASCII digits, an optional sign, point and exponent
    (``1_0`` is refused, not read as 10). A column of the file's header that
    appears twice (in any case: ``x`` and ``X``) is refused, and so is a file
    without rows. All bad rows are reported in one
    :class:`~nemt.errors.DataError` that names the file, and per row its line,
    field and reason. Whether the fixations lie inside their images is checked
    against the data set by :func:`check_gaze`.
    """
    return _read_rows(path).fixations


@dataclass
class _Rows:
    """A fixation CSV as read: the fixations, each one's CSV line, and the file's names of the columns."""

    fixations: Fixations
    lines: dict[str, list[int]]
    columns: dict[str, str]


def _read_rows(path: str | Path) -> _Rows:
    path = Path(path)
    header, rows = read_csv_table(path, "fixation file", "empty file")
    lower = {c.lower(): c for c in header}
    cols: dict[str, str] = {}
    for name, aliases in COLUMNS.items():
        found = next((lower[a] for a in aliases if a in lower), None)
        if found is None:
            raise DataError(path, name, f"no {name} column (tried {', '.join(aliases)}); columns are {header}")
        same = [c for c in header if c.lower() == found.lower()]
        if len(same) > 1:  # csv.DictReader keeps the last of them: refused instead of read silently
            raise DataError(path, found, f"the column is in the header {len(same)} times ({', '.join(same)}); "
                            "give each column once")
        cols[name] = found
    if not rows:
        raise DataError(path, None, "no fixation rows (only the header)")
    problems: list[str] = []
    out: dict[str, list[tuple[float, float, float]]] = {}
    lines: dict[str, list[int]] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        extra = row.get(None)  # csv.DictReader's key for the cells past the header's
        if extra:
            problems.append(f"row {line}: {len(header) + len(extra)} fields, the header has {len(header)} "
                            f"({', '.join(header)})")
            continue
        image = (row.get(cols["image"]) or "").strip()
        if not image:
            problems.append(f"row {line}: {cols['image']}: empty image name")
            continue
        values = []
        for name in ("x", "y", "duration"):
            cell = (row.get(cols[name]) or "").strip()
            try:
                v = float(cell)
            except ValueError:
                v = None
            if v is None or math.isfinite(v) and not _NUMBER.fullmatch(cell):
                problems.append(f"row {line}: {cols[name]}: {cell!r} is not a number")
                break
            if not math.isfinite(v):
                problems.append(f"row {line}: {cols[name]}: {cell!r} is not finite")
                break
            if name == "duration" and v <= 0:
                problems.append(f"row {line}: {cols[name]}: duration must be positive, got {cell}")
                break
            if name in ("x", "y") and v < 0:
                problems.append(f"row {line}: {cols[name]}: a pixel coordinate is >= 0, got {cell}")
                break
            values.append(v)
        else:
            out.setdefault(image, []).append(tuple(values))
            lines.setdefault(image, []).append(line)
    _raise_rows(path, problems)
    return _Rows({k: np.asarray(v, dtype=np.float64).reshape(-1, 3) for k, v in out.items()}, lines, cols)


def _raise_rows(path: Path, problems: list[str]) -> None:
    """One :class:`~nemt.errors.DataError` naming ``path`` and the first 20 of ``problems`` (one per bad row)."""
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise DataError(path, None, f"{len(problems)} bad fixation rows:\n  " + "\n  ".join(shown))


def write_fixations(path: str | Path, fixations: Mapping[str, np.ndarray]) -> Path:
    """Write {image: (N, 3) x, y, duration} as a fixation CSV, atomically; images in the mapping's order."""
    path = Path(path)
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image", "x", "y", "duration"])
        for image, f in fixations.items():
            for x, y, d in np.asarray(f, dtype=np.float64).reshape(-1, 3):
                w.writerow([image, f"{x:.3f}", f"{y:.3f}", f"{d:.4f}"])
    return path


def default_gaze_path(manifest: Manifest) -> Path:
    """Where a data set's gaze is found by default: ``gaze.csv`` beside its manifest (or in its folder)."""
    src = Path(manifest.source)
    return (src if src.is_dir() else src.parent) / GAZE_FILE


def sample_key(manifest: Manifest, sample: Sample) -> str:
    """The name a fixation file uses for ``sample``: its path relative to the data set's folder (POSIX
    separators), or ``file.npz[i]`` for an in-memory MedMNIST image."""
    if sample.index is not None:
        return sample.name
    src = Path(manifest.source)
    root = src if src.is_dir() else src.parent
    try:
        return sample.image.relative_to(root).as_posix()
    except ValueError:
        return sample.image.as_posix()


@dataclass
class FixationMatch:
    """Which sample each image name of a fixation table names (:func:`resolve_fixations`)."""

    #: sample index -> its fixations (two spellings of one image: their fixations together)
    matched: dict[int, np.ndarray] = field(default_factory=dict)
    #: image name -> the sample index it names
    names: dict[str, int] = field(default_factory=dict)
    #: names that name no sample
    unknown: list[str] = field(default_factory=list)
    #: names that name several samples (e.g. one file name in two folders) -> those samples' keys
    ambiguous: dict[str, list[str]] = field(default_factory=dict)


def resolve_fixations(manifest: Manifest, fixations: Mapping[str, np.ndarray],
                      source: str | Path | None = None) -> FixationMatch:
    """The samples of ``manifest`` that the images of ``fixations`` name. A name matches a sample's key
    (:func:`sample_key`), else its file name, else its stem (EGD's DICOM id); a file name or stem that several
    samples share is ambiguous (listed with their keys) and matches none. Raises if no name matches any sample."""
    by: dict[str, dict[str, list[int]]] = {"key": {}, "name": {}, "stem": {}}
    keys = []
    for i, s in enumerate(manifest.samples):
        key = sample_key(manifest, s)
        keys.append(key)
        by["key"].setdefault(key, []).append(i)
        by["name"].setdefault(Path(key).name, []).append(i)
        by["stem"].setdefault(image_stem(key), []).append(i)
    out = FixationMatch()
    for image, f in fixations.items():
        hit = None
        several: list[int] = []
        for kind in ("key", "name", "stem"):
            idx = by[kind].get(image.replace("\\", "/"))
            if idx is not None and len(idx) == 1:
                hit = idx[0]
                break
            if idx is not None and not several:
                several = idx
        if hit is None and several:
            out.ambiguous[image] = [keys[i] for i in several]
        elif hit is None:
            out.unknown.append(image)
        else:
            out.names[image] = hit
            out.matched[hit] = np.concatenate([out.matched[hit], f]) if hit in out.matched else f
    if fixations and not out.matched:
        why = ""
        if out.ambiguous:
            name, keys_ = next(iter(out.ambiguous.items()))
            why = (f"; {len(out.ambiguous)} of them name several samples (e.g. {name!r}: "
                   f"{', '.join(keys_[:5])}), name those by their path in the manifest")
        raise DataError(source, "image", f"none of the {len(fixations)} images named (e.g. "
                        f"{list(fixations)[:3]}) is a sample of {manifest.source}; name them by their path in the "
                        f"manifest, their file name or their stem{why}")
    return out


def match_fixations(manifest: Manifest, fixations: Mapping[str, np.ndarray],
                    source: str | Path | None = None) -> tuple[dict[int, np.ndarray], list[str]]:
    """{sample index: fixations} for the images of ``fixations`` that name a sample, and the names that
    name none (an ambiguous name, one that several samples share, among them): :func:`resolve_fixations`.
    Raises if no name matches any sample."""
    m = resolve_fixations(manifest, fixations, source)
    return m.matched, m.unknown + list(m.ambiguous)


def check_gaze(manifest: Manifest, path: str | Path) -> tuple[Fixations, FixationMatch]:
    """A real fixation CSV read (:func:`read_fixations`) and checked against the data set ``manifest``: the
    images it names (:func:`resolve_fixations`), each 2D (gaze is recorded on displayed images), and every
    fixation of those images inside its image, ``0 <= x < width`` and ``0 <= y < height`` in pixels of the
    original image (pixel i covers [i, i + 1)). Returns the file's fixations (every row, unknown names
    included) and the match. Every fixation outside its image is reported in one
    :class:`~nemt.errors.DataError` naming the file, and per row its line, field and reason."""
    from nemt.data.dataset import read_sample
    path = Path(path)
    rows = _read_rows(path)
    match = resolve_fixations(manifest, rows.fixations, path)
    problems: list[str] = []
    shapes: dict[int, tuple[int, ...]] = {}
    for image, i in match.names.items():
        if i not in shapes:
            shapes[i] = tuple(read_sample(manifest, manifest.samples[i]).array.shape[1:])
            if len(shapes[i]) != 2:
                raise DataError(path, rows.columns["image"], f"gaze is recorded on 2D images; "
                                f"{sample_key(manifest, manifest.samples[i])!r} (named by {image!r}) is "
                                f"{len(shapes[i])}D, shape {shapes[i]}")
        h, w = shapes[i]
        for (x, y, _), line in zip(rows.fixations[image], rows.lines[image]):
            for name, v, side, what in (("x", x, w, "wide"), ("y", y, h, "high")):
                if v >= side:
                    problems.append(f"row {line}: {rows.columns[name]}: {v:g} is outside the image {image!r} "
                                    f"({side} px {what}: 0 <= {name} < {side})")
                    break
    _raise_rows(path, problems)
    return rows.fixations, match


# ---------------------------------------------------------------------------- heat maps

def _check_2d(shape: Sequence[int], what: str) -> tuple[int, int]:
    if len(shape) != 2:
        raise DataError(None, what, f"gaze is 2D (rows, columns); got a {len(shape)}D shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def gaze_heatmap(fixations: np.ndarray, original: Sequence[int], size: Sequence[int] | None = None, *,
                 box: float = BOX_FRACTION, sigma: float = SIGMA_FRACTION) -> torch.Tensor:
    """The gaze heat map of one image at ``size`` (default ``original``): (1, H, W) float32 in [0, 1].

    ``fixations``: (N, 2 or 3) x, y[, duration] in pixels of an image of spatial shape ``original``
    (H0, W0); they are scaled to ``size`` (the same stretch as the model's resize). Each fixation sets a
    box of side ``box`` x W (at least one pixel: the one holding the fixation) to 1; the union is blurred
    with a Gaussian of ``sigma`` x W pixels (reflected edges, kernel truncated at 4 sigma, as
    ``scipy.ndimage.gaussian_filter``) and min-max normalised. No fixation inside the image: all zeros;
    boxes covering every pixel: all ones (the blur of a constant is that constant, which min-max would
    make all zeros, as if there were no gaze).
    """
    h0, w0 = _check_2d(original, "original")
    h, w = _check_2d(size if size is not None else original, "size")
    f = np.asarray(fixations, dtype=np.float64).reshape(-1, np.shape(fixations)[-1] if np.size(fixations) else 3)
    boxes = np.zeros((h, w), dtype=np.float64)
    if len(f):
        x, y = f[:, 0] * (w / w0), f[:, 1] * (h / h0)
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        half = box * w / 2
        cols, rows = np.arange(w) + 0.5, np.arange(h) + 0.5
        for xi, yi in zip(x[inside], y[inside]):
            c = (cols >= xi - half) & (cols < xi + half)
            r = (rows >= yi - half) & (rows < yi + half)
            c[int(xi)] = r[int(yi)] = True  # the fixated pixel itself, however small the box
            boxes[np.ix_(r, c)] = 1.0
    heat = torch.as_tensor(boxes)[None, None]
    if boxes.all():
        heat = torch.ones_like(heat)
    elif boxes.any():
        s = sigma * w
        heat = gaussian_blur(heat, s, radius=max(1, int(4 * s + 0.5)), mode="reflect")
        heat = minmax(heat.flatten(2)).view_as(heat)
    return heat[0].float()


def fixation_map(fixations: np.ndarray, original: Sequence[int], size: Sequence[int] | None = None) -> torch.Tensor:
    """Fixation counts per pixel at ``size`` (default ``original``): (1, H, W) float32, for NSS
    (:func:`nemt.metrics.nss`: the z-scored map averaged over the fixated pixels, weighted by count)."""
    h0, w0 = _check_2d(original, "original")
    h, w = _check_2d(size if size is not None else original, "size")
    f = np.asarray(fixations, dtype=np.float64).reshape(-1, np.shape(fixations)[-1] if np.size(fixations) else 3)
    out = torch.zeros(h * w, dtype=torch.float32)
    if len(f):
        c = np.floor(f[:, 0] * (w / w0)).astype(np.int64)
        r = np.floor(f[:, 1] * (h / h0)).astype(np.int64)
        ok = (c >= 0) & (c < w) & (r >= 0) & (r < h)
        out.index_add_(0, torch.as_tensor(r[ok] * w + c[ok]), torch.ones(int(ok.sum())))
    return out.view(1, h, w)


# ---------------------------------------------------------------------------- simulator

def anatomy_prior(image: np.ndarray, *, centre_sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """Where a reader looks without a finding: (H, W) probabilities summing to 1.

    ``image``: (H, W) intensities in [0, 1]. The smoothed image (Gaussian of 1.5 % of the shorter
    side) above 15 % of its 1-99 % percentile range is the foreground (the body, the ultrasound
    sector, lungs included: dark against the body, bright against the air); it is multiplied by the
    centre bias, a Gaussian of ``centre_sigma`` of each side around the image's centre. A blank image
    gets the centre bias alone.
    """
    h, w = _check_2d(np.shape(image), "image")
    smooth = gaussian_filter(np.asarray(image, dtype=np.float64), sigma=max(0.5, 0.015 * min(h, w)))
    lo, hi = np.percentile(smooth, [1, 99])
    fg = (smooth > lo + 0.15 * (hi - lo)).astype(np.float64) if hi > lo else np.ones((h, w))
    yy = (np.arange(h) + 0.5) / h - 0.5
    xx = (np.arange(w) + 0.5) / w - 0.5
    centre = np.exp(-0.5 * ((yy[:, None] / centre_sigma) ** 2 + (xx[None, :] / centre_sigma) ** 2))
    p = fg * centre
    if p.sum() <= 0:
        p = centre
    return p / p.sum()


def _draw_from(p: np.ndarray, n: int, rng: np.random.Generator, scale: tuple[float, float]) -> np.ndarray:
    """``n`` continuous (x, y) points drawn from the grid probabilities ``p`` (h, w), uniform within the
    drawn cell, in units where a cell is ``scale`` = (rows, columns) pixels."""
    flat = p.ravel() / p.sum()
    cells = rng.choice(flat.size, size=n, p=flat)
    r, c = np.divmod(cells, p.shape[1])
    u = rng.random((n, 2))
    return np.stack([(c + u[:, 0]) * scale[1], (r + u[:, 1]) * scale[0]], axis=1)


def check_simulation(n_fixations: float, p_finding: float) -> None:
    """Refuse a simulation setting: ``n_fixations`` a finite number in (0, :data:`MAX_FIXATIONS`],
    ``p_finding`` in [0, 1]."""
    for name, v in (("n_fixations", n_fixations), ("p_finding", p_finding)):
        if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
            raise DataError(None, name, f"must be a number, got {v!r}")
    if not 0.0 <= p_finding <= 1.0:
        raise DataError(None, "p_finding", f"must be in [0, 1], got {p_finding}")
    if not (math.isfinite(n_fixations) and n_fixations > 0):
        raise DataError(None, "n_fixations", f"must be a finite number > 0, got {n_fixations}")
    if n_fixations > MAX_FIXATIONS:
        raise DataError(None, "n_fixations", f"must be at most {MAX_FIXATIONS} (mean fixations per image; a "
                        f"reading has tens to a few hundred), got {n_fixations:g}")


def simulate_fixations(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, *,
                       n_fixations: float = 40, p_finding: float = 0.7,
                       centre_sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """Simulated fixations on one image: (N, 3) x, y (pixels of ``image``), duration (s).

    ``image``: (H, W) in [0, 1]; ``mask``: (H, W) bool finding mask, or None / all False for an image
    without a finding. N = max(3, Poisson(``n_fixations``)); with a finding, Binomial(N, ``p_finding``)
    of them are uniform inside the mask and the rest follow :func:`anatomy_prior`; without one, all
    follow the prior. The prior is computed on a grid of at most :data:`PRIOR_GRID` cells per side
    (points uniform within a cell). Draws come from ``rng`` only.
    """
    h, w = _check_2d(np.shape(image), "image")
    check_simulation(n_fixations, p_finding)
    n = max(3, int(rng.poisson(n_fixations)))
    has_finding = mask is not None and bool(np.any(mask))
    if mask is not None and np.shape(mask) != (h, w):
        raise DataError(None, "mask", f"mask is {np.shape(mask)}, image is {(h, w)}")
    k = int(rng.binomial(n, p_finding)) if has_finding else 0
    # the prior on a coarse grid: area-averaged image
    gh, gw = min(h, PRIOR_GRID), min(w, PRIOR_GRID)
    t = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    coarse = torch.nn.functional.adaptive_avg_pool2d(t, (gh, gw))[0, 0].numpy()
    prior = anatomy_prior(coarse, centre_sigma=centre_sigma)
    parts = []
    if k:
        m = np.asarray(mask, dtype=bool).astype(np.float64)
        parts.append(_draw_from(m, k, rng, (1.0, 1.0)))
    if n - k:
        parts.append(_draw_from(prior, n - k, rng, (h / gh, w / gw)))
    xy = np.concatenate(parts)
    # inside the image as the fixation CSV writes it (3 decimals): x < w even after rounding
    xy[:, 0] = np.clip(xy[:, 0], 0.0, w - 1e-3)
    xy[:, 1] = np.clip(xy[:, 1], 0.0, h - 1e-3)
    order = rng.permutation(n)  # a scan path mixes finding and anatomy fixations
    duration = rng.gamma(DURATION_GAMMA[0], DURATION_GAMMA[1], size=n)
    return np.concatenate([xy[order], duration[:, None]], axis=1)


def _finding_mask(manifest: Manifest, sample: Sample, img) -> np.ndarray | None:
    """The sample's finding mask at its original size: its mask file, else its boxes, else None."""
    from nemt.data.readers import read_mask
    spatial = img.array.shape[1:]
    if sample.mask is not None:
        return read_mask(sample.mask, like=img, max_pixels=manifest.max_pixels)[0]
    if sample.boxes:
        m = np.zeros(spatial, dtype=bool)
        yy = np.arange(spatial[0])[:, None] + 0.5
        xx = np.arange(spatial[1])[None, :] + 0.5
        for x, y, bw, bh in sample.boxes:
            m |= (xx >= x) & (xx < x + bw) & (yy >= y) & (yy < y + bh)
        return m
    return None


def _unit_grey(img) -> np.ndarray:
    """An image's intensities in [0, 1] by its value range (as `scale="range"` reads it: the readers module's
    table per format), channels averaged: (H, W)."""
    a = img.array.astype(np.float64)
    lo, hi = img.value_range
    return np.clip((a - lo) / max(hi - lo, 1e-12), 0.0, 1.0).mean(axis=0)


def sample_seed(seed: int, key: str) -> np.random.Generator:
    """The generator of one image's simulated gaze: seeded by (seed, CRC-32 of its key)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode("utf-8"))])


def simulate_gaze(manifest: Manifest, *, seed: int = 0, n_fixations: float = 40, p_finding: float = 0.7,
                  progress: Callable[[int], None] | None = None) -> Fixations:
    """Simulated fixations for every image of ``manifest``: {sample key: (N, 3)} (see the module docstring).

    The finding is the sample's mask (or boxes); a sample without one, or with an empty one, is
    normal. ``progress(k)`` is called after each image.
    """
    from nemt.data.dataset import read_sample
    check_simulation(n_fixations, p_finding)  # before any image is read
    out: Fixations = {}
    for s in manifest.samples:
        img = read_sample(manifest, s)
        if img.array.ndim != 3:
            raise DataError(s.image, "shape", f"gaze is simulated on 2D images; this one is "
                            f"{img.array.ndim - 1}D")
        key = sample_key(manifest, s)
        out[key] = simulate_fixations(_unit_grey(img), _finding_mask(manifest, s, img), sample_seed(seed, key),
                                      n_fixations=n_fixations, p_finding=p_finding)
        if progress is not None:
            progress(1)
    return out


# ---------------------------------------------------------------------------- for the benchmark

def gaze_targets(manifest: Manifest, indices: Sequence[int], size: Sequence[int],
                 fixations: Mapping[int, np.ndarray], *, box: float = BOX_FRACTION,
                 sigma: float = SIGMA_FRACTION) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaze heat maps and fixation maps at the model's ``size`` for manifest rows ``indices``.

    ``fixations``: {sample index: (N, 3)} (:func:`match_fixations`). Returns heat maps (N, 1, H, W) in
    [0, 1] (:func:`gaze_heatmap`), fixation counts (N, 1, H, W) (:func:`fixation_map`) and has_gaze (N,)
    bool; an image without gaze has all-zero maps (the gaze metrics give NaN there).
    """
    from nemt.data.dataset import read_sample
    size = _check_2d(size, "size")
    heat = torch.zeros(len(indices), 1, *size)
    fix = torch.zeros(len(indices), 1, *size)
    has = torch.zeros(len(indices), dtype=torch.bool)
    for k, i in enumerate(indices):
        f = fixations.get(int(i))
        if f is None or not len(f):
            continue
        original = read_sample(manifest, manifest.samples[int(i)]).array.shape[1:]
        heat[k] = gaze_heatmap(f, original, size, box=box, sigma=sigma)
        fix[k] = fixation_map(f, original, size)
        has[k] = bool(fix[k].sum() > 0)
    return heat, fix, has
