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
description, so a new metric needs no change here. A dataset-level metric
(MaxBoxAccV2, whose best threshold is chosen over the whole data set) stores
each chunk's per-map statistic in ``statistics/METHOD/`` (safetensors, written
before the chunk's rows); when every chunk is done the statistics are pooled
and reduced once, each item's row gets its share (the results' mean is the
metric) and the metric's own figures go to ``dataset_metrics.json``.
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import math
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from nemt.errors import NemtError
from nemt.files import KEY_NAMES, atomic_open, atomic_path, code_fingerprint, write_json
from nemt.ops import seeded
from nemt.params import blamed_on_params, refuse_reserved
from nemt.metrics import DIRECTIONS, available_metrics, get_metric, parallel_chunks, registry, summarise
from nemt.progress import console, progress_bar

#: the inputs (names of :data:`nemt.metrics.INPUTS`) the runner gives metrics: maps (B, 1, *spatial), ground-truth
#: masks, the metric model, its inputs and the targets; every registered metric that needs no others can run
RUNNER_INPUTS = ("maps", "gt", "model", "x", "target")
#: the inputs a run also has when its data set has eye gaze (:mod:`nemt.data.gaze`): heat maps and fixation maps
GAZE_INPUTS = ("gaze", "fixations")
#: the metrics added to the default ones when the data set has gaze
GAZE_METRICS = ("kl_divergence", "nss")
DEFAULT_METRICS = ("relevance_mass", "relevance_rank", "pointing_game", "pointing_game_expected", "energy_pointing_game",
                   "complexity", "sparseness", "faithfulness_estimate")
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
    gaze: torch.Tensor | None = None  # (N, 1, *spatial) gaze heat maps in [0, 1] (zeros: no gaze), or None
    fixations: torch.Tensor | None = None  # (N, 1, *spatial) fixation counts, or None
    #: when the data set is not the one the model was trained on (its manifest's checksum is not the model
    #: card's ``data.sha256``): both checksums and the model's data source; recorded in run.json; None otherwise
    other_data: dict | None = None
    #: when some images are unlike the model's training images as its card records them
    #: (:func:`nemt.data.acquisition.differences`: field of view, value range, sampling rate): ``n`` of ``of``
    #: images, and the first one's ``image`` and ``notes``; recorded in run.json and the report; None otherwise
    unlike_training: dict | None = None
    #: per image, its orientation (a NIfTI's axis codes, for the gallery's axial/coronal/sagittal planes) or None
    axcodes: list | None = None


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


def check_metrics(metrics: Sequence[str], gaze: bool = False) -> list[str]:
    """``metrics`` if the runner can compute each (with ``gaze``: also the gaze metrics), else a clear error."""
    known = set(available_metrics(RUNNER_INPUTS + GAZE_INPUTS)) if gaze else set(runnable_metrics())
    bad = [m for m in metrics if m not in known]
    if bad:
        reg = registry()
        have = RUNNER_INPUTS + (GAZE_INPUTS if gaze else ())
        other = {m: [k for k in reg[m].inputs if k not in have] for m in bad if m in reg}
        why = "".join(f"; {m} needs {', '.join(ks)}, which the benchmark does not have" for m, ks in other.items())
        if any(k in GAZE_INPUTS for ks in other.values() for k in ks):
            why += (" (eye gaze: a fixation file, gaze.csv beside the manifest or --gaze FILE; "
                    "`nemt data gaze DATA --simulate` makes one)")
        raise NemtError(f"unknown metric(s) {bad}; available: {sorted(known)}{why}")
    return list(metrics)


#: metric keywords that count something (pixels per group, steps, images per model call, thresholds, pixels of a
#: side): whole numbers of at least 1 (None, where a metric allows it, is its default), as for the methods'
#: :data:`~nemt.explainers.base.COUNT_PARAMETERS`
METRIC_COUNT_PARAMETERS = frozenset({"features_in_step", "steps", "batch_size", "max_side", "thresholds",
                                     "num_iter_max", "k"})


def metric_parameters(name: str) -> list[str] | None:
    """The keyword parameters (sorted) that metric ``name`` takes from ``--param METRIC.KEY=VALUE``, as the runner
    calls it: a per-map metric's function; a dataset-level metric's statistic and reduction both get them (so
    only the keywords both take). None: it takes any keyword (``**kwargs``)."""
    spec = get_metric(name)
    n_in = len(spec.inputs)
    fns = [(spec.statistic, n_in), (spec.reduce, 1)] if spec.dataset_level else [(spec.fn, n_in)]
    sets = []
    for fn, n_pos in fns:
        ps = list(inspect.signature(fn).parameters.values())
        if any(p.kind == p.VAR_KEYWORD for p in ps):
            continue
        sets.append({p.name for p in ps[n_pos:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)})
    return sorted(set.intersection(*sets)) if sets else None


_SIMPLE_TYPES: dict[str, Callable[[Any], bool]] = {
    "None": lambda v: v is None, "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}


def _annotation_parts(annotation: Any) -> list[str] | None:
    """``"int | None"`` -> ``["int", "None"]`` when every part is a plain type of :data:`_SIMPLE_TYPES`, else None
    (``Any``, sequences, tensors: left to the metric's own checks)."""
    text = annotation.__name__ if isinstance(annotation, type) else annotation
    if not isinstance(text, str):
        return None
    parts = [t.strip() for t in text.split("|")]
    return parts if all(t in _SIMPLE_TYPES for t in parts) else None


def check_metric_params(metrics: Sequence[str], params: dict[str, dict] | None, *,
                        probe: dict[str, Any] | None = None, seed: int = 0) -> None:
    """Refuse bad metric parameters before any work, as the methods' are refused: a metric not in ``metrics``,
    a key the metric does not take (named with the metric's parameters), a value of the wrong type (by the
    metric's signature: an ``int`` for ``int``, a bool for ``bool``, ...) or a count below 1
    (:data:`METRIC_COUNT_PARAMETERS`). With ``probe`` (the inputs of one map, :func:`_metric_probe`), each metric
    with parameters is also called once on it, so that a value its own checks refuse, or one that breaks it, is
    a :class:`NemtError` naming the parameters now, not after the first chunk was explained (the global random
    state is left as it was)."""
    params = params or {}
    stray = [m for m in params if m not in metrics]
    if stray:
        raise NemtError(f"--param for {stray}: not a metric of this run ({list(metrics)})")
    for name, kw in params.items():
        if not isinstance(kw, dict):
            raise NemtError(f"parameters of metric {name!r} must be a dict of keywords, got {type(kw).__name__}")
        given = _param_text(name, kw)
        accepted = metric_parameters(name)
        unknown = sorted(set(kw) - set(accepted)) if accepted is not None else []
        if unknown:
            raise NemtError(f"--param {given}: metric {name!r} has no parameter {unknown}; its parameters are "
                            f"{accepted}")
        spec = get_metric(name)
        sig = inspect.signature(spec.statistic if spec.dataset_level else spec.fn).parameters
        for key, value in kw.items():
            parts = _annotation_parts(sig[key].annotation) if key in sig else None
            if parts is not None and not any(_SIMPLE_TYPES[t](value) for t in parts):
                raise NemtError(f"--param {name}.{key}={value}: metric {name!r}: {key} must be "
                                f"{' or '.join(parts)}, got {value!r}")
            if key in METRIC_COUNT_PARAMETERS and value is not None and not (
                    _SIMPLE_TYPES["float"](value) and math.isfinite(value) and value == int(value) and value >= 1):
                raise NemtError(f"--param {name}.{key}={value}: metric {name!r}: {key} must be a whole number >= 1, "
                                f"got {value!r}")
        if probe is not None and kw:
            _probe_metric(name, kw, probe, given, seed)


def _metric_probe(data: BenchmarkData, model) -> dict[str, Any] | None:
    """The inputs of one map for :func:`check_metric_params`' trial call: the first item with a non-empty
    mask (else the first item) and a ramp map over its pixels (not constant, so every metric is defined)."""
    if not data.items:
        return None
    nonempty = data.gt.flatten(1).any(1)
    it = next((it for it in data.items if bool(nonempty[it.sample])), data.items[0])
    s, x = it.sample, data.x[it.sample:it.sample + 1]
    ramp = torch.linspace(0, 1, math.prod(x.shape[2:]), device=x.device).view(1, 1, *x.shape[2:])
    values = {"maps": ramp, "gt": data.gt[s:s + 1], "model": model, "x": x,
              "target": torch.tensor([it.target], device=x.device)}
    values.update({k: v[s:s + 1] for k, v in (("gaze", data.gaze), ("fixations", data.fixations)) if v is not None})
    return values


def _probe_metric(name: str, kw: dict, values: dict[str, Any], given: str, seed: int) -> None:
    """Metric ``name`` called once on ``values`` with its parameters ``kw``; what fails is a NemtError naming them."""
    spec = get_metric(name)
    what = f"metric {name!r} cannot run with --param {given}"
    device = values["x"].device
    try:
        with seeded(seed, device), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an undefined value of the trial map is no error of the parameters
            if spec.dataset_level:
                v, _ = spec.reduce(spec.call_statistic(values, **kw).reshape(1, -1), **kw)
            else:
                v = spec.call(values, **kw)
    except NemtError as exc:
        raise NemtError(f"{what}: {exc}") from None
    except (ValueError, TypeError, RuntimeError, ArithmeticError, LookupError, AttributeError) as exc:
        raise NemtError(f"{what}: {type(exc).__name__}: {exc}") from None
    if not torch.is_tensor(v) or v.numel() != 1:
        raise NemtError(f"{what}: it gives {type(v).__name__}"
                        f"{f' of shape {tuple(v.shape)}' if torch.is_tensor(v) else ''} for one map, not one value "
                        "per map, which the benchmark needs")


def score_maps(metrics: Sequence[str], maps: torch.Tensor, gt: torch.Tensor, model, x: torch.Tensor,
               target: torch.Tensor, params: dict[str, dict] | None = None, *, gaze: torch.Tensor | None = None,
               fixations: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{metric: (B,) values} for maps (B, 1, *spatial) of per-sample targets.

    Each metric is called as registered (:meth:`nemt.metrics.MetricSpec.call`)
    with its inputs among maps, ``gt``, ``model``, ``x`` and ``target`` (and
    ``gaze``, ``fixations`` (B, 1, *spatial) when given), and its
    ``params[name]`` as keywords.
    """
    params = params or {}
    values = {"maps": maps, "gt": gt, "model": model, "x": x, "target": target}
    values.update({k: v for k, v in (("gaze", gaze), ("fixations", fixations)) if v is not None})
    out: dict[str, torch.Tensor] = {}
    for name in metrics:
        spec = get_metric(name)
        if spec.dataset_level:  # a share of a data-set maximum: only the whole run gives it (score_statistics)
            out[name] = torch.full((maps.shape[0],), float("nan"), dtype=torch.float64)
            continue
        v = spec.call(values, **params.get(name, {}))
        out[name] = v.reshape(-1).detach().cpu().double()
    return out


def score_statistics(metrics: Sequence[str], maps: torch.Tensor, gt: torch.Tensor, model, x: torch.Tensor,
                     target: torch.Tensor, params: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """{metric: (B, S) statistic} of the dataset-level metrics among ``metrics`` (e.g. ``max_box_acc_v2``: the
    IoU at every threshold) for maps (B, 1, *spatial); the run pools them and reduces once (:func:`reduce_statistics`)."""
    params = params or {}
    values = {"maps": maps, "gt": gt, "model": model, "x": x, "target": target}
    out: dict[str, torch.Tensor] = {}
    for name in metrics:
        spec = get_metric(name)
        if spec.dataset_level:
            v = spec.call_statistic(values, **params.get(name, {}))
            out[name] = v.reshape(maps.shape[0], -1).detach().cpu().double()
    return out


def _statistics_dir(out: Path, method: str) -> Path:
    return out / "statistics" / method


def save_statistics(out: Path, method: str, items: Sequence[int], stats: dict[str, torch.Tensor]) -> None:
    """One chunk's statistics, ``out/statistics/METHOD/ITEM.safetensors`` (ITEM: the chunk's first item), atomically,
    before its rows enter the results log (so a logged row always has its statistic)."""
    if not stats:
        return
    from safetensors.torch import save_file
    path = _statistics_dir(out, method) / f"{int(items[0]):07d}.safetensors"
    tensors = {"item": torch.tensor([int(i) for i in items], dtype=torch.int64),
               **{k: v.contiguous() for k, v in stats.items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def reduce_statistics(out: Path, rows: list[dict], methods: Sequence[str], metrics: Sequence[str],
                      params: dict[str, dict] | None = None) -> dict[str, dict]:
    """Fill the dataset-level metrics of ``rows`` (in place) with each item's share of the whole run's value.

    Per method and metric, the statistics of every item (``out/statistics/METHOD/*.safetensors``) are pooled
    and reduced once (:attr:`nemt.metrics.MetricSpec.reduce`); returns {method: {metric: details}}.
    """
    from safetensors.torch import load_file
    params = params or {}
    levels = [m for m in metrics if get_metric(m).dataset_level]
    details: dict[str, dict] = {}
    if not levels:
        return details
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        folder = _statistics_dir(out, method)
        found: dict[str, dict[int, torch.Tensor]] = {m: {} for m in levels}
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                t = load_file(str(path))
            except Exception as exc:  # a damaged file: name it
                raise NemtError(f"{path}: unreadable ({exc}); delete it (its chunk is recomputed) or use "
                                "--restart") from None
            for m in levels:
                if m not in t:
                    raise NemtError(f"{path}: has no statistic of {m!r}; written by a run with other metrics; "
                                    "use --restart")
                for k, i in enumerate(t["item"].tolist()):
                    found[m][int(i)] = t[m][k]
        details[method] = {}
        for m in levels:
            missing = [int(r["item"]) for r in mine if int(r["item"]) not in found[m]]
            if missing:
                raise NemtError(f"{folder}: no statistic of {m!r} for items {missing[:5]}"
                                f"{' ...' if len(missing) > 5 else ''} of {method}; use --restart")
            stats = torch.stack([found[m][int(r["item"])] for r in mine])
            share, info = get_metric(m).reduce(stats, **params.get(m, {}))
            for r, v in zip(mine, share.tolist()):
                r[m] = _fmt(float(v))
            details[method][m] = info
    return details


def _say(text: str) -> None:
    """A message to the console, as written (no markup, no highlighting)."""
    console.print(text, soft_wrap=True, highlight=False, markup=False)


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
            self._read(log or _say)

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
                  shard: tuple[int, int] | None = None, record: dict | None = None) -> dict:
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
    ``record``: facts written to ``run.json`` beside the run's key and not compared on a resume (the data's
    fingerprint and the item count are): :func:`benchmark_model` records the split, the limit, the data set's
    checksum and the model's configuration, which ``benchmarks/seed_summary.py`` compares between runs.
    Metric parameters (``config.metric_params``) are checked before any work (:func:`check_metric_params`).
    """
    out = Path(out)
    meta = run_key(model, data, explainers, config, model_sha256=model_sha256, explainer_sha256=explainer_sha256)
    metrics, params, fitted = meta["metrics"], meta["method_params"], meta["explainer_sha256"]
    check_metric_params(metrics, config.metric_params, seed=config.seed,
                        probe=_metric_probe(data, metric_model or model) if any(config.metric_params.values())
                        else None)
    home = out
    if shard is not None:
        i, n = int(shard[0]), int(shard[1])
        if not 0 <= i < n:
            raise NemtError(f"--shard {i}/{n}: expected I/N with 0 <= I < N")
        refuse_shards_of_another_count(home, n)
        out = out / "shards" / f"{i}-of-{n}"
    meta_path = out / "run.json"
    before = meta_path.read_text() if meta_path.is_file() else None  # restored if this run logs nothing
    if before is not None:
        old = json.loads(before)
        refuse_another_run(old, meta, meta_path)
        meta["methods"] = list(dict.fromkeys(old.get("methods", []) + meta["methods"]))
        meta["method_params"] = {**old.get("method_params", {}), **params}
        meta["explainer_sha256"] = {**old.get("explainer_sha256", {}), **fitted}
    meta.update({k: v for k, v in (record or {}).items() if k not in meta})
    from nemt.explainers.base import explainer_settings
    meta["method_settings"] = {**(old.get("method_settings", {}) if before is not None else {}),  # not compared on a resume
                               **{m: explainer_settings(ex, params.get(m)) for m, ex in explainers.items()}}
    made = [d for d in (out, *out.parents) if not d.exists()]  # folders this run creates, deepest first
    out.mkdir(parents=True, exist_ok=True)
    log_ = ResultsLog(out / "results.partial.csv", metrics, log)
    for (name, i), r in log_.rows.items():
        if name in explainers and (i >= len(data.items) or r["image"] != data.items[i].image
                                   or int(r["target"]) != data.items[i].target):
            raise NemtError(f"{log_.path}: the row of {name}, item {i} ({r['image']!r}, target {r['target']}) "
                            "is not an item of this run's data; use another --out or --restart")
    write_json(meta_path, meta)
    mm = metric_model or model
    chunks = [data.items[i:i + config.batch_size] for i in range(0, len(data.items), config.batch_size)]
    if shard is not None:
        n_chunks = len(chunks)
        chunks = chunks[int(shard[0])::int(shard[1])]
        if not chunks:  # the same chunks as one process (so the same maps): say why it idles
            (log or _say)(f"shard {shard[0]}/{shard[1]} has no items: {len(data.items)} items make {n_chunks} chunk(s) of "
                f"--batch-size {config.batch_size}, one per shard from shard 0; a --batch-size of at most "
                f"{max(1, -(-len(data.items) // int(shard[1])))} gives every shard work (maps of randomised "
                "methods depend on the batch, so keep the batch size when comparing runs)")
    done = log_.done
    todo = [(name, c) for name in explainers for c in chunks
            if any((name, it.item) not in done for it in c)]
    given = {name: _param_text(name.split("@")[0], {k: v for k, v in params[name].items() if k != "superpixelify"})
             for name in explainers}  # each method's --param as written, for an error it causes
    n_before = len(log_.rows)
    try:
        _explain_and_score(todo, explainers, given, data, config, metrics, mm, metric_workers, out, log_, progress)
    except BaseException:
        if len(log_.rows) == n_before:  # nothing new was logged: leave --out as it was (no stray run.json)
            _restore(meta_path, before, made)
        raise
    if shard is not None:
        return {"shard": f"{shard[0]}-of-{shard[1]}", "folder": str(out.relative_to(home)), "rows": len(log_.rows)}
    order = {m: k for k, m in enumerate(explainers)}
    rows = [dict(log_.rows[key]) for key in sorted((k for k in log_.rows if k[0] in order),
                                                   key=lambda k: (order[k[0]], k[1]))]
    details = reduce_statistics(out, rows, list(explainers), metrics, config.metric_params)
    if details:  # the dataset-level metrics' own figures (e.g. MaxBoxAcc per IoU threshold, best threshold)
        write_json(out / "dataset_metrics.json", details)
    with atomic_open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=log_.fields)
        w.writeheader()
        w.writerows(rows)
    summary = summarise_results(rows, list(explainers), metrics)
    write_summary(out, summary, metrics)
    return summary


def run_key(model, data: BenchmarkData, explainers: dict[str, Any], config: RunConfig, *,
            model_sha256: str | None = None, explainer_sha256: dict[str, str] | None = None) -> dict:
    """What :func:`run_benchmark` records in ``run.json``: the methods, metrics, batch size, seed, items, data
    (:attr:`BenchmarkData.fingerprint`), parameters, the model's and each fitted explainer's checksum and
    nemt's code; a folder holding another run is refused (:func:`refuse_another_run`), not resumed."""
    metrics = check_metrics(config.metrics, gaze=data.gaze is not None)
    if model_sha256 is None:
        from nemt.explainers.nemt import model_checksum
        model_sha256 = model_checksum(model)
    fitted = {m: explainer_sha256[m] for m in explainers if explainer_sha256 and m in explainer_sha256}
    params = {m: config.method_params.get(m, {}) for m in explainers}
    meta = {"methods": list(explainers), "metrics": metrics, "batch_size": config.batch_size, "seed": config.seed,
            "items": len(data.items), "data": data.fingerprint, "metric_params": config.metric_params,
            "method_params": params, "model_sha256": model_sha256, "explainer_sha256": fitted,
            "code": code_fingerprint()}
    if data.other_data:  # recorded, not part of the key: the data's fingerprint already is
        meta["other_data"] = data.other_data
    if data.unlike_training:  # the same: follows from the data
        meta["unlike_training"] = data.unlike_training
    return meta


def refuse_another_run(old: dict, meta: dict, path: Path, remedy: str = "use another --out or --restart") -> None:
    """A :class:`NemtError` when the run recorded in ``old`` (read from ``path``, a ``run.json``) is not the run
    ``meta`` (:func:`run_key`) may resume: another model, data, items, metrics, seed or parameters, another
    fitted explainer for a method both have, or other nemt code. Methods the old run lacks may join it."""
    where = Path(path).parent
    recorded = old.get("model_sha256")
    if recorded is None:
        raise NemtError(f"{path}: does not record its model's checksum (written by an earlier nemt), so "
                        f"its results may be another model's; {remedy}")
    if recorded != meta["model_sha256"]:
        raise NemtError(f"{where}: holds a run of another model (weights checksum {recorded[:16]}..., this "
                        f"model {meta['model_sha256'][:16]}...); {remedy}")
    diff = [k for k in ("metrics", "items", "data", "seed", "metric_params") if k in old and old[k] != meta[k]]
    if "code" in old and old["code"] != meta["code"]:  # a folder from before the fingerprint is not refused for it
        diff.append(KEY_NAMES["code"])
    diff += [f"parameters of {m}" for m, p in meta["method_params"].items()
             if m in old.get("method_params", {}) and old["method_params"][m] != p]
    fitted = meta["explainer_sha256"]
    diff += [f"fitted explainer of {m}" for m in meta["methods"]
             if m in old.get("methods", []) and old.get("explainer_sha256", {}).get(m) != fitted.get(m)]
    if diff:
        raise NemtError(f"{where}: holds a run with other {', '.join(diff)}; {remedy}")


def _shard_count(folder: Path) -> str:
    return folder.name.split("-of-")[-1]


def _shard_folders(out: Path) -> list[Path]:
    """The folders ``out/shards/I-of-N`` (sorted)."""
    folder = Path(out) / "shards"
    return sorted(p for p in folder.glob("*-of-*") if p.is_dir() and re.fullmatch(r"\d+-of-\d+", p.name)) \
        if folder.is_dir() else []


def refuse_shards_of_another_count(out: Path, n: int) -> None:
    """A :class:`NemtError` when ``out/shards`` holds shards of a run split another number of ways than ``n``
    (an earlier ``--shard I/M`` or torchrun with M processes): their rows could never be merged with this run's,
    so it is refused before any work, naming the old count and how to start over."""
    folder = Path(out) / "shards"
    others = [p.name for p in _shard_folders(out) if _shard_count(p) != str(n)]
    if others:
        counts = sorted({o.split("-of-")[-1] for o in others})
        raise NemtError(f"{folder}: holds the shards of a run split {' and '.join(counts)} ways ({', '.join(others)}); "
                        f"this run is split {n} ways (--shard I/{n}, or {n} torchrun processes), and shards of two "
                        f"splits cannot be merged; to start over use --restart (or delete {folder}); to finish the "
                        f"old run, split it {counts[0]} ways again")


#: what a run writes in its folder: ``--restart`` removes them (its shards' folders too, for a sharded run)
RUN_OUTPUTS = ("results.partial.csv", "run.json", "statistics", "results.csv", "summary.csv", "summary.md",
               "summary.json", "dataset_metrics.json", "report.html", "report.md")


def _remove(path: Path) -> None:
    """Remove a file or folder; a folder is first renamed aside (atomically), so that processes starting over
    together (torchrun ranks) never see it half removed, nor fail on one another's deletions."""
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f".removed-{uuid.uuid4().hex}")  # no "-of-" in it: never read as a shard
        try:
            path.rename(aside)
        except FileNotFoundError:  # another process took it
            return
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clear_run(out: Path, shard: tuple[int, int] | None = None, *, keep_shards: bool = False) -> None:
    """``--restart``: forget the run in ``out`` (every file of :data:`RUN_OUTPUTS`, so that no results, summary
    or report of the earlier run stays beside the new ``run.json``). With ``shard=(i, n)`` also this shard's
    folder and those of another split (``out/shards/*-of-M``, M != n); the other shards of an n-way split are
    theirs to clear. ``keep_shards`` (a merge): ``out/shards`` is left alone."""
    out = Path(out)
    for name in RUN_OUTPUTS:
        _remove(out / name)
    if shard is not None and not keep_shards:
        i, n = int(shard[0]), int(shard[1])
        for p in _shard_folders(out):
            if p.name == f"{i}-of-{n}" or _shard_count(p) != str(n):
                _remove(p)


def _explain_and_score(todo, explainers, given, data, config, metrics, mm, metric_workers, out, log_,
                       progress) -> None:
    """:func:`run_benchmark`'s loop: each (method, chunk) explained, scored and appended to the results log."""
    device = data.x.device
    with progress_bar(progress) as bar:
        task = bar.add_task("benchmark", total=len(todo), info="")
        for name, chunk in todo:
            bar.update(task, info=name)
            idx = torch.tensor([it.sample for it in chunk], device=device)
            t = torch.tensor([it.target for it in chunk], device=device)
            x = data.x[idx]
            with seeded(config.seed, device):  # the caller's global RNG is restored after
                t0 = time.perf_counter()
                with blamed_on_params(given[name], f"method {name!r} failed"):
                    maps = explainers[name].explain(x, target=t).detach()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t0) / len(chunk)
            with parallel_chunks(metric_workers) if metric_workers > 0 else contextlib.nullcontext():
                scores = score_maps(metrics, maps.float(), data.gt[idx], mm, x, t, config.metric_params,
                                    gaze=None if data.gaze is None else data.gaze[idx],
                                    fixations=None if data.fixations is None else data.fixations[idx])
            save_statistics(out, name, [it.item for it in chunk],
                            score_statistics(metrics, maps.float(), data.gt[idx], mm, x, t, config.metric_params))
            rows = []
            for k, it in enumerate(chunk):
                row = {"method": name, **{f: getattr(it, f) for f in ("item", "sample", "image", "target", "label",
                                                                       "has_gt")}, "ms": ms}
                row.update({m: float(v[k]) for m, v in scores.items()})
                rows.append(row)
            log_.append(rows)
            bar.advance(task)


def _restore(meta_path: Path, before: str | None, made: list[Path]) -> None:
    """Put ``run.json`` back as it was before a run that logged nothing (removed if it was new) and remove
    the folders that run created, where they are empty."""
    if before is None:
        meta_path.unlink(missing_ok=True)
    else:
        with atomic_open(meta_path, "w", encoding="utf-8") as fh:
            fh.write(before)
    for d in made:
        try:
            d.rmdir()
        except OSError:
            break


def merge_shards(out: Path, metrics: Sequence[str], log: Callable[[str], None] | None = None, *,
                 expect: dict | None = None) -> int:
    """Collect the rows of ``out/shards/*`` (runs with ``shard``) into ``out``'s results log; return how many
    were added. The shards must record the same run (model, explainers, data, items, metrics, seed,
    parameters); a later run without ``shard`` then finds every item done and writes results, summary and
    report. Rows already in ``out`` are kept. ``expect``: the run that will follow (:func:`run_key`); shards
    of another run are refused before anything is written. Nothing is written until every check passed."""
    out = Path(out)
    folders = [p for p in _shard_folders(out) if (p / "run.json").is_file()]
    if not folders:
        raise NemtError(f"{out}: no shards to merge (out/shards/I-of-N/run.json, written by --shard I/N)")
    metas = [json.loads((f / "run.json").read_text()) for f in folders]
    counts = {_shard_count(f) for f in folders}
    if len(counts) != 1:
        raise NemtError(f"{out}/shards: holds the shards of runs split different numbers of ways "
                        f"({', '.join(f.name for f in folders)}); delete the folders of the split you do not want "
                        "(or start over with --restart), then merge")
    n = int(counts.pop())
    missing = sorted(set(range(n)) - {int(f.name.split("-of-")[0]) for f in folders})
    if missing:
        raise NemtError(f"{out}/shards: shards {missing} of {n} are missing; run them (--shard I/{n}) first")
    for f, m in zip(folders[1:], metas[1:]):
        if m != metas[0]:
            diff = sorted(k for k in set(m) | set(metas[0]) if m.get(k) != metas[0].get(k))
            raise NemtError(f"{f}: another run than {folders[0].name} (differs in {', '.join(diff)})")
    if expect is not None:  # the run that follows the merge would refuse what the merge wrote: refuse it now
        refuse_another_run(metas[0], expect, folders[0] / "run.json",
                           remedy="run the shards again with this run's settings (each --shard I/N with --restart), "
                                  "or merge with the settings they were run with")
    main = out / "run.json"
    if main.is_file():
        refuse_another_run(json.loads(main.read_text()), metas[0], main)
    parts = [ResultsLog(f / "results.partial.csv", metas[0]["metrics"], log) for f in folders]  # each read whole
    target = ResultsLog(out / "results.partial.csv", metas[0]["metrics"], log)
    if not main.is_file():
        write_json(main, metas[0])
    added = []
    for f, part in zip(folders, parts):
        new = [r for k, r in sorted(part.rows.items(), key=lambda kv: kv[0][1]) if k not in target.rows]
        for src in sorted((f / "statistics").glob("*/*.safetensors")):  # dataset-level metrics' statistics
            dst = out / "statistics" / src.parent.name / src.name
            if not dst.is_file():
                with atomic_open(dst, "wb") as fh:
                    fh.write(src.read_bytes())
        added += new
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


#: the metrics whose value per map is a hit or a miss (0 or 1): their interval is Wilson's score interval; every
#: other metric's is Student t's. Fixed per metric, not chosen by the values (a run whose relevance ranks
#: happen to be all 0 or 1 keeps the t interval of every other run)
BINARY_METRICS = frozenset({"pointing_game"})
#: the range of the metrics documented as bounded (the metric registry records no range): their interval is
#: clipped to it. Relevance mass, energy pointing game, relevance rank, pointing game (expected), top-k
#: intersection, sparseness (Gini), top-k precision, importance mass accuracy, EMD score, MaxBoxAccV2 and gaze
#: similarity lie in [0, 1]; faithfulness estimate and gaze CC (correlations) in [-1, 1]. Some leave their range
#: under other parameters (signed maps, concept influence): a run with a value outside it is not clipped.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    **{k: (0.0, 1.0) for k in ("relevance_mass", "energy_pointing_game", "relevance_rank", "pointing_game",
                               "pointing_game_expected", "top_k_intersection", "sparseness", "top_k_precision",
                               "importance_mass_accuracy", "emd_score", "max_box_acc_v2", "similarity")},
    "faithfulness_estimate": (-1.0, 1.0), "cc": (-1.0, 1.0)}


def summarise_metric(values: Sequence[float], metric: str, undefined: Sequence[bool] | None = None) -> dict:
    """:func:`nemt.metrics.summarise` of one metric's values with its interval method (Wilson for
    :data:`BINARY_METRICS`, Student t otherwise) and its interval clipped to :data:`METRIC_RANGES`;
    ``undefined`` marks the NaN values that are undefined scores (else the metric's rule decides)."""
    reg = registry()  # a registered metric's NaN without ground truth is undefined (a collapsed map)
    s = summarise(values, method="wilson" if metric in BINARY_METRICS else "t",
                  **({"undefined": np.asarray(undefined, dtype=bool)} if undefined is not None
                     else {"metric": metric if metric in reg else None}))
    lo, hi = METRIC_RANGES.get(metric, (-math.inf, math.inf))
    finite = [v for v in map(float, values) if not math.isnan(v)]
    if s["n"] >= 2 and all(lo <= v <= hi for v in finite):
        s["ci_low"], s["ci_high"] = max(lo, s["ci_low"]), min(hi, s["ci_high"])
    return s


def summarise_results(rows: list[dict], methods: Sequence[str], metrics: Sequence[str]) -> dict:
    """{method: {metric: :func:`summarise_metric` dict, "ms": mean ms/image, "n_items": n}}."""
    out: dict[str, dict] = {}
    reg = registry()
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        entry: dict[str, Any] = {"n_items": len(mine)}
        for k in metrics:
            values = [float(r[k]) for r in mine]
            # a localisation metric's NaN on an item with a lesion is undefined (a constant map: nothing
            # localised), not an item without ground truth
            undefined = [math.isnan(v) and str(r["has_gt"]) == "True" for v, r in zip(values, mine)] \
                if k in reg and reg[k].needs_gt and all("has_gt" in r for r in mine) else None
            entry[k] = summarise_metric(values, k, undefined)
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
    from nemt.bench.report import best_methods
    best = best_methods(summary, metrics)  # per metric, every method at the best mean (ties all bold)
    for method, s in summary.items():
        cells = [method] + [("**" + _cell(s[m]) + "**") if method in best.get(m, ()) else _cell(s[m])
                            for m in metrics]
        cells.append(f"{s['ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    reg = registry()
    excluded = {s[m]["n_excluded"] for s in summary.values() for m in metrics if m in reg and reg[m].needs_gt}
    if excluded and max(excluded) > 0:
        lines.append("")
        lines.append(f"Items without ground truth (excluded from the localisation means): {max(excluded)}.")
    undefined = [f"{method} {m}: {s[m]['n_undefined']}" for method, s in summary.items() for m in metrics
                 if s[m].get("n_undefined")]
    if undefined:
        lines.append("")
        lines.append("Maps a metric is undefined for (constant, collapsed maps; left out of the mean): "
                     + "; ".join(undefined) + ".")
    lines += tie_notes(summary, metrics)
    return "\n".join(lines) + "\n"


def tie_notes(summary: dict, metrics: Sequence[str], gap: float = 0.02) -> list[str]:
    """A line per method whose pointing game exceeds its tie-fair pointing game by more than ``gap``: its
    maps have plateaus of tied maxima (e.g. a clamped mask) that Quantus' rule scores as hits when any
    tied pixel is in the mask (see :func:`nemt.metrics.pointing_game`); empty without both metrics."""
    if "pointing_game" not in metrics or "pointing_game_expected" not in metrics:
        return []
    out = []
    for method, s in summary.items():
        a, e = s["pointing_game"], s["pointing_game_expected"]
        if a["n"] > 0 and e["n"] > 0 and a["mean"] - e["mean"] > gap:
            out.append(f"{method}: its maps have plateaus of tied maxima; pointing_game counts a plateau as a hit "
                       f"when any of it lies in the mask ({a['mean']:.3f}), one point per map scores "
                       f"{e['mean']:.3f} (pointing_game_expected).")
    return [""] + out if out else []


def write_summary(out: Path, summary: dict, metrics: Sequence[str]) -> None:
    with atomic_open(out / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "metric", "direction", "mean", "ci_low", "ci_high", "n", "n_excluded", "n_undefined"])
        for method, s in summary.items():
            for m in metrics:
                v = s[m]
                w.writerow([method, m, DIRECTIONS.get(m, ""), v["mean"], v["ci_low"], v["ci_high"], v["n"],
                            v["n_excluded"], v.get("n_undefined", 0)])
            w.writerow([method, "ms_per_image", "lower", s["ms"], "", "", s["n_items"], 0, 0])
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


def load_benchmark_data(clf, manifest, indices: Sequence[int], device=None, limit: int | None = None,
                        gaze: str | Path | None = None) -> BenchmarkData:
    """Images of ``manifest`` rows ``indices`` at the model's size, with their ground truth and items.

    The fingerprint covers the manifest's bytes, the rows and the images and masks as loaded (so a resumed
    run refuses a data set whose files changed under the same names). ``other_data`` is set when the manifest
    is not the one the model card records (``data.sha256``): evaluating on other data (external validation) is
    allowed, and the caller says so. ``gaze``: a fixation CSV (:mod:`nemt.data.gaze`) whose heat maps and
    fixation maps join the data (its bytes join the fingerprint, so a resumed run refuses other gaze)."""
    from nemt.data import ImageDataset
    _check_limit(limit)
    indices = [int(i) for i in indices][:limit] if limit is not None else [int(i) for i in indices]
    if not indices:
        raise NemtError("no images to benchmark (empty split)")
    ds = ImageDataset(manifest, clf.preprocessing, indices)
    st = ds.stacked()
    unit = clf.preprocessing.denormalise(st["image"]).clamp(0, 1)
    names = [manifest.samples[i].name for i in indices]
    # ground truth: a mask that marks something (an empty mask file scores nothing, as no mask)
    items = make_items(st["y"], clf.card.task, clf.label_names, names,
                       [bool(h) and bool(g.any()) for h, g in zip(st["has_gt"], st["gt"])])
    from nemt.explainers.nemt.teacher import items_fingerprint
    theirs = manifest.fingerprint()
    # the images and masks as loaded join the manifest's bytes: a file replaced under the same name is other data
    fp = f"{theirs}:{','.join(map(str, indices))}:arrays {items_fingerprint([st['image'], st['gt']])}"
    other = other_data(clf, theirs)
    unlike = unlike_training(clf, ds, names)
    heat = fix = None
    if gaze is not None:
        from nemt.data.gaze import check_gaze, gaze_targets
        from nemt.files import sha256_file
        # checked as `nemt data gaze --gaze` checks it (a file given here may never have been installed by it):
        # each named image 2D, every fixation inside its image
        _, match = check_gaze(manifest, gaze)
        heat, fix, _ = gaze_targets(manifest, indices, clf.card.input_size, match.matched)
        heat, fix = heat.to(device), fix.to(device)
        fp += f":gaze {sha256_file(gaze)}"
    import hashlib
    return BenchmarkData(st["image"].to(device), unit, st["gt"].bool().to(device), items, list(clf.label_names),
                         hashlib.sha256(fp.encode()).hexdigest()[:16], gaze=heat, fixations=fix, other_data=other,
                         unlike_training=unlike, axcodes=[ds.described[j].get("axcodes") for j in ds.indices])


def unlike_training(clf, ds, names: Sequence[str]) -> dict | None:
    """How many images of ``ds`` (an :class:`ImageDataset` read once) are unlike the model's training images as
    its card records them (:func:`nemt.data.acquisition.differences`), with the first one's notes; None when
    none is (or the card records nothing)."""
    from nemt.data.acquisition import differences
    summary = (clf.card.data or {}).get("acquisition")
    scale = clf.card.preprocessing.get("scale", "range")
    found = [(name, notes) for name, j in zip(names, ds.indices)
             if (notes := differences(summary, ds.described[j], scale=scale))]
    if not found:
        return None
    return {"n": len(found), "of": len(names), "first": {"image": found[0][0], "notes": found[0][1]}}


def unlike_training_text(unlike: dict) -> str:
    """The warning and report line of :attr:`BenchmarkData.unlike_training`."""
    return (f"{unlike['n']} of {unlike['of']} images are unlike the model's training images as its card records "
            f"them (the first, {unlike['first']['image']}: {'; '.join(unlike['first']['notes'])})")


def _check_limit(limit: int | None) -> None:
    """``limit``: None (all) or at least 1 (0 or a negative count is refused, not read as all or as a slice)."""
    if limit is not None and limit < 1:
        raise NemtError(f"--limit {limit!r}: expected a count of images >= 1 (or none, for all)")


def _method_explainers(methods: Sequence[str], clf, params: dict[str, dict], *, explainer_dir=None, seed: int = 0,
                      device: str = "cpu") -> dict[str, Any]:
    """The explainers of ``methods`` with their ``--param`` keywords: ``seed`` among them replaces ``seed`` for
    that method, ``device`` and ``path`` are refused (they are --device and --explainer); a method that cannot
    be built with its parameters is a :class:`NemtError` naming the method and the parameters."""
    from nemt.explainers import get_explainer
    out = {}
    for m in methods:
        kw = dict(params.get(m, {}))
        refuse_reserved(kw, prefix=f"{m}.")
        m_seed = kw.pop("seed", seed)
        with blamed_on_params(_param_text(m, params.get(m, {})), f"method {m!r} cannot be built"):
            out[m] = get_explainer(m, clf, path=explainer_dir if m in ("nemt", "nem") else None, seed=m_seed,
                                   device=device, **kw)
    return out


def _param_text(method: str, params: dict) -> str:
    return " ".join(f"{method}.{k}={v}" for k, v in params.items())


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
                                 {m: v[k].numpy() for m, v in maps.items()}, f"{it.image}: {it.label}",
                                 axcodes=data.axcodes[it.sample] if data.axcodes else None)
            figures.append((it.label, fig))
    return write_report(out, summary, metrics, title=title, facts=facts, gallery=figures,
                        markdown=markdown_summary(summary, metrics), notes=notes,
                        prototypes=prototype_section(data, picked, explainers))


def prototype_section(data: BenchmarkData, picked: Sequence, explainers: dict[str, Any]) -> str | None:
    """A prototype model's (Pantypes) own explanation for the report: the gallery's images, each with its 3
    nearest prototypes decoded (:func:`~nemt.explainers.prototypes.prototype_figure`), as a data URI;
    None for any other model, or 3D inputs."""
    from nemt.bench.report import _png
    from nemt.explainers.prototypes import prototype_figure
    from nemt.models.pantypes import is_pantypes

    model = next((getattr(e, "model", None) for e in explainers.values() if getattr(e, "model", None) is not None),
                 None)
    if model is None or not is_pantypes(model) or data.x.ndim != 4 or not picked:
        return None
    samples = list(dict.fromkeys(int(it.sample) for it in picked))
    return _png(prototype_figure(model, data.x[samples], k=3, label_names=data.label_names))


DEFAULT_METHODS = ("nemt", "gradcam++", "ig", "gradshap", "rise", "extremal", "random", "sobel")


def split_method_params(items: Sequence[str], metrics: bool = True) -> dict[str, dict]:
    """``["rise.n_masks=2000", "faithfulness_estimate.batch_size=64"]`` -> ``{"rise": {"n_masks": 2000}, ...}``
    (``metrics=False``: a command that takes methods' parameters only, and says so when one is malformed)."""
    from nemt.params import parse_params
    out: dict[str, dict] = {}
    for item in items:
        head, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise NemtError(f"--param {item!r}: expected METHOD.KEY=VALUE"
                            + (" (or METRIC.KEY=VALUE)" if metrics else "") + ", e.g. rise.n_masks=2000")
        out.setdefault(head, {}).update(parse_params([rest]))
    return out


def benchmark_model(model_dir: Path, data_path: Path, out: Path, *, explainer_dir: Path | None = None,
                    methods: Sequence[str] = DEFAULT_METHODS, metrics: Sequence[str] = DEFAULT_METRICS,
                    split: str = "test", limit: int | None = None, batch_size: int = 16, gallery: int = 6,
                    params: dict[str, dict] | None = None, seed: int = 0, device: str = "cpu",
                    progress: bool = True, restart: bool = False, open_data: Callable | None = None,
                    metric_workers: int = 0, shard: tuple[int, int] | None = None, merge: bool = False,
                    superpixelify: str | Path | Sequence[str | Path] | None = None,
                    gaze: str | Path | bool | None = None) -> dict:
    """``nemt benchmark``: a trained model's split of its data set, every method, every metric, the report.

    ``gaze``: a fixation CSV (:mod:`nemt.data.gaze`; default: ``gaze.csv`` beside the data set's manifest,
    when there is one; ``False``: no gaze, even if there is one). With gaze, the default metrics also score the maps against it
    (:data:`GAZE_METRICS`: KL divergence from the gaze heat map, NSS at the fixations).
    ``metric_workers``: see :func:`run_benchmark` (default 0: metrics serial in the calling thread).
    ``superpixelify``: one or several segment sources (:func:`~nemt.clustering.load_segmenter`): a folder
    written by ``nemt clusters --out`` (the model's activation clusters), ``nas:K`` (per-image neuro-activated
    superpixels) or ``slic:N``; every method then also runs superpixelified
    (:class:`~nemt.clustering.Superpixelified`), as ``METHOD@clusters``, ``METHOD@nas``, ``METHOD@slic``, each
    next to its raw maps.
    """
    from nemt.explainers.fast import inference_copy
    from nemt.models import load_model
    from nemt.models.training import load_splits

    params = dict(params or {})
    if "prototypes" in methods:  # scored as attributions: the explainer's default maps (decoded prototypes) are images
        given = params.get("prototypes", {})
        if given.get("kind") == "decoded":
            raise NemtError("--param prototypes.kind=decoded: decoded prototypes are images of what a class looks "
                            "like, not attributions of the input, and the benchmark's metrics do not apply to them; "
                            "the benchmark scores kind=contribution (leave kind out)")
        params["prototypes"] = {"kind": "contribution", **given}
    _check_limit(limit)
    out = Path(out)
    if shard is not None and merge:
        raise NemtError("give --shard or --merge, not both: --shard I/N runs one share of the items; --merge, once "
                        "every share is done, collects them and writes the results, summary and report")
    if shard is not None:
        _check_shard(shard)
        if not restart:  # refused before any work (--restart removes them, after every check passed)
            refuse_shards_of_another_count(out, int(shard[1]))
    clf = load_model(model_dir, device=device)
    if open_data is None:
        from nemt.data.manifest import open_dataset
        kw = {"labels": list(clf.label_names)} if clf.task == "multiclass" else {}
        manifest = open_dataset(data_path, task=clf.task, **kw)
    else:
        manifest = open_data(data_path, clf)
    manifest.raise_problems()
    splits = load_splits(model_dir, manifest)
    splits["all"] = list(range(len(manifest.samples)))  # every image, as `nemt explain --split all`
    rows = split_rows(splits, split, model_dir)
    if gaze is False:  # told to leave out a gaze.csv beside the manifest
        gaze = None
    elif gaze is None or gaze is True:
        from nemt.data.gaze import default_gaze_path
        found = default_gaze_path(manifest)
        gaze = found if found.is_file() else None
    elif not Path(gaze).is_file():
        raise NemtError(f"{gaze}: --gaze: fixation file not found")
    if gaze is not None and list(metrics) == list(DEFAULT_METRICS):
        metrics = list(metrics) + list(GAZE_METRICS)
    metrics = check_metrics(metrics, gaze=gaze is not None)
    metric_params = {m: params.pop(m) for m in list(params) if m in metrics}
    unknown = [k for k in params if k not in methods]
    if unknown:
        raise NemtError(f"--param for {unknown}: neither a chosen method ({list(methods)}) nor metric ({metrics})")
    check_metric_params(metrics, metric_params)  # keys, types, counts: before anything is built
    if "nemt" in methods and explainer_dir is None:
        raise NemtError("method 'nemt' needs --explainer DIR (from `nemt fit`); or leave it out of --methods")
    explainers = _method_explainers(methods, clf, params, explainer_dir=explainer_dir, seed=seed, device=device)
    data = load_benchmark_data(clf, manifest, rows, device=device, limit=limit, gaze=gaze)
    fast = inference_copy(clf)
    if any(metric_params.values()):  # the values, by one trial call of each metric given parameters
        check_metric_params(metrics, metric_params, probe=_metric_probe(data, fast), seed=seed)
    if data.other_data:
        _say(other_data_warning(data.other_data, data_path, model_dir, split, manifest))
    if data.unlike_training:
        _say(f"warning: {unlike_training_text(data.unlike_training)}")
    cfg = RunConfig(list(methods), list(metrics), batch_size, seed, metric_params, params)
    fitted = {m: explainer_checksum(explainer_dir) for m in methods if m in ("nemt", "nem")}
    sources = [] if superpixelify is None else (
        [superpixelify] if isinstance(superpixelify, (str, Path)) else list(superpixelify))
    if sources:  # each method, then its superpixelified maps
        from nemt.clustering import Superpixelified, load_segmenter, segmenter_checksum
        segmenters = {}
        for src in sources:
            seg = load_segmenter(src, clf, seed=seed)
            if seg.tag in segmenters:
                raise NemtError(f"--superpixelify {src}: a second source of kind {seg.tag!r} "
                                f"(after {segmenters[seg.tag][0]}); give one of each kind")
            segmenters[seg.tag] = (str(src), seg, segmenter_checksum(src))
        both: dict[str, Any] = {}
        cfg.method_params = dict(cfg.method_params)  # the caller's --param dict stays as given
        for m, ex in explainers.items():
            both[m] = ex
            for tag, (src, seg, seg_sum) in segmenters.items():
                sp = f"{m}@{tag}"
                both[sp] = Superpixelified(ex, seg)
                cfg.method_params[sp] = {**params.get(m, {}), "superpixelify": src}
                fitted[sp] = f"{fitted.get(m, '')}+{seg_sum}"
        explainers = both
        cfg.methods = list(explainers)
    if restart:  # forget earlier results in this folder, now that every check passed
        clear_run(out, shard, keep_shards=merge)
    if merge:  # shards of another run than this one are refused before anything is written
        added = merge_shards(out, metrics, expect=run_key(clf, data, explainers, cfg, explainer_sha256=fitted))
        console.print(f"merged {added} rows from {out / 'shards'}", highlight=False)
    card = clf.card
    record = {"split": split, "limit": limit, "data_set_sha256": manifest.fingerprint(),
              "model_config": {"arch": card.arch, "task": card.task, "labels": list(clf.label_names),
                               "input_size": list(card.input_size), "in_channels": card.in_channels,
                               "training_seed": (getattr(card, "training", None) or {}).get("seed")}}
    summary = run_benchmark(clf, data, explainers, cfg, out, progress=progress, metric_model=fast,
                            explainer_sha256=fitted, metric_workers=metric_workers, shard=shard, record=record)
    if shard is not None:
        return summary
    facts = {"model": f"{model_dir} ({clf.card.arch}, {clf.task}, labels {', '.join(clf.label_names)})",
             "data": f"{data_path}, {split} split: {len({it.sample for it in data.items})} images, "
                     f"{len(data.items)} items ({items_without_ground_truth(data)} without ground truth: no mask "
                     "or an empty one, excluded from the localisation means)",
             "input": f"{clf.card.in_channels} x {'x'.join(map(str, clf.card.input_size))}",
             "device": f"{device}, {__import__('torch').get_num_threads()} threads", "seed": str(seed),
             "methods": ", ".join(methods), "parameters": json.dumps(params) if params else "defaults",
             "metric parameters": json.dumps(metric_params) if any(metric_params.values()) else "defaults"}
    if data.other_data:
        facts["data check"] = other_data_fact(data.other_data)
    if data.unlike_training:
        facts["inputs"] = unlike_training_text(data.unlike_training)
    if sources:
        facts["superpixelify"] = "; ".join(f"METHOD@{tag}: {src}" for tag, (src, _, _) in segmenters.items()) + \
            " (maps averaged within the segments of each image)"
    if data.fixations is not None:
        n_gaze = int((data.fixations.flatten(1).sum(1) > 0).sum())
        facts["gaze"] = (f"{gaze}: fixations on {n_gaze} of {data.x.shape[0]} images (heat maps: a box of 0.8 % and "
                         "a Gaussian of 5.9 % of the width per fixation, min-max; KL and NSS are NaN without gaze)")
    report_run(out, data, explainers, summary, metrics, title="nemt benchmark", facts=facts, gallery=gallery,
               seed=seed, notes=dataset_metric_notes(out))
    return summary


def _check_shard(shard: tuple[int, int]) -> None:
    i, n = int(shard[0]), int(shard[1])
    if not 0 <= i < n:
        raise NemtError(f"--shard {i}/{n}: expected I/N with 0 <= I < N")


def split_rows(splits: dict[str, Sequence[int]], split: str, model_dir: str | Path) -> list[int]:
    """The manifest rows of ``split`` (from :func:`~nemt.models.training.load_splits`, ``all`` included); an
    unknown split, or an empty one, is a :class:`NemtError` naming the split and the model's ``splits.csv``."""
    if split not in splits:
        raise NemtError(f"--split must be one of {sorted(splits)}, got {split!r}")
    rows = [int(i) for i in splits[split]]
    if not rows:
        source = Path(model_dir) / "splits.csv"
        if not source.is_file():
            source = Path(model_dir) / "model.json"  # the split recomputed from the card's seed and fractions
        sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items() if k != "all")
        raise NemtError(f"--split {split}: the model's {split} split is empty ({source}: {sizes} images); "
                        f"choose another --split{' (all: every image)' if 'all' in splits else ''}")
    return rows


def items_without_ground_truth(data: BenchmarkData) -> int:
    """Items whose mask is missing or empty: what the localisation metrics leave out (NaN) and the summary
    counts as "without ground truth"."""
    nonempty = data.gt.flatten(1).any(1)
    return sum(not bool(nonempty[it.sample]) for it in data.items)


def other_data_fact(other: dict) -> str:
    """The report's line for a run on other data than the model's (:attr:`BenchmarkData.other_data`)."""
    return (f"not the data the model was trained on (this manifest's sha256 {other['data_sha256'][:16]}..., the "
            f"model card's data.sha256 {other['model_data_sha256'][:16]}... of {other.get('model_data_source')}): "
            "an evaluation on other data (external validation)")


def other_data(clf, manifest_sha256: str) -> dict | None:
    """Both checksums and the model's data source when a manifest (its ``fingerprint()``) is not the data the
    model card records (``data.sha256``); None when it is, or when the card records none."""
    recorded = (getattr(clf.card, "data", None) or {}).get("sha256")
    if recorded is None or recorded == manifest_sha256:
        return None
    return {"data_sha256": manifest_sha256, "model_data_sha256": recorded,
            "model_data_source": clf.card.data.get("source")}


def other_data_warning(other: dict, data_path, model_dir, split: str, manifest,
                       doing: str = "evaluating on it anyway (external validation), recorded in run.json and the "
                                    "report") -> str:
    """The warning of a run on other data than the model's: both checksums, and where the split came from
    (:func:`~nemt.models.training.load_splits` applies the model's ``splits.csv`` when its image names are
    found at the same rows of this data)."""
    if split == "all":
        how = "--split all takes every image of it"
    elif (Path(model_dir) / "splits.csv").is_file():
        how = (f"its {split} split is the model's {Path(model_dir) / 'splits.csv'}, applied by image name (this data "
               "has the same names at the same rows, so those rows are taken, whatever the images now are)")
    else:
        how = f"its {split} split is recomputed from the model card's seed and fractions over this data"
    return (f"warning: {data_path} is not the data {model_dir} was trained on: its manifest's sha256 is "
            f"{other['data_sha256']}, the model card records data.sha256 {other['model_data_sha256']} "
            f"({other.get('model_data_source')}); {doing}; {how}")


def dataset_metric_notes(out: Path) -> list[str]:
    """One line per method and dataset-level metric from ``out/dataset_metrics.json`` (e.g. MaxBoxAcc per IoU
    threshold and the best map threshold), for the report."""
    path = Path(out) / "dataset_metrics.json"
    if not path.is_file():
        return []
    lines = []
    for method, per in json.loads(path.read_text()).items():
        for metric_name, d in per.items():
            if "max_box_acc" in d and d["max_box_acc"]:
                accs = " / ".join(f"{v:.3f}" for v in d["max_box_acc"].values())
                taus = " / ".join(f"{v:.2f}" for v in d["best_threshold"].values())
                lines.append(f"{method}: {metric_name} = {d['max_box_acc_v2']:.3f}, MaxBoxAcc at IoU "
                             f"{' / '.join(d['max_box_acc'])} = {accs} (best map thresholds {taus}; {d['n']} maps; "
                             "its interval in the table is conditional on these thresholds)")
    return lines
