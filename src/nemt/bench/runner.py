"""The benchmark runner: explain every image with every method, score every map, time every method, resume.

An *item* is one (image, target) pair. Multi-class models explain each image
for its true class; multi-label models for each label present in the image;
regression models their single output. Items are processed in chunks of
``batch_size`` for one method at a time; after each chunk its rows are
appended to ``results.partial.csv`` (flushed and fsynced), so an interrupted
run resumes where it stopped and never recomputes a finished chunk. When all
chunks are done the per-item results are written atomically to
``results.csv`` with the summary (``summary.csv``, ``summary.md``).

Milliseconds per image are wall-clock time of ``explain`` on the chunk
divided by its size (metrics not included), on the device given.

Metrics are those of :mod:`nemt.metrics`' registry whose inputs the runner
has (:data:`RUNNER_INPUTS`): each is called through its registered
description, so a new metric needs no change here.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nemt.errors import NemtError
from nemt.files import atomic_open, write_json
from nemt.ops import seeded
from nemt.metrics import DIRECTIONS, available_metrics, get_metric, parallel_chunks, registry, summarise
from nemt.progress import console, progress_bar

#: the inputs (names of :data:`nemt.metrics.INPUTS`) the runner gives metrics: maps (B, 1, *spatial), ground-truth
#: masks, the metric model, its inputs and the targets; every registered metric that needs no others can run
RUNNER_INPUTS = ("maps", "gt", "model", "x", "target")
DEFAULT_METRICS = ("relevance_mass", "relevance_rank", "pointing_game", "energy_pointing_game", "complexity",
                   "sparseness", "faithfulness_estimate")
RESULT_FIELDS = ("method", "item", "sample", "image", "target", "label", "has_gt", "ms")


@dataclass
class Item:
    """One map to make: image ``sample`` (row of the manifest) explained for output ``target``."""

    item: int
    sample: int
    image: str
    target: int
    label: str
    has_gt: bool


@dataclass
class BenchmarkData:
    """Inputs of a run: normalised images, ground-truth masks and the items, in memory."""

    x: torch.Tensor  # (N, C, *spatial), model-normalised
    unit: torch.Tensor  # (N, C, *spatial) in [0, 1], for the gallery
    gt: torch.Tensor  # (N, 1, *spatial) bool
    items: list[Item]
    label_names: list[str]
    fingerprint: str = ""


@dataclass
class RunConfig:
    methods: list[str]
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    batch_size: int = 16
    seed: int = 0
    metric_params: dict[str, dict] = field(default_factory=dict)
    method_params: dict[str, dict] = field(default_factory=dict)


def make_items(y: torch.Tensor, task: str, label_names: Sequence[str], images: Sequence[str],
               has_gt: Sequence[bool], samples: Sequence[int] | None = None) -> list[Item]:
    """Items for each image: true class (multi-class), each present label (multi-label), the output (regression)."""
    samples = list(samples) if samples is not None else list(range(len(images)))
    items: list[Item] = []
    for i, s in enumerate(samples):
        if task == "multiclass":
            targets = [int(y[i])]
        elif task == "multilabel":
            targets = [j for j in range(len(label_names)) if float(y[i][j]) > 0.5]
        else:
            targets = [0]
        for t in targets:
            items.append(Item(len(items), i, str(images[i]), t, label_names[t], bool(has_gt[i])))
    return items


def runnable_metrics() -> list[str]:
    """Sorted names of the registered metrics the runner can compute (those needing only :data:`RUNNER_INPUTS`)."""
    return available_metrics(RUNNER_INPUTS)


def check_metrics(metrics: Sequence[str]) -> list[str]:
    known = set(runnable_metrics())
    bad = [m for m in metrics if m not in known]
    if bad:
        reg = registry()
        other = {m: [k for k in reg[m].inputs if k not in RUNNER_INPUTS] for m in bad if m in reg}
        why = "".join(f"; {m} needs {', '.join(ks)}, which the benchmark does not have" for m, ks in other.items())
        raise NemtError(f"unknown metric(s) {bad}; available: {sorted(known)}{why}")
    return list(metrics)


def score_maps(metrics: Sequence[str], maps: torch.Tensor, gt: torch.Tensor, model, x: torch.Tensor,
               target: torch.Tensor, params: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """{metric: (B,) values} for maps (B, 1, *spatial) of per-sample targets.

    Each metric is called as registered (:meth:`nemt.metrics.MetricSpec.call`)
    with its inputs among maps, ``gt``, ``model``, ``x`` and ``target``, and
    its ``params[name]`` as keywords.
    """
    params = params or {}
    values = {"maps": maps, "gt": gt, "model": model, "x": x, "target": target}
    out: dict[str, torch.Tensor] = {}
    for name in metrics:
        v = get_metric(name).call(values, **params.get(name, {}))
        out[name] = v.reshape(-1).detach().cpu().double()
    return out


class ResultsLog:
    """Append-only per-item results (``results.partial.csv``), read back strictly to resume.

    Every row is checked on read: the field count, integers where integers
    belong, ``True``/``False``, and numbers written as :func:`_fmt` writes them
    (a number cut mid-way in a middle row cannot pass for a whole one, since
    only the last row can be cut). A last row without its line end is a write
    cut short by an interruption: it is dropped (the file is rewritten without
    it, atomically) and its chunk recomputed, with a message. Any other bad row
    is an error naming the file, line, field and reason. Rows of one (method,
    item) written twice (a chunk recomputed after a cut) count once, the last.
    """

    def __init__(self, path: Path, metrics: Sequence[str], log: Callable[[str], None] | None = None):
        self.path, self.fields = path, list(RESULT_FIELDS) + list(metrics)
        self.metrics = list(metrics)
        self.rows: dict[tuple[str, int], dict] = {}
        if path.is_file():
            self._read(log or (lambda s: console.print(s, soft_wrap=True, highlight=False, markup=False)))

    @property
    def done(self) -> set[tuple[str, int]]:
        return set(self.rows)

    def _read(self, log: Callable[[str], None]) -> None:
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # the last row lacks its line end: cut short
            torn = raw[end:].decode("utf-8", "replace")
            shown = torn if len(torn) <= 60 else torn[:57] + "..."
            what = "its header" if end == 0 else "its last row"
            log(f"{self.path}: {what} was cut short by an interruption ({shown!r}); dropped, "
                "its items are computed again")
            if end == 0:
                self.path.unlink()
                return
            with atomic_open(self.path, "wb") as fh:
                fh.write(raw[:end])
            raw = raw[:end]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise NemtError(f"{self.path}: byte {e.start}: not UTF-8 text; the file is damaged: delete it or "
                            "use --restart") from None
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header != self.fields:
            raise NemtError(f"{self.path}: written by a run with other metrics ({header}); "
                            "use another --out or --restart")
        for row in reader:
            r = self._parse(row, reader.line_num)
            self.rows[(r["method"], int(r["item"]))] = r

    def _parse(self, row: list[str], line: int) -> dict:
        where = f"{self.path}: line {line}"
        if len(row) != len(self.fields):
            raise NemtError(f"{where}: {len(row)} fields, expected {len(self.fields)} ({', '.join(self.fields)}); "
                            "the file is damaged: delete it or use --restart")
        r = dict(zip(self.fields, row))
        checks = [("method", bool(r["method"]), "empty"), ("has_gt", r["has_gt"] in ("True", "False"),
                                                              "not True or False")]
        checks += [(k, _INT.fullmatch(r[k]) is not None, "not a non-negative integer")
                   for k in ("item", "sample", "target")]
        checks += [(k, _FLOAT.fullmatch(r[k]) is not None, "not a number") for k in ["ms"] + self.metrics]
        for name, ok, reason in checks:
            if not ok:
                raise NemtError(f"{where}: field {name!r}: {r[name]!r} is {reason}; the file is damaged: "
                                "delete it or use --restart")
        return r

    def append(self, rows: list[dict]) -> None:
        new = not self.path.is_file()
        text = [{k: _fmt(r.get(k)) for k in self.fields} for r in rows]
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerows(text)
            fh.flush()
            os.fsync(fh.fileno())
        for r in text:
            self.rows[(r["method"], int(r["item"]))] = r


#: what :func:`_fmt` writes: Python's repr of a float (or int), nan, inf
_FLOAT = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|-?inf")
_INT = re.compile(r"\d+")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return "" if v is None else str(v)


def run_benchmark(model, data: BenchmarkData, explainers: dict[str, Any], config: RunConfig, out: Path, *,
                  progress: bool = True, metric_model=None, model_sha256: str | None = None,
                  explainer_sha256: dict[str, str] | None = None,
                  log: Callable[[str], None] | None = None, metric_workers: int = 0,
                  shard: tuple[int, int] | None = None) -> dict:
    """Explain and score every item with every method; write results, summary; return the summary dict.

    ``shard=(i, n)``: only every n-th chunk of ``batch_size`` items from the i-th (the same chunks as one
    process makes, so the same maps), logged in ``out/shards/i-of-n/``; no results or summary are written
    (:func:`merge_shards` collects the shards, then a run without ``shard`` writes them). For N independent
    jobs (a SLURM array) or ranks of one launch.

    ``explainers`` maps method names to objects with ``explain(x, target)``.
    ``metric_model`` (default ``model``) runs the faithfulness metrics.
    The results in ``out`` are reused only for the same data, items, metrics,
    seed and parameters, the same model weights (``model_sha256``, by default
    :func:`~nemt.explainers.nemt.model_checksum` of ``model``) and, per
    method, the same fitted explainer (``explainer_sha256``, e.g. from
    :func:`explainer_checksum`); any other run in ``out`` is refused.
    ``metric_workers`` > 1 spreads the per-map metrics' batch slices over that
    many worker threads (:func:`nemt.metrics.parallel_chunks`; torch's thread
    count is 1 process-wide while they run: for a command-line run, not a
    multi-threaded caller); the default 0 leaves them serial in this thread
    (or as an enclosing ``parallel_chunks`` block chose). The results equal
    those of serial slices at one torch thread, bit for bit.
    """
    out = Path(out)
    metrics = check_metrics(config.metrics)
    if model_sha256 is None:
        from nemt.explainers.nemt import model_checksum
        model_sha256 = model_checksum(model)
    fitted = {m: explainer_sha256[m] for m in explainers if explainer_sha256 and m in explainer_sha256}
    params = {m: config.method_params.get(m, {}) for m in explainers}
    meta = {"methods": list(explainers), "metrics": metrics, "batch_size": config.batch_size, "seed": config.seed,
            "items": len(data.items), "data": data.fingerprint, "metric_params": config.metric_params,
            "method_params": params, "model_sha256": model_sha256, "explainer_sha256": fitted}
    home = out
    if shard is not None:
        i, n = int(shard[0]), int(shard[1])
        if not 0 <= i < n:
            raise NemtError(f"--shard {i}/{n}: expected I/N with 0 <= I < N")
        out = out / "shards" / f"{i}-of-{n}"
    meta_path = out / "run.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        recorded = old.get("model_sha256")
        if recorded is None:
            raise NemtError(f"{meta_path}: does not record its model's checksum (written by an earlier nemt), so "
                            "its results may be another model's; use another --out or --restart")
        if recorded != model_sha256:
            raise NemtError(f"{out}: holds a run of another model (weights checksum {recorded[:16]}..., this "
                            f"model {model_sha256[:16]}...); use another --out or --restart")
        diff = [k for k in ("metrics", "items", "data", "seed", "metric_params") if k in old and old[k] != meta[k]]
        diff += [f"parameters of {m}" for m, p in params.items()
                 if m in old.get("method_params", {}) and old["method_params"][m] != p]
        diff += [f"fitted explainer of {m}" for m in explainers
                 if m in old.get("methods", []) and old.get("explainer_sha256", {}).get(m) != fitted.get(m)]
        if diff:
            raise NemtError(f"{out}: holds a run with other {', '.join(diff)}; use another --out or --restart")
        meta["methods"] = list(dict.fromkeys(old.get("methods", []) + meta["methods"]))
        meta["method_params"] = {**old.get("method_params", {}), **params}
        meta["explainer_sha256"] = {**old.get("explainer_sha256", {}), **fitted}
    out.mkdir(parents=True, exist_ok=True)
    log_ = ResultsLog(out / "results.partial.csv", metrics, log)
    for (name, i), r in log_.rows.items():
        if name in explainers and (i >= len(data.items) or r["image"] != data.items[i].image
                                   or int(r["target"]) != data.items[i].target):
            raise NemtError(f"{log_.path}: the row of {name}, item {i} ({r['image']!r}, target {r['target']}) "
                            "is not an item of this run's data; use another --out or --restart")
    write_json(meta_path, meta)
    mm = metric_model or model
    device = data.x.device
    chunks = [data.items[i:i + config.batch_size] for i in range(0, len(data.items), config.batch_size)]
    if shard is not None:
        chunks = chunks[int(shard[0])::int(shard[1])]
    done = log_.done
    todo = [(name, c) for name in explainers for c in chunks
            if any((name, it.item) not in done for it in c)]
    with progress_bar(progress) as bar:
        task = bar.add_task("benchmark", total=len(todo), info="")
        for name, chunk in todo:
            bar.update(task, info=name)
            idx = torch.tensor([it.sample for it in chunk], device=device)
            t = torch.tensor([it.target for it in chunk], device=device)
            x = data.x[idx]
            with seeded(config.seed, device):  # the caller's global RNG is restored after
                t0 = time.perf_counter()
                maps = explainers[name].explain(x, target=t).detach()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t0) / len(chunk)
            with parallel_chunks(metric_workers) if metric_workers > 0 else contextlib.nullcontext():
                scores = score_maps(metrics, maps.float(), data.gt[idx], mm, x, t, config.metric_params)
            rows = []
            for k, it in enumerate(chunk):
                row = {"method": name, **{f: getattr(it, f) for f in ("item", "sample", "image", "target", "label",
                                                                       "has_gt")}, "ms": ms}
                row.update({m: float(v[k]) for m, v in scores.items()})
                rows.append(row)
            log_.append(rows)
            bar.advance(task)
    if shard is not None:
        return {"shard": f"{shard[0]}-of-{shard[1]}", "folder": str(out.relative_to(home)), "rows": len(log_.rows)}
    order = {m: k for k, m in enumerate(explainers)}
    rows = [log_.rows[key] for key in sorted((k for k in log_.rows if k[0] in order),
                                             key=lambda k: (order[k[0]], k[1]))]
    with atomic_open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=log_.fields)
        w.writeheader()
        w.writerows(rows)
    summary = summarise_results(rows, list(explainers), metrics)
    write_summary(out, summary, metrics)
    return summary


def merge_shards(out: Path, metrics: Sequence[str], log: Callable[[str], None] | None = None) -> int:
    """Collect the rows of ``out/shards/*`` (runs with ``shard``) into ``out``'s results log; return how many
    were added. The shards must record the same run (model, explainers, data, items, metrics, seed,
    parameters); a later run without ``shard`` then finds every item done and writes results, summary and
    report. Rows already in ``out`` are kept."""
    out = Path(out)
    folders = sorted(p for p in (out / "shards").glob("*-of-*") if (p / "run.json").is_file())
    if not folders:
        raise NemtError(f"{out}: no shards to merge (out/shards/I-of-N/run.json, written by --shard I/N)")
    metas = [json.loads((f / "run.json").read_text()) for f in folders]
    counts = {f.name.split("-of-")[1] for f in folders}
    if len(counts) != 1:
        raise NemtError(f"{out}/shards: shards of different splits ({sorted(f.name for f in folders)})")
    n = int(counts.pop())
    missing = sorted(set(range(n)) - {int(f.name.split("-of-")[0]) for f in folders})
    if missing:
        raise NemtError(f"{out}/shards: shards {missing} of {n} are missing; run them (--shard I/{n}) first")
    for f, m in zip(folders[1:], metas[1:]):
        if m != metas[0]:
            diff = sorted(k for k in set(m) | set(metas[0]) if m.get(k) != metas[0].get(k))
            raise NemtError(f"{f}: another run than {folders[0].name} (differs in {', '.join(diff)})")
    main = out / "run.json"
    if main.is_file():
        old = json.loads(main.read_text())
        diff = sorted(k for k in ("model_sha256", "data", "items", "metrics", "seed", "metric_params")
                      if old.get(k) != metas[0].get(k))
        if diff:
            raise NemtError(f"{main}: another run than the shards (differs in {', '.join(diff)}); use another "
                            "--out or --restart")
    else:
        write_json(main, metas[0])
    target = ResultsLog(out / "results.partial.csv", metas[0]["metrics"], log)
    added = []
    for f in folders:
        part = ResultsLog(f / "results.partial.csv", metas[0]["metrics"], log)
        added += [r for k, r in sorted(part.rows.items(), key=lambda kv: kv[0][1]) if k not in target.rows]
    if added:
        target.append(added)
    return len(added)


def explainer_checksum(directory: str | Path) -> str:
    """SHA-256 over a fitted explainer folder's ``explainer.safetensors`` and ``explainer.json`` bytes."""
    import hashlib
    directory = Path(directory)
    h = hashlib.sha256()
    for name in ("explainer.safetensors", "explainer.json"):
        path = directory / name
        if not path.is_file():
            raise NemtError(f"{path}: missing; is {directory} an explainer folder written by `nemt fit`?")
        h.update(f"{name}:{path.stat().st_size}:".encode())
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def summarise_results(rows: list[dict], methods: Sequence[str], metrics: Sequence[str]) -> dict:
    """{method: {metric: summarise(...) dict, "ms": mean ms/image, "n_items": n}}."""
    out: dict[str, dict] = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        entry: dict[str, Any] = {"n_items": len(mine)}
        for k in metrics:
            entry[k] = summarise([float(r[k]) for r in mine])
        entry["ms"] = float(sum(float(r["ms"]) for r in mine) / max(len(mine), 1))
        out[m] = entry
    return out


def _cell(s: dict) -> str:
    if s["n"] == 0:
        return "n/a"
    ci = "" if math.isnan(s["ci_low"]) else f" [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
    return f"{s['mean']:.3f}{ci}"


def markdown_summary(summary: dict, metrics: Sequence[str]) -> str:
    """Mean [95 % CI] per method and metric (best in bold), ms/image, and how many items lacked ground truth."""
    arrows = {"higher": "↑", "lower": "↓"}
    head = ["method"] + [f"{m} {arrows.get(DIRECTIONS.get(m, ''), '')}" for m in metrics] + ["ms / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {}
    for m in metrics:
        vals = {k: v[m]["mean"] for k, v in summary.items() if v[m]["n"] > 0}
        if vals:
            pick = max if DIRECTIONS.get(m, "higher") == "higher" else min
            best[m] = pick(vals, key=vals.get)
    for method, s in summary.items():
        cells = [method] + [("**" + _cell(s[m]) + "**") if best.get(m) == method else _cell(s[m]) for m in metrics]
        cells.append(f"{s['ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    reg = registry()
    excluded = {s[m]["n_excluded"] for s in summary.values() for m in metrics if m in reg and reg[m].needs_gt}
    if excluded and max(excluded) > 0:
        lines.append("")
        lines.append(f"Items without ground truth (excluded from the localisation means): {max(excluded)}.")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict, metrics: Sequence[str]) -> None:
    with atomic_open(out / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "metric", "direction", "mean", "ci_low", "ci_high", "n", "n_excluded"])
        for method, s in summary.items():
            for m in metrics:
                v = s[m]
                w.writerow([method, m, DIRECTIONS.get(m, ""), v["mean"], v["ci_low"], v["ci_high"], v["n"],
                            v["n_excluded"]])
            w.writerow([method, "ms_per_image", "lower", s["ms"], "", "", s["n_items"], 0])
    with atomic_open(out / "summary.md", "w", encoding="utf-8") as fh:
        fh.write(markdown_summary(summary, metrics))
    write_json(out / "summary.json", summary)  # strict JSON: an undefined mean is null, not NaN


def gallery_items(data: BenchmarkData, n: int) -> list[Item]:
    """Up to ``n`` items with ground truth, taken in turn from each label."""
    by_label: dict[str, list[Item]] = {}
    for it in data.items:
        if it.has_gt:
            by_label.setdefault(it.label, []).append(it)
    picked: list[Item] = []
    while len(picked) < n and any(by_label.values()):
        for label in list(by_label):
            if by_label[label] and len(picked) < n:
                picked.append(by_label[label].pop(0))
    return picked


def gallery_maps(data: BenchmarkData, items: list[Item], explainers: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """{method: (n, *spatial) maps} for the gallery items."""
    idx = torch.tensor([it.sample for it in items], device=data.x.device)
    t = torch.tensor([it.target for it in items], device=data.x.device)
    out = {}
    for name, ex in explainers.items():
        with seeded(seed, data.x.device):
            out[name] = ex.explain(data.x[idx], target=t).detach()[:, 0].cpu()
    return out


def load_benchmark_data(clf, manifest, indices: Sequence[int], device=None, limit: int | None = None) -> BenchmarkData:
    """Images of ``manifest`` rows ``indices`` at the model's size, with their ground truth and items."""
    from nemt.data import ImageDataset
    indices = [int(i) for i in indices][:limit] if limit else [int(i) for i in indices]
    if not indices:
        raise NemtError("no images to benchmark (empty split)")
    ds = ImageDataset(manifest, clf.preprocessing, indices)
    st = ds.stacked()
    unit = clf.preprocessing.denormalise(st["image"]).clamp(0, 1)
    names = [manifest.samples[i].name for i in indices]
    items = make_items(st["y"], clf.card.task, clf.label_names, names, [bool(h) for h in st["has_gt"]])
    fp = f"{manifest.fingerprint()}:{','.join(map(str, indices))}"
    import hashlib
    return BenchmarkData(st["image"].to(device), unit, st["gt"].bool().to(device), items, list(clf.label_names),
                         hashlib.sha256(fp.encode()).hexdigest()[:16])


def report_run(out: Path, data: BenchmarkData, explainers: dict[str, Any], summary: dict, metrics: Sequence[str], *,
               title: str, facts: dict[str, str], gallery: int = 6, seed: int = 0, notes: Sequence[str] = ()) -> Path:
    """Gallery maps for a few items, then ``report.html`` and ``report.md``."""
    from nemt.bench.report import gallery_figure, write_report
    picked = gallery_items(data, gallery)
    figures = []
    if picked:
        maps = gallery_maps(data, picked, explainers, seed)
        for k, it in enumerate(picked):
            fig = gallery_figure(data.unit[it.sample].cpu().numpy(), data.gt[it.sample, 0].cpu().numpy(),
                                 {m: v[k].numpy() for m, v in maps.items()}, f"{it.image}: {it.label}")
            figures.append((it.label, fig))
    return write_report(out, summary, metrics, title=title, facts=facts, gallery=figures,
                        markdown=markdown_summary(summary, metrics), notes=notes)


DEFAULT_METHODS = ("nemt", "gradcam++", "ig", "gradshap", "rise", "extremal", "random", "sobel")


def split_method_params(items: Sequence[str]) -> dict[str, dict]:
    """``["rise.n_masks=2000", "faithfulness_estimate.batch_size=64"]`` -> ``{"rise": {"n_masks": 2000}, ...}``."""
    from nemt.params import parse_params
    out: dict[str, dict] = {}
    for item in items:
        head, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise NemtError(f"--param {item!r}: expected METHOD.KEY=VALUE (or METRIC.KEY=VALUE), "
                            "e.g. rise.n_masks=2000")
        out.setdefault(head, {}).update(parse_params([rest]))
    return out


def benchmark_model(model_dir: Path, data_path: Path, out: Path, *, explainer_dir: Path | None = None,
                    methods: Sequence[str] = DEFAULT_METHODS, metrics: Sequence[str] = DEFAULT_METRICS,
                    split: str = "test", limit: int | None = None, batch_size: int = 16, gallery: int = 6,
                    params: dict[str, dict] | None = None, seed: int = 0, device: str = "cpu",
                    progress: bool = True, restart: bool = False, open_data: Callable | None = None,
                    metric_workers: int = 0, shard: tuple[int, int] | None = None, merge: bool = False) -> dict:
    """``nemt benchmark``: a trained model's split of its data set, every method, every metric, the report.

    ``metric_workers``: see :func:`run_benchmark` (default 0: metrics serial in the calling thread).
    """
    from nemt.explainers import get_explainer
    from nemt.explainers.fast import inference_copy
    from nemt.models import load_model
    from nemt.models.training import load_splits

    params = dict(params or {})
    out = Path(out)
    if restart:  # forget earlier results in this folder
        for name in ("results.partial.csv", "run.json"):
            (out / name).unlink(missing_ok=True)
    clf = load_model(model_dir, device=device)
    if open_data is None:
        from nemt.data.manifest import open_dataset
        kw = {"labels": list(clf.label_names)} if clf.task == "multiclass" else {}
        manifest = open_dataset(data_path, task=clf.task, **kw)
    else:
        manifest = open_data(data_path, clf)
    manifest.raise_problems()
    splits = load_splits(model_dir, manifest)
    if split not in splits:
        raise NemtError(f"--split must be one of {sorted(splits)}, got {split!r}")
    metrics = check_metrics(metrics)
    metric_params = {m: params.pop(m) for m in list(params) if m in metrics}
    unknown = [k for k in params if k not in methods]
    if unknown:
        raise NemtError(f"--param for {unknown}: neither a chosen method ({list(methods)}) nor metric ({metrics})")
    if "nemt" in methods and explainer_dir is None:
        raise NemtError("method 'nemt' needs --explainer DIR (from `nemt fit`); or leave it out of --methods")
    explainers = {m: get_explainer(m, clf, path=explainer_dir if m in ("nemt", "nem") else None, seed=seed,
                                   device=device, **params.get(m, {})) for m in methods}
    data = load_benchmark_data(clf, manifest, splits[split], device=device, limit=limit)
    fast = inference_copy(clf)
    cfg = RunConfig(list(methods), list(metrics), batch_size, seed, metric_params, params)
    fitted = {m: explainer_checksum(explainer_dir) for m in methods if m in ("nemt", "nem")}
    if merge:
        added = merge_shards(out, metrics)
        console.print(f"merged {added} rows from {out / 'shards'}", highlight=False)
    summary = run_benchmark(clf, data, explainers, cfg, out, progress=progress, metric_model=fast,
                            explainer_sha256=fitted, metric_workers=metric_workers, shard=shard)
    if shard is not None:
        return summary
    facts = {"model": f"{model_dir} ({clf.card.arch}, {clf.task}, labels {', '.join(clf.label_names)})",
             "data": f"{data_path}, {split} split: {len({it.sample for it in data.items})} images, "
                     f"{len(data.items)} items ({sum(not it.has_gt for it in data.items)} without ground truth)",
             "input": f"{clf.card.in_channels} x {'x'.join(map(str, clf.card.input_size))}",
             "device": f"{device}, {__import__('torch').get_num_threads()} threads", "seed": str(seed),
             "methods": ", ".join(methods), "parameters": json.dumps(params) if params else "defaults"}
    report_run(out, data, explainers, summary, metrics, title="nemt benchmark", facts=facts, gallery=gallery,
               seed=seed)
    return summary
