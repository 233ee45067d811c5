"""The benchmark report: one self-contained HTML page (figures inlined as PNG) and the same table as Markdown.

Sections: the summary table (mean and 95 % CI per method and metric, best in
bold, direction arrows), one bar plot per metric with its intervals, time per
method on a log axis, and a gallery per label: each image with the
ground-truth outline and every method's map over it.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from nemt.files import atomic_open, write_html
from nemt.metrics import DIRECTIONS
from nemt.visualize import signal_panels, subplots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def metric_plots(summary: dict, metrics: Sequence[str]) -> str:
    """One panel per metric: the mean per method with its 95 % interval."""
    methods = list(summary)
    n = len(metrics)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = subplots(rows, cols, figsize=(3.4 * cols, 0.35 * len(methods) * rows + 1.2 * rows),
                             squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        means = np.array([summary[k][m]["mean"] for k in methods], dtype=float)
        lo = np.array([summary[k][m]["ci_low"] for k in methods], dtype=float)
        hi = np.array([summary[k][m]["ci_high"] for k in methods], dtype=float)
        err = np.vstack([np.nan_to_num(means - lo), np.nan_to_num(hi - means)])
        has = np.isfinite(means)  # a metric with no value (n/a in the table) gets no bar, not a 0
        rows = np.arange(len(methods))
        ax.barh(rows[has], means[has], xerr=err[:, has], color="#4c72b0", capsize=3)
        for i in rows[~has]:
            ax.text(0, i, " n/a", va="center", fontsize=7, color="#555555")
        ax.set_xlabel("mean, 95 % interval", fontsize=7)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        ax.invert_yaxis()
        arrow = {"higher": "higher is better", "lower": "lower is better"}.get(DIRECTIONS.get(m, ""), "")
        ax.set_title(f"{m}\n({arrow})", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def time_plot(summary: dict) -> str:
    methods = list(summary)
    ms = [max(summary[k]["ms"], 1e-3) for k in methods]
    fig, ax = subplots(figsize=(6, 0.35 * len(methods) + 1))
    ax.barh(range(len(methods)), ms, color="#dd8452")
    ax.set_xscale("log")
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per image (log scale)")
    for i, v in enumerate(ms):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    fig.tight_layout()
    return _png(fig)


def gallery_planes(unit: np.ndarray, gt: np.ndarray, maps: dict[str, np.ndarray], axcodes=None) -> list:
    """A volume's three orthogonal slices through its ground truth's centre (the volume's centre without one):
    ``(name, image (C, a, b), gt (a, b), {method: map (a, b)})`` each; with ``axcodes`` (a NIfTI's orientation)
    axial, coronal and sagittal as :func:`nemt.visualize.display_order` shows them, else the stored axes'."""
    from nemt.visualize import display_order
    shown = display_order(unit, axcodes)
    oriented = shown is not unit
    unit, gt = shown, display_order(gt, axcodes)
    maps = {m: display_order(v, axcodes) for m, v in maps.items()}
    pts = np.argwhere(gt) if gt.any() else None
    centre = (pts.mean(0).round().astype(int) if pts is not None else np.array(unit.shape[1:]) // 2)
    planes = []
    names = ("axial", "coronal", "sagittal") if oriented else ("axis 0", "axis 1", "axis 2")
    for axis, name in enumerate(names):
        k = int(centre[axis])
        take = (lambda a, off=0: np.take(a, k, axis=axis + off))
        planes.append((f"{name} = {k}", take(unit, 1), take(gt), {m: take(v) for m, v in maps.items()}))
    return planes


def gallery_figure(unit: np.ndarray, gt: np.ndarray, maps: dict[str, np.ndarray], title: str,
                   axcodes=None) -> str:
    """The image with its ground-truth outline, then each method's map over it: one row in 2D; in 3D three
    rows, the orthogonal slices through the ground truth's centre (the volume's centre without one): with
    ``axcodes`` (a NIfTI's orientation) axial, coronal and sagittal, shown radiologically
    (:func:`nemt.visualize.display_order`), else the planes of the stored axes."""
    if unit.ndim == 2:  # (C, L): a signal as curves, each method's map as a strip under it
        from matplotlib.figure import Figure
        fig = Figure(figsize=(7, 1.6 + 0.5 * len(maps)))
        signal_panels(fig, unit, list(maps.values()), list(maps), gt)
        fig.suptitle(title, fontsize=8, parse_math=False)  # an image name with "$": text, not maths
        fig.tight_layout()
        return _png(fig)
    if unit.ndim == 4:  # (C, D, H, W)
        planes = gallery_planes(unit, gt, maps, axcodes)
    else:
        planes = [("", unit, gt, maps)]
    n = 1 + len(maps)
    fig, axes = subplots(len(planes), n, figsize=(2.1 * n, 2.3 * len(planes)), squeeze=False)
    for row, (plane, u, g, ms) in zip(axes, planes):
        img = u[0] if u.shape[0] == 1 else np.moveaxis(u, 0, -1)
        for ax in row:
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if g.any():
                ax.contour(g.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.axis("off")
        row[0].set_title(("image + ground truth" + (f"\n{plane}" if plane else "")), fontsize=8)
        for ax, (name, m) in zip(row[1:], ms.items()):
            signed = bool(np.nanmin(m) < 0)  # e.g. postprocess=signed: [-1, 1], not clipped at 0
            ax.imshow(m, cmap="coolwarm" if signed else "inferno", alpha=0.5, vmin=-1 if signed else 0, vmax=1)
            ax.set_title(name, fontsize=8, parse_math=False)
    fig.suptitle(title, fontsize=8, parse_math=False)
    fig.tight_layout()
    return _png(fig)


def best_methods(summary: dict, metrics: Sequence[str], group=None) -> dict[str, set[str]]:
    """Per metric, every method at the best mean (by the metric's direction; methods without a value left out):
    ties are all best, in the Markdown summary (bold) and the HTML report (highlighted) alike. ``group``: a
    function of a row's key naming its block (e.g. a suite's setting); the best is then found within each."""
    best: dict[str, set[str]] = {}
    blocks: dict[str, list[str]] = {}
    for k in summary:
        blocks.setdefault(group(k) if group else "", []).append(k)
    for m in metrics:
        for keys in blocks.values():
            vals = {k: summary[k][m]["mean"] for k in keys if summary[k][m]["n"] > 0}
            if vals:
                top = (max if DIRECTIONS.get(m, "higher") == "higher" else min)(vals.values())
                best.setdefault(m, set()).update(k for k, v in vals.items() if v == top)
    return best


def html_table(summary: dict, metrics: Sequence[str], group=None) -> str:
    arrows = {"higher": "↑", "lower": "↓"}
    head = "".join(f"<th>{html.escape(m)} {arrows.get(DIRECTIONS.get(m, ''), '')}</th>" for m in metrics)
    best = best_methods(summary, metrics, group)
    rows = []
    for method, s in summary.items():
        cells = []
        for m in metrics:
            v = s[m]
            if v["n"] == 0:
                text = "n/a"
            else:
                ci = "" if math.isnan(v["ci_low"]) else f"<br><small>[{v['ci_low']:.3f}, {v['ci_high']:.3f}]</small>"
                text = f"{v['mean']:.3f}{ci}"
            style = ' class="best"' if method in best.get(m, ()) else ""
            cells.append(f"<td{style}>{text}</td>")
        rows.append(f"<tr><th>{html.escape(method)}</th>{''.join(cells)}<td>{s['ms']:.1f}</td></tr>")
    return (f"<table><thead><tr><th>method</th>{head}<th>ms / image</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def write_report(out: Path, summary: dict, metrics: Sequence[str], *, title: str, facts: dict[str, str],
                 gallery: list[tuple[str, str]] | None = None, markdown: str = "", notes: Sequence[str] = (),
                 prototypes: str | None = None, group=None, intro: str | None = None) -> Path:
    """Write ``report.html`` (self-contained) and ``report.md``; ``gallery`` is [(label, figure data URI)];
    ``prototypes``: a prototype model's figure (data URI) of the gallery's images and their nearest prototypes."""
    out = Path(out)
    facts_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    parts = [f"<h1>{html.escape(title)}</h1>", f"<table class='facts'>{facts_html}</table>",
             "<h2>Summary</h2><p>" + html.escape(intro or (
                 "Mean over items with a 95 % confidence interval (Wilson for the hit-or-miss pointing game, "
                 "Student t for every other metric, clipped to the metric's range where it has one); best per "
                 "metric highlighted (ties all). Items without ground truth (no mask, or an empty one) are excluded "
                 "from localisation means (their number is in the facts above); maps a metric is undefined for (a "
                 "constant map) are left out and counted in the notes under the table.")) + "</p>",
             html_table(summary, metrics, group)]
    # the Markdown summary's notes under its table (undefined maps, tied maxima, ...), then the caller's
    md_notes = [ln.strip() for ln in markdown.splitlines()
                if ln.strip() and not ln.lstrip().startswith(("|", "#")) and not ln.startswith("Report:")]
    if "random" in summary:
        md_notes.append("random: one fixed, seeded noise field for every image, so its interval reflects the "
                        "images, not the draw of the field.")
    parts += [f"<p>{html.escape(n)}</p>" for n in dict.fromkeys([*md_notes, *notes])]
    parts += ["<h2>Metrics</h2>", f"<img alt='metrics' src='{metric_plots(summary, metrics)}'>",
              "<h2>Time per method</h2>", f"<img alt='time' src='{time_plot(summary)}'>"]
    if gallery:
        parts.append("<h2>Gallery</h2><p>Cyan: ground-truth outline. Each map as its method gives it after its "
                     "post-processing, on its own colour scale: maps in [0, 1] (min-max per map by default) in "
                     "inferno, signed maps in [-1, 1] in coolwarm (blue negative, red positive).</p>")
        for label in dict.fromkeys(lbl for lbl, _ in gallery):
            parts.append(f"<h3>{html.escape(label)}</h3>")
            parts += [f"<img alt='{html.escape(label)}' src='{uri}'><br>" for lbl, uri in gallery if lbl == label]
    if prototypes:
        parts += ["<h2>Nearest prototypes</h2><p>This model explains itself by prototypes: each gallery image "
                  "(first column, with the predicted class) and the 3 prototypes most similar to it, decoded, "
                  "with their class, index and similarity s.</p>", f"<img alt='prototypes' src='{prototypes}'>"]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:13px}"
             "th{background:#f4f4f4}td.best{font-weight:bold;background:#e8f4e8}img{max-width:100%}"
             "table.facts td,table.facts th{text-align:left}")
    write_html(out / "report.html", title, parts, style)
    facts_md = "\n".join(f"- {k}: {v}" for k, v in facts.items())
    with atomic_open(out / "report.md", "w", encoding="utf-8") as fh:
        fh.write(f"# {title}\n\n{facts_md}\n\n{markdown}\n" + "".join(f"\n{n}\n" for n in notes))
    return out / "report.html"
