"""Overlays of explanation maps on images, written atomically as PNG.

For 3D volumes the overlay shows the middle slice along the first spatial
axis and the slice through the map's maximum; the raw map is saved
separately (NIfTI) by the caller.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from nemt.files import atomic_path
from nemt.ops import ArgumentTypeError, ParameterError


def subplots(*grid: int, figsize: tuple[float, float], **kw):
    """``pyplot.subplots`` without pyplot: a bare Figure (saved through its own Agg canvas), so drawing never
    selects or changes the caller's matplotlib backend and leaves no figure open in pyplot's registry."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kw)


def colormap_lut(name: str = "inferno") -> np.ndarray:
    """A matplotlib colour map as 256 RGB rows of integers 0..255 (server, viewer and DICOM output draw with the same)."""
    from matplotlib import colormaps

    return np.rint(colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) uint8."""
    a = np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float, lut: np.ndarray) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colormap(map)``: (C, H, W) in [0, 1] and (H, W) in [0, 1] -> (H, W, 3) uint8.

    The image is taken at 8 bits first, as the viewer receives it, so that
    the viewer's client-side blend gives the same pixels.
    """
    rgb = _to_uint8(image).astype(np.float32)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    idx = np.clip(np.rint(np.nan_to_num(heat) * 255), 0, 255).astype(np.intp)
    out = (1 - alpha) * rgb + alpha * lut[idx].astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def display_order(a: np.ndarray, axcodes: Sequence[str] | None) -> np.ndarray:
    """A volume's last three (spatial) axes reordered for display by its orientation (``axcodes``, as
    ``nibabel.aff2axcodes`` gives them for a NIfTI; None or incomplete: unchanged): the superior-inferior axis
    first (the slices are axial), then anterior to posterior (anterior at the top), then the patient's right to
    left (the right on the viewer's left, radiological convention). A DICOM series is read frames first, rows,
    columns, which is its display order already; an array without orientation is shown as stored."""
    if a.ndim < 3 or not axcodes or len(axcodes) != 3:
        return a
    codes = [str(c) if c else "" for c in axcodes]
    where = {pair: next((i for i, c in enumerate(codes) if c and c in pair), None) for pair in ("SI", "AP", "RL")}
    if None in where.values() or len(set(where.values())) != 3:
        return a
    lead = a.ndim - 3
    out = np.moveaxis(a, [lead + where[p] for p in ("SI", "AP", "RL")], [lead, lead + 1, lead + 2])
    if codes[where["AP"]] == "A":  # index grows toward anterior: flip, anterior at the top
        out = np.flip(out, lead + 1)
    if codes[where["RL"]] == "R":  # index grows toward the patient's right: flip, right on the left
        out = np.flip(out, lead + 2)
    return np.ascontiguousarray(out)


def _slices(a: np.ndarray, m: np.ndarray, gt: np.ndarray | None):
    """2D: one panel; 3D: the middle slice and the slice through the map's maximum."""
    if m.ndim == 2:
        return [("", a, m, gt)]
    mid = m.shape[0] // 2
    peak = int(np.unravel_index(np.argmax(m), m.shape)[0])
    return [(f"slice {i}", a[..., i, :, :] if a.ndim == 4 else a[i], m[i], None if gt is None else gt[i])
            for i in dict.fromkeys([mid, peak])]


def save_overlay(path: str | Path, image: np.ndarray, maps: Sequence[np.ndarray], titles: Sequence[str],
                 *, gt: np.ndarray | None = None, alpha: float = 0.45, cmap: str = "inferno",
                 suptitle: str | None = None, axcodes: Sequence[str] | None = None) -> Path:
    """One PNG: the image, then each map over it (with the ground-truth outline if given).

    ``image`` is (H, W) or (3, H, W) in [0, 1] (or (D, H, W) for volumes);
    each map is (*spatial) in [0, 1], of the image's spatial size (a map of
    another size is refused, not resized: it would cover only part of the
    image); ``titles`` has one title per map; ``gt``, if given, the image's
    spatial size too. A volume is shown as slices along its first axis, after
    :func:`display_order` by ``axcodes`` (a NIfTI's orientation: axial slices).
    """
    _check_panels(image, maps, titles, gt)
    if np.asarray(maps[0]).ndim == 3 and axcodes:
        image, maps = display_order(np.asarray(image), axcodes), [display_order(np.asarray(m), axcodes) for m in maps]
        gt = None if gt is None else display_order(np.asarray(gt), axcodes)
    if np.asarray(maps[0]).ndim == 1:
        return _save_signal_overlay(path, image, maps, titles, gt=gt, suptitle=suptitle)
    panels = [(t, s) for t, m in zip(titles, maps) for s in _slices(image, np.asarray(m), gt)]
    n = 1 + len(panels)
    fig, axes = subplots(1, n, figsize=(3 * n, 3.2), squeeze=False)
    first = _slices(image, np.asarray(maps[0]), gt)[0][1]
    show = np.moveaxis(first, 0, -1) if first.ndim == 3 else first
    axes[0, 0].imshow(show, cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("image")
    for ax, (title, (sub, a, m, g)) in zip(axes[0, 1:], panels):
        show = np.moveaxis(a, 0, -1) if a.ndim == 3 else a
        ax.imshow(show, cmap="gray", vmin=0, vmax=1)
        ax.imshow(m, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        if g is not None and g.any():
            ax.contour(g.astype(float), levels=[0.5], colors="cyan", linewidths=1.0)
        ax.set_title(f"{title} {sub}".strip(), fontsize=9, parse_math=False)
    for ax in axes[0]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9, parse_math=False)  # a file name with "$": text, not maths
    fig.tight_layout(rect=(0, 0, 1, 0.92) if suptitle else None)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


def _check_panels(image, maps, titles, gt) -> None:
    """Refuse maps whose spatial size differs from the image's, and titles that do not pair one to one with the
    maps (``zip`` would drop the maps without a title, or the titles without a map, silently)."""
    if isinstance(titles, str):
        raise ArgumentTypeError(f"titles must be a sequence of strings, one per map, got the string {titles!r}")
    maps, titles = list(maps), list(titles)
    if not maps:
        raise ParameterError("maps holds no map: give at least one (*spatial) map to draw")
    if len(titles) != len(maps):
        raise ParameterError(f"{len(titles)} titles for {len(maps)} maps: give one title per map (titles pair "
                             "with maps in order)")
    img = np.asarray(image)
    for i, m in enumerate(maps):
        m = np.asarray(m)
        d = m.ndim
        if d not in (1, 2, 3):
            raise ParameterError(f"maps[{i}] must be (*spatial) with 1 to 3 axes, got shape {m.shape}")
        spatial = img.shape[-d:] if img.ndim >= d else None
        if d == 2 and img.ndim == 3 and img.shape[-2:] != m.shape and img.shape[:2] == m.shape:
            raise ParameterError(f"maps[{i}] of shape {m.shape} does not fit the image of shape {img.shape}: "
                                 "the image looks channel-last (H, W, C); give it channel-first (C, H, W), "
                                 "np.moveaxis(image, -1, 0)")
        if spatial != m.shape:
            want = img.shape[-d:] if img.ndim >= d else img.shape
            raise ParameterError(f"maps[{i}] of shape {m.shape} does not fit the image of shape {img.shape}: "
                                 f"each map must have the image's spatial size {want} (resize the map to the "
                                 "image first, e.g. nemt.ops.resize_linear)")
    if gt is not None:
        g, first = np.asarray(gt), np.asarray(maps[0]).shape
        if g.shape != first:
            raise ParameterError(f"gt of shape {g.shape} does not fit the maps of shape {first}: give the ground "
                                 "truth at the image's spatial size")


def signal_panels(fig, signal: np.ndarray, maps: Sequence[np.ndarray], titles: Sequence[str],
                  gt: np.ndarray | None = None, cmap: str = "inferno"):
    """A 1D signal as curves (one per channel; (L,) or (C, L)) with the ground truth shaded, and under it one
    strip per map ((L,) in [0, 1], the same time axis). Returns the axes (signal first)."""
    sig = np.atleast_2d(np.asarray(signal, dtype=float))
    n = len(maps)
    axes = fig.subplots(1 + n, 1, sharex=True, gridspec_kw={"height_ratios": [3] + [1] * n})
    axes = np.atleast_1d(axes)
    t = np.arange(sig.shape[-1])
    for c in sig:
        axes[0].plot(t, c, lw=0.8, color="black" if len(sig) == 1 else None)
    if gt is not None and np.asarray(gt).any():
        g = np.asarray(gt).astype(bool).reshape(-1)
        edges = np.flatnonzero(np.diff(np.r_[0, g.astype(int), 0]))
        for lo, hi in zip(edges[::2], edges[1::2]):
            axes[0].axvspan(lo - 0.5, hi - 0.5, color="cyan", alpha=0.25, lw=0)
    axes[0].set_ylabel("signal", fontsize=8)
    for ax, m, title in zip(axes[1:], maps, titles):
        m = np.asarray(m, dtype=float).reshape(1, -1)
        ax.imshow(m, aspect="auto", cmap=cmap, vmin=0, vmax=1, extent=(-0.5, m.shape[1] - 0.5, 0, 1),
                  interpolation="nearest")
        ax.set_yticks([])
        ax.set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center", parse_math=False)
    axes[-1].set_xlabel("sample", fontsize=8)
    return axes


def _save_signal_overlay(path, image, maps, titles, *, gt=None, suptitle=None) -> Path:
    fig = Figure(figsize=(9, 2.2 + 0.6 * len(maps)))
    signal_panels(fig, image, maps, titles, gt)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9, parse_math=False)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path
