"""``nemt clusters``: fit activation clusters (NAVE / NAS) on a model's training split, map a split, report.

:func:`run_clusters` fits an :class:`~nemt.clustering.ActivationClustering` on the model's ``fit_split``
(composite activations of the chosen stages, k-means or the clustering module), saves it
(``clustering.safetensors`` + ``clustering.json``), assigns every image of ``split`` and writes

- ``maps.safetensors``: ``labels`` (N, *spatial) int16 cluster ids and ``uncertainty`` (N, *spatial) float32
  (entropy of the soft assignment, nats, 0 to log K), at the model's input size, with ``index`` (N,) the
  manifest rows; ``maps.json`` names the images and their labels;
- ``proportions.csv``: per class, the mean share of the image each cluster covers;
- ``localisation.json`` (data with masks): per finding, the IoU of the clusters with the finding's mask
  (:func:`cluster_localisation`): the best fixed cluster, the best cluster per image, and the best segment
  per image of per-image NAS (k-means on each image's activations) and of SLIC, at k segments;
- ``report.html``: the cluster gallery (for each cluster, the images where it covers most area, the cluster
  tinted over the image), example label and uncertainty maps, per-class proportions, the localisation table.

Every file is written atomically. The logic is here; the CLI command only parses and calls.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from nemt.errors import NemtError
from nemt.files import atomic_open, atomic_path, write_html, write_json
from nemt.visualize import subplots


# ---------------------------------------------------------------------------- statistics of label maps

def _check_ids(flat: torch.Tensor, k: int | None, name: str) -> None:
    """A NemtError naming ``name`` when its ids (N, P) are negative or, with ``k``, not below k."""
    bad = (flat < 0) | (flat >= int(k)) if k is not None else flat < 0
    if bool(bad.any()):
        rule = f"0..{int(k) - 1} (k = {int(k)})" if k is not None else "non-negative"
        raise NemtError(f"{name} hold id {int(flat[bad][0])}: ids must be {rule}")


def area_fractions(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N, *spatial) cluster ids in 0..k-1 -> (N, k): the share of each image each cluster covers (rows sum to 1)."""
    n = labels.shape[0]
    flat = labels.reshape(n, -1).long()
    _check_ids(flat, k, "labels")
    counts = torch.zeros(n, k, dtype=torch.float64).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    return counts / flat.shape[1]


def segment_ious(segments: torch.Tensor, gt: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """IoU of every segment with the mask, per image: segments (N, *spatial) non-negative ids, gt (N, *spatial)
    bool -> (N, S) with S = ``k`` (ids 0..k-1; an absent id has IoU 0) or the largest id + 1; rows of NaN where
    the mask is empty."""
    if tuple(segments.shape) != tuple(gt.shape):
        raise NemtError(f"segments {tuple(segments.shape)} and gt {tuple(gt.shape)} must have the same shape "
                        "(N, *spatial)")
    n = segments.shape[0]
    seg = segments.reshape(n, -1).long()
    m = gt.reshape(n, -1).bool()
    _check_ids(seg, k, "segments")
    s = int(k) if k is not None else int(seg.max()) + 1
    ones = torch.ones_like(seg, dtype=torch.float64)
    area = torch.zeros(n, s, dtype=torch.float64).scatter_add_(1, seg, ones)
    inter = torch.zeros(n, s, dtype=torch.float64).scatter_add_(1, seg, m.double())
    gt_area = m.sum(1, dtype=torch.float64)[:, None]
    union = area + gt_area - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    return torch.where(gt_area > 0, iou, torch.full_like(iou, float("nan")))


def class_members(y: torch.Tensor, task: str, n_labels: int) -> torch.Tensor:
    """(N, L) bool: image i belongs to label j (multi-class: its class; multi-label: each present label;
    regression: one group, L = 1)."""
    if task == "multiclass":
        return torch.nn.functional.one_hot(y.long().reshape(-1), n_labels).bool()
    if task == "multilabel":
        return y.reshape(y.shape[0], -1) > 0.5
    return torch.ones(y.shape[0], 1, dtype=torch.bool)


def cluster_localisation(labels: torch.Tensor, gt: torch.Tensor, members: torch.Tensor, names: Sequence[str],
                         k: int, baselines: dict[str, Callable] | None = None, x: torch.Tensor | None = None,
                         match: str | None = None) -> dict:
    """How well clusters cover each finding's mask, per label with masks.

    ``labels`` (N, *spatial) cluster ids, ``gt`` (N, *spatial) bool, ``members`` (N, L) bool. For label j and
    its images with a non-empty mask: ``fixed`` = the mean IoU of the single cluster with the best mean IoU
    (``best_cluster``; chosen on these images), ``per_image`` = the mean over images of the best cluster's
    IoU in that image, ``clusters_per_image`` the mean number of cluster ids present. Each of ``baselines``
    ({name: segmenter called as ``segmenter(x, k)`` -> (n, *spatial) ids}, e.g. per-image NAS and SLIC at k
    segments) with the model inputs ``x`` adds ``name`` (the mean over images of its best segment's IoU) and
    ``name_segments_per_image``. ``match``: the baseline run first whose per-image segment counts every other
    baseline is asked for (``segmenter(x, counts)``), so that they are compared at equal segment count (SLIC
    may return more segments than asked).
    """
    iou = segment_ious(labels, gt, k)  # (N, K)
    has = ~torch.isnan(iou[:, 0])
    n_ids = torch.tensor([int(torch.unique(labels[i]).numel()) for i in range(labels.shape[0])])
    extra: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if baselines and x is not None and bool(has.any()):
        idx = has.nonzero().flatten()
        if match is not None and match not in baselines:
            raise NemtError(f"match={match!r} is not one of the baselines {sorted(baselines)}")
        order = ([match] if match else []) + [n for n in baselines if n != match]
        counts = None
        for name in order:
            segmenter = baselines[name]
            segs = segmenter(x[idx], int(k) if counts is None else counts).cpu()
            best = torch.full((labels.shape[0],), float("nan"), dtype=torch.float64)
            best[idx] = segment_ious(segs - segs.reshape(len(idx), -1).amin(1).view(-1, *[1] * (segs.ndim - 1)),
                                     gt[idx]).nan_to_num(-1).amax(1)
            count = torch.full((labels.shape[0],), float("nan"), dtype=torch.float64)
            count[idx] = torch.tensor([float(torch.unique(s).numel()) for s in segs], dtype=torch.float64)
            if name == match:
                # a segmenter needs 2 segments at least: an image SLIC leaves whole asks the others for 2
                counts = [max(2, int(c)) for c in count[idx].tolist()]
            extra[name] = (best, count)
    out = {}
    for j, name in enumerate(names):
        sel = members[:, j] & has
        if not bool(sel.any()):
            continue
        mean_iou = iou[sel].mean(0)
        best = int(torch.argmax(mean_iou))
        row = {"n": int(sel.sum()), "best_cluster": best, "fixed": float(mean_iou[best]),
               "per_image": float(iou[sel].amax(1).mean()), "clusters_per_image": float(n_ids[sel].double().mean()),
               "mean_iou_per_cluster": [float(v) for v in mean_iou]}
        for b, (v, c) in extra.items():
            row[b] = float(v[sel].mean())
            row[f"{b}_segments_per_image"] = float(c[sel].mean())
        out[name] = row
    return out


# ---------------------------------------------------------------------------- drawing

def _colours(k: int) -> np.ndarray:
    from matplotlib import colormaps
    cmap = colormaps["tab20" if k <= 20 else "hsv"]
    return np.array([cmap(i / (20 if k <= 20 else k))[:3] for i in range(k)])


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _plane(a: np.ndarray) -> np.ndarray:
    """(*spatial) -> a 2D view: the array itself (2D) or its middle slice along the first axis (3D)."""
    return a if a.ndim <= 2 else a[a.shape[0] // 2]


def _show_image(ax, unit: np.ndarray) -> None:
    """``unit`` (C, *spatial) in [0, 1]."""
    if unit.ndim == 2:  # 1D signal (C, L): the first channel as a curve
        ax.plot(unit[0], color="black", linewidth=0.8)
        return
    img = np.stack([_plane(c) for c in unit])
    ax.imshow(img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1), cmap="gray", vmin=0, vmax=1)


def _show_region(ax, region: np.ndarray, colour, gt: np.ndarray | None = None) -> None:
    if region.ndim == 1:
        for i in np.flatnonzero(region):
            ax.axvspan(i - 0.5, i + 0.5, color=colour, alpha=0.35, linewidth=0)
        return
    r = _plane(region)
    rgba = np.zeros((*r.shape, 4))
    rgba[..., :3] = colour
    rgba[..., 3] = 0.45 * r
    ax.imshow(rgba)
    if r.any() and 0 < r.mean() < 1:
        ax.contour(r.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)
    if gt is not None and _plane(gt).any():
        ax.contour(_plane(gt).astype(float), levels=[0.5], colors="cyan", linewidths=0.8)


def cluster_gallery(unit: np.ndarray, labels: np.ndarray, gt: np.ndarray, fractions: np.ndarray,
                    captions: Sequence[str], k: int, per_cluster: int) -> list[tuple[int, bytes]]:
    """One PNG per cluster: the ``per_cluster`` images where it covers most area, the cluster tinted (its colour,
    outlined) over each and the ground truth outlined in cyan."""
    colours = _colours(k)
    out = []
    for c in range(k):
        order = [int(i) for i in np.argsort(-fractions[:, c], kind="stable")[:per_cluster] if fractions[i, c] > 0]
        if not order:
            continue
        fig, axes = subplots(1, len(order), figsize=(1.9 * len(order), 2.2), squeeze=False)
        for ax, i in zip(axes[0], order):
            _show_image(ax, unit[i])
            _show_region(ax, labels[i] == c, colours[c], gt[i])
            ax.set_title(f"{captions[i]}\n{100 * fractions[i, c]:.0f} % of image", fontsize=7)
            ax.axis("off")
        out.append((c, _png(fig)))
    return out


def example_maps(unit: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray, gt: np.ndarray,
                 picks: Sequence[int], captions: Sequence[str], k: int) -> bytes:
    """Rows: image (ground truth in cyan), label map (cluster colours), uncertainty (entropy, 0 to log K)."""
    colours = _colours(k)
    fig, axes = subplots(len(picks), 3, figsize=(6.6, 2.2 * len(picks)), squeeze=False)
    for row, i in zip(axes, picks):
        _show_image(row[0], unit[i])
        if _plane(gt[i]).any() and gt[i].ndim >= 2:
            row[0].contour(_plane(gt[i]).astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        row[0].set_title(captions[i], fontsize=7)
        if labels[i].ndim == 1:
            row[1].imshow(colours[labels[i]][None], aspect="auto")
            row[2].plot(uncertainty[i])
            row[2].set_ylim(0, math.log(k))
        else:
            row[1].imshow(colours[_plane(labels[i])])
            row[2].imshow(_plane(uncertainty[i]), cmap="viridis", vmin=0, vmax=math.log(k))
        row[1].set_title("clusters", fontsize=7)
        row[2].set_title(f"uncertainty (0 to log {k})", fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def proportions_figure(props: np.ndarray, names: Sequence[str], counts: Sequence[int]) -> bytes:
    k = props.shape[1]
    fig, ax = subplots(figsize=(0.55 * k + 2, 0.45 * len(names) + 1.2))
    ax.imshow(props, cmap="Blues", vmin=0, vmax=max(float(props.max()), 1e-9), aspect="auto")
    for (i, j), v in np.ndenumerate(props):
        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                color="white" if v > 0.6 * props.max() else "black")
    ax.set_xticks(range(k), [str(c) for c in range(k)], fontsize=8)
    ax.set_yticks(range(len(names)), [f"{n} ({c})" for n, c in zip(names, counts)], fontsize=8)
    ax.set_xlabel("cluster")
    ax.set_title("mean share of the image per cluster (%), by class", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def write_clusters_report(out: Path, *, title: str, facts: dict[str, str], gallery: list[tuple[int, bytes]],
                          examples: bytes | None, props: np.ndarray, names: Sequence[str], counts: Sequence[int],
                          localisation: dict, k: int) -> Path:
    """``out/report.html``, self-contained (figures inlined), written atomically."""
    colours = (_colours(k) * 255).astype(int)
    facts_html = "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(str(b))}</td></tr>" for a, b in facts.items())
    parts = [f"<h1>{html.escape(title)}</h1>", f"<table class='facts'>{facts_html}</table>"]
    if localisation:
        base = [b for b in ("nas", "slic") if any(b in r for r in localisation.values())]
        label = {"nas": "NAS per image", "slic": "SLIC"}
        head = ("<tr><th>finding</th><th>images</th><th>best cluster</th><th>its mean IoU</th>"
                "<th>best cluster per image, mean IoU</th><th>clusters per image</th>"
                + "".join(f"<th>{label[b]}: best segment per image, mean IoU</th><th>{label[b]} segments per "
                          "image</th>" for b in base) + "</tr>")
        rows = []
        for name, r in localisation.items():
            cells = [html.escape(name), str(r["n"]), str(r["best_cluster"]), f"{r['fixed']:.3f}",
                     f"{r['per_image']:.3f}", f"{r['clusters_per_image']:.1f}"]
            for b in base:
                cells += [f"{r.get(b, float('nan')):.3f}", f"{r.get(b + '_segments_per_image', float('nan')):.1f}"]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts += ["<h2>Clusters against the ground truth</h2>",
                  "<p>IoU of a segment with the finding's mask, on the images of that finding with a mask. Best "
                  "cluster: the one data-set cluster with the highest mean IoU over those images (chosen on them); "
                  "per image: the best cluster of each image. SLIC (scikit-image): at least k segments per image; "
                  "NAS per image: k-means on each image's own composite activations (fitted on twice the finest "
                  "stage's grid, every input pixel given its nearest centroid) with as many clusters as SLIC "
                  "gave that image, so both have equal segment counts; both scored by their best segment per "
                  "image.</p>",
                  f"<table>{head}{''.join(rows)}</table>"]
    parts += ["<h2>Clusters per class</h2>", f"<img alt='proportions' src='{_uri(proportions_figure(props, names, counts))}'>"]
    head = "".join(f"<th><span style='color:rgb{tuple(colours[c])}'>&#9632;</span> {c}</th>" for c in range(k))
    body = "".join(f"<tr><th>{html.escape(n)} ({c})</th>" + "".join(f"<td>{100 * v:.1f}</td>" for v in p) + "</tr>"
                   for n, c, p in zip(names, counts, props))
    parts.append(f"<table><tr><th>class (images)</th>{head}</tr>{body}</table>")
    if examples is not None:
        parts += ["<h2>Label and uncertainty maps</h2>", f"<img alt='examples' src='{_uri(examples)}'>"]
    parts += ["<h2>Cluster gallery</h2><p>For each cluster, the images where it covers most area; the cluster "
              "tinted and outlined in its colour, the ground truth outlined in cyan.</p>"]
    for c, png in gallery:
        parts.append(f"<h3><span style='color:rgb{tuple(colours[c])}'>&#9632;</span> cluster {c}</h3>"
                     f"<img alt='cluster {c}' src='{_uri(png)}'>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;font-size:12px}th{background:#f4f4f4}"
             "img{max-width:100%}table.facts td,table.facts th{text-align:left}h3{margin:0.8em 0 0.2em}")
    return write_html(out / "report.html", title, parts, style)


# ---------------------------------------------------------------------------- the command

def run_clusters(model_dir: str | Path, data_path: str | Path, out: str | Path, *, layers: Sequence[str] | None = None,
                 k: int = 12, method: str = "kmeans", seed: int = 0, fit_split: str = "train", split: str = "test",
                 max_samples: int = 20_000, epochs: int = 20, batch_size: int = 32, limit: int | None = None,
                 per_cluster: int = 6, slic_compactness: float = 0.1, device: str = "cpu", progress: bool = True,
                 log: Callable[[str], None] | None = None) -> dict:
    """``nemt clusters``: fit on ``fit_split`` of the model's data, map ``split`` (``limit`` images at most),
    write the files listed in the module docstring into ``out``; returns the summary written to
    ``summary.json`` (files, fit facts, per-class proportions, localisation)."""
    from safetensors.torch import save_file

    from nemt.clustering import ActivationClustering, NasSegments, SlicSegments
    from nemt.data import ImageDataset
    from nemt.data.manifest import open_dataset
    from nemt.models import load_model
    from nemt.models.training import load_splits
    from nemt.progress import progress_bar

    out = Path(out)
    # the run's last file marks a finished run: an earlier run's must not vouch for this one's files if it stops
    (out / "summary.json").unlink(missing_ok=True)
    clf = load_model(model_dir, device=device)
    kw = {"labels": list(clf.label_names)} if clf.task == "multiclass" else {}
    manifest = open_dataset(data_path, task=clf.task, **kw)
    manifest.raise_problems()
    splits = load_splits(model_dir, manifest)
    splits["all"] = np.arange(len(manifest.samples))
    for opt, name in (("--fit-split", fit_split), ("--split", split)):
        if name not in splits:
            raise NemtError(f"{opt} must be one of {sorted(splits)}, got {name!r}")
    fit_ds = ImageDataset(manifest, clf.preprocessing, splits[fit_split])
    idx = [int(i) for i in splits[split]][:limit] if limit else [int(i) for i in splits[split]]
    if not idx:
        raise NemtError(f"the {split} split is empty")
    ev = ImageDataset(manifest, clf.preprocessing, idx)
    est = ActivationClustering(clf, layers=layers, k=k, method=method, seed=seed, max_samples=max_samples,
                               epochs=epochs, batch_size=batch_size)
    with progress_bar(progress) as bar:
        t_fit = bar.add_task("activations (fit)", total=len(fit_ds), info=fit_split)
        est.fit(fit_ds, progress=lambda n: bar.advance(t_fit, n))
        est.save(out)
        t_map = bar.add_task("label maps", total=len(ev), info=split)
        labels, unc, units, gts, ys = [], [], [], [], []
        for i in range(0, len(ev), batch_size):
            items = [ev[j] for j in range(i, min(i + batch_size, len(ev)))]
            x = torch.stack([it["image"] for it in items])
            lab, u, _ = est.assign(x)
            labels.append(lab.cpu().to(torch.int16))
            unc.append(u.cpu().float())
            units.append(torch.stack([ev.unit_item(j)[0] for j in range(i, i + len(items))]).clamp(0, 1))
            gts.append(torch.stack([it["gt"][0] for it in items]).bool())
            ys.append(torch.stack([it["y"] for it in items]))
            bar.advance(t_map, len(items))
    labels_t, unc_t, unit_t, gt_t, y_t = (torch.cat(v) for v in (labels, unc, units, gts, ys))
    names = [manifest.samples[i].name for i in idx]
    with atomic_path(out / "maps.safetensors") as tmp:
        save_file({"labels": labels_t.contiguous(), "uncertainty": unc_t.contiguous(),
                   "index": torch.tensor(idx, dtype=torch.int64)}, str(tmp))
    label_names = list(clf.label_names) if clf.task != "regression" else ["all"]
    members = class_members(y_t, clf.task, len(label_names))
    if clf.task == "multiclass":
        image_labels = [label_names[int(v)] for v in y_t]
    else:
        image_labels = [", ".join(n for n, m in zip(label_names, row) if m) or "none" for row in members.tolist()]
    write_json(out / "maps.json", {"split": split, "images": names, "labels": image_labels, "k": int(k),
                                   "files": {"maps.safetensors": "labels (N, *spatial) int16, uncertainty (N, "
                                             "*spatial) float32 entropy in nats, index (N,) manifest rows"}})
    frac = area_fractions(labels_t, k)
    counts = members.sum(0).tolist()
    props = torch.stack([frac[members[:, j]].mean(0) if counts[j] else torch.zeros(k, dtype=torch.float64)
                         for j in range(len(label_names))]).numpy()
    with atomic_open(out / "proportions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["class", "images"] + [f"cluster_{c}" for c in range(k)])
        for n, c, p in zip(label_names, counts, props):
            w.writerow([n, c] + [f"{v:.6f}" for v in p])
    localisation = {}
    if bool(gt_t.flatten(1).any(1).any()):
        x_eval = clf.preprocessing.normalise(unit_t)
        baselines = {"nas": NasSegments(clf, k, est.layers_, seed=seed),
                     "slic": SlicSegments(k, compactness=slic_compactness, at_least=True)}
        localisation = cluster_localisation(labels_t, gt_t, members, label_names, k, baselines=baselines, x=x_eval,
                                            match="slic")
        write_json(out / "localisation.json", localisation)
    else:  # no ground truth in this split: an earlier run's scores must not stay beside this run's maps
        (out / "localisation.json").unlink(missing_ok=True)
    captions = [f"{n[:18]} ({lab})" for n, lab in zip(names, image_labels)]
    gallery = cluster_gallery(unit_t.numpy(), labels_t.numpy(), gt_t.numpy(), frac.numpy(), captions, k, per_cluster)
    first = {}
    for i, lab in enumerate(image_labels):
        first.setdefault(lab, i)
    picks = list(first.values())[:6]
    examples = example_maps(unit_t.numpy(), labels_t.long().numpy(), unc_t.numpy(), gt_t.numpy(), picks, captions, k)
    facts = {"model": f"{model_dir} ({clf.card.arch}, {clf.task})", "data": str(data_path),
             "fitted on": f"{fit_split} split, {len(fit_ds)} images, {est.n_pixels_} pixels, {min(est.n_pixels_, max_samples)} "
                          f"clustered (seeded draw)",
             "mapped": f"{split} split, {len(idx)} images", "layers": ", ".join(est.layers_),
             "grid": "x".join(map(str, est.grid_)), "method": f"{method}, k = {k}, seed {seed}"}
    report = write_clusters_report(out, title="nemt clusters", facts=facts, gallery=gallery, examples=examples,
                                   props=props, names=label_names, counts=counts, localisation=localisation, k=k)
    summary = {"clustering": str(out / "clustering.json"), "maps": str(out / "maps.safetensors"),
               "report": str(report), "layers": est.layers_, "grid": list(est.grid_), "k": int(k), "method": method,
               "fit_split": fit_split, "fit_images": len(fit_ds), "pixels_seen": int(est.n_pixels_),
               "split": split, "images": len(idx),
               "proportions": {n: [float(v) for v in p] for n, p in zip(label_names, props)},
               "localisation": localisation}
    write_json(out / "summary.json", summary)
    if log is not None:
        log(f"wrote {report}")
    return summary
