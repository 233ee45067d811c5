"""The concept report: per-neuron contact sheets and one self-contained HTML page in the benchmark report's style."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from nemt.concepts.annotate import ConceptAnnotation
from nemt.files import write_html
from nemt.visualize import subplots

__all__ = ["contact_sheet", "write_concept_report"]

_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px}"
          "th{background:#f4f4f4}img{max-width:100%}td.dead{color:#999}small{color:#555}")


def contact_sheet(images: np.ndarray, maps: np.ndarray | None, title: str, captions: Sequence[str] = ()) -> bytes:
    """PNG bytes: one row of ``images`` (m, C, H, W) in [0, 1], each with its map (m, H, W) in [0, 1] over it."""
    m = len(images)
    fig, axes = subplots(1, max(m, 1), figsize=(1.6 * max(m, 1), 1.95), squeeze=False)
    for j, ax in enumerate(axes[0]):
        ax.axis("off")
        if j >= m:
            continue
        img = images[j]
        img = img[:, img.shape[1] // 2] if img.ndim == 4 else img  # a volume: its middle slice
        ax.imshow(img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1), cmap="gray", vmin=0, vmax=1)
        if maps is not None:
            mp = maps[j][maps[j].shape[0] // 2] if maps[j].ndim == 3 else maps[j]
            ax.imshow(mp, cmap="inferno", alpha=0.45, vmin=0, vmax=1)
        if j < len(captions):
            ax.set_title(captions[j], fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def write_concept_report(out: str | Path, ann: ConceptAnnotation, *, title: str, facts: dict[str, str],
                         sheets: dict[int, bytes] | None = None, notes: Sequence[str] = ()) -> Path:
    """Write ``report.html`` (figures inlined): facts, the concept summary (with the concepts left out because
    the VLM cannot represent them, and why), then one row per neuron."""
    out = Path(out)
    sheets = sheets or {}
    left_out = ann.left_out(limit=len(ann.params.get("unrepresented") or []))  # every one: the page has room
    notes = [*notes, *([f"Left out: {left_out}."] if left_out else [])]
    esc = html.escape
    facts_html = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in facts.items())
    summary = ann.summary()
    n_lab = sum(1 for lab in ann.labels if lab)
    sum_rows = "".join(f"<tr><td>{esc(c)}</td><td>{len(ns)}</td><td><small>{esc(', '.join(ns[:40]))}"
                       f"{' …' if len(ns) > 40 else ''}</small></td></tr>" for c, ns in summary.items())
    parts = [f"<h1>{esc(title)}</h1>", f"<table>{facts_html}</table>",
             f"<h2>Summary</h2><p>{n_lab} of {len(ann.neurons)} neurons labelled; per concept, the neurons whose "
             f"first concept it is.</p>",
             f"<table><thead><tr><th>concept</th><th>neurons</th><th>which</th></tr></thead><tbody>{sum_rows}"
             "</tbody></table>"]
    parts += [f"<p>{esc(n)}</p>" for n in notes]
    score = "soft-WPMI" if ann.method == "clip-dissect" else "w_k(c)"
    drawn = (f" Drawn for {len(sheets)} of {len(ann.neurons)} neurons, labelled ones first by score (`--sheets` "
             "sets how many)." if len(sheets) < len(ann.neurons) else "")
    parts.append(f"<h2>Neurons</h2><p>Concepts best first with their {score}; the top-activating probe images "
                 f"with the neuron's map over each (its channel's activation, or Grad-CAM for output units).{drawn}</p>")
    rows = []
    for r in ann.rows():
        k = r["index"]
        conc = "; ".join(f"{esc(c)} ({s:.3g})" for c, s in r["concepts"]) or \
            f"<i>none</i> <small>(best: {esc(str(r['best']))} {r['best_score']:.3g})</small>"
        img = (f"<img alt='neuron {k}' src='data:image/png;base64,{base64.b64encode(sheets[k]).decode('ascii')}'>"
               if k in sheets else "<small>not drawn</small>")
        cls = " class='dead'" if r["status"] != "ok" else ""
        rows.append(f"<tr><th>{esc(r['neuron'])}</th><td{cls}>{esc(r['status'])}</td><td>{r['n_images']}</td>"
                    f"<td>{conc}</td><td>{img}</td></tr>")
    parts.append("<table><thead><tr><th>neuron</th><th>status</th><th>images</th><th>concepts</th>"
                 f"<th>top images</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return write_html(out / "report.html", title, parts, _STYLE)
