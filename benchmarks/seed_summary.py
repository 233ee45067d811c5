"""Mean and standard deviation over seeds of benchmark runs (each run's summary.json: per-method means).

    python benchmarks/seed_summary.py runs/busi-bench-s0 runs/busi-bench-s1 runs/busi-bench-s2 \
        [--metrics relevance_mass,relevance_rank,pointing_game] [--markdown out.md] \
        [--allow-other-data] [--allow-duplicates]

For each method and metric: the mean over runs of the run's mean, ± the sample standard deviation over
runs (n - 1), and the number of runs that had the method. Where a metric has a value in fewer of them (a
metric not scored in every run, or undefined in one), its cell says over how many (``n = 2``). A method
present in one run only (a deterministic baseline computed once) shows its single value without a spread.

Only runs that differ in their seed are averaged. Each run's run.json must record the same split, limit,
number of items, batch size, metric parameters, parameters of the methods they share (the settings each
ran with, defaults included, where every run.json records them: ``map_smoothing=false`` given equals a default
of false; a fitted explainer's fit settings too; else the parameters as given), model configuration
(architecture, task, labels, input size) and data set (the manifest's checksum; ``--allow-other-data`` for
pipelines that make their data with the seed, such as ``nemt demo --seed S``). What may vary is what the
seed makes: the model's weights, the fitted explainers, the rows of the split. A run is one replicate: its
model (weights checksum), fitted explainers and benchmark seed; the same replicate twice (a folder given
twice, or a copy) is refused unless ``--allow-duplicates``. A run.json written before nemt recorded the
split, limit, data set and model configuration cannot be checked for them: the script says so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from nemt.errors import NemtError

#: run.json fields that must be equal between the runs, with their names in an error
ALIKE = (("split", "split"), ("limit", "limit"), ("items", "number of items"), ("batch_size", "batch size"),
         ("metric_params", "metric parameters"), ("model_config", "model configuration"),
         ("data_set_sha256", "data set (manifest checksum)"))
#: the fields an older run.json lacks
RECORDED_SINCE = ("split", "limit", "data_set_sha256", "model_config")


def read_run(path: str | Path) -> tuple[dict, dict]:
    """(run.json, summary.json) of a finished benchmark folder; a clear error naming the file otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise NemtError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}; give the --out "
                        "folders of finished `nemt benchmark` runs")
    out = []
    for name in ("run.json", "summary.json"):
        f = folder / name
        if not f.is_file():
            raise NemtError(f"{f}: missing; is {folder} the --out folder of a finished `nemt benchmark` run?")
        try:
            out.append(json.loads(f.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            raise NemtError(f"{f}: not valid JSON ({exc})") from None
        if not isinstance(out[-1], dict):
            raise NemtError(f"{f}: expected a JSON object, got {type(out[-1]).__name__}")
    return out[0], out[1]


def check_alike(runs: list[tuple[str, dict]], *, allow_other_data: bool = False,
                allow_duplicates: bool = False) -> list[str]:
    """Refuse runs that differ in more than their seed (see the module docstring); returns notes (fields an
    older run.json does not record, so not checked)."""
    seen: dict[str, tuple[str, object]] = {}
    for path, meta in runs:
        for key, what in ALIKE:
            if key not in meta or (key == "data_set_sha256" and allow_other_data):
                continue
            value = meta[key]
            if key == "model_config" and isinstance(value, dict):  # the classifier's own training seed is one of
                value = {k: v for k, v in value.items() if k != "training_seed"}  # the seeds replicates vary
            if key not in seen:
                seen[key] = (path, value)
            elif seen[key][1] != value:
                hint = "; --allow-other-data if each seed makes its own data" if key == "data_set_sha256" else ""
                raise NemtError(f"{path}: another {what} than {seen[key][0]} ({value!r}, there "
                                f"{seen[key][1]!r}); only runs that differ in their seed are averaged{hint}")
    params: dict[str, tuple[str, object]] = {}
    settled = {m for m in {m for _, meta in runs for m in (meta.get("method_params") or {})}
               if all(m in (meta.get("method_settings") or {}) for _, meta in runs if m in (meta.get("method_params") or {}))}
    for path, meta in runs:  # the settings each method ran with where every run records them, else as given
        given = meta.get("method_params") or {}
        for method, p in {m: (meta["method_settings"][m] if m in settled else p) for m, p in given.items()}.items():
            if method not in params:
                params[method] = (path, p)
            elif params[method][1] != p:
                raise NemtError(f"{path}: other parameters of {method} than {params[method][0]} ({p!r}, there "
                                f"{params[method][1]!r}); only runs that differ in their seed are averaged")
    replicas: dict[str, str] = {}
    for path, meta in runs:
        ident = json.dumps([meta.get("model_sha256"), meta.get("explainer_sha256"), meta.get("seed")], sort_keys=True)
        if ident in replicas and not allow_duplicates:
            raise NemtError(f"{path} and {replicas[ident]} are the same replicate (seed {meta.get('seed')} of the "
                            f"same model, weights {str(meta.get('model_sha256'))[:16]}..., and explainers): give each "
                            "seed once, or --allow-duplicates to count both")
        replicas.setdefault(ident, path)
    old = [path for path, meta in runs if any(k not in meta for k in RECORDED_SINCE)]
    return [f"note: {', '.join(old)}: run.json written before nemt recorded the split, limit, data set and model "
            "configuration; those are not checked for it"] if old else []


def _value(s: dict, metric: str):
    v = s.get(metric)
    v = v.get("mean") if isinstance(v, dict) else v
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def summary_table(summaries: list[dict], metrics: list[str]) -> str:
    """The Markdown table: per method, its run count, then mean ± sd over runs per metric (``n = k`` where a
    metric has a value in fewer runs than the method), then ms / image."""
    known = sorted({k for s in summaries for entry in s.values() if isinstance(entry, dict) for k in entry
                    if k not in ("ms", "n_items")})
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise NemtError(f"--metrics: {unknown} in none of the runs' summaries; they have {known}")
    methods = list(dict.fromkeys(m for s in summaries for m in s))
    lines = ["| method | runs | " + " | ".join(metrics) + " | ms / image |",
             "|---|---|" + "---|" * (len(metrics) + 1)]
    partial = False
    for method in methods:
        mine = [s[method] for s in summaries if isinstance(s.get(method), dict)]
        cells = []
        for m in metrics + ["ms"]:
            xs = [v for v in (_value(s, m) for s in mine) if v is not None]
            if not xs:
                cells.append("–")
                continue
            if len(xs) == 1:
                text = f"{xs[0]:.3f}" if m != "ms" else f"{xs[0]:.1f}"
            else:
                text = (f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if m != "ms"
                        else f"{statistics.mean(xs):.1f}")
            if len(xs) < len(mine):
                text += f" (n = {len(xs)})"
                partial = True
            cells.append(text)
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    if partial:
        lines += ["", "n: the runs with a value of that metric, where fewer than the method's runs (a metric not "
                      "scored in every run, or undefined in one); –: in none."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--metrics", default="relevance_mass,relevance_rank,pointing_game")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--allow-other-data", action="store_true",
                    help="average runs on different data sets (each seed makes its own, e.g. nemt demo --seed S)")
    ap.add_argument("--allow-duplicates", action="store_true",
                    help="count the same replicate (model, explainers and seed) more than once")
    args = ap.parse_args(argv)
    try:
        metrics = list(dict.fromkeys(m.strip() for m in args.metrics.split(",") if m.strip()))
        if not metrics:
            raise NemtError(f"--metrics {args.metrics!r}: no metric named")
        runs = [(run, *read_run(run)) for run in args.runs]
        notes = check_alike([(p, meta) for p, meta, _ in runs], allow_other_data=args.allow_other_data,
                            allow_duplicates=args.allow_duplicates)
        table = summary_table([s for _, _, s in runs], metrics)
        if args.markdown:
            from nemt.files import atomic_open
            with atomic_open(args.markdown, "w", encoding="utf-8") as fh:
                fh.write(table + "\n")
    except NemtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for n in notes:
        print(n, file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
