"""Mean and standard deviation over seeds of benchmark runs (each run's summary.json: per-method means).

    python benchmarks/seed_summary.py runs/busi-bench-s0 runs/busi-bench-s1 runs/busi-bench-s2 \
        [--metrics relevance_mass,relevance_rank,pointing_game] [--markdown out.md]

For each method and metric: the mean over runs of the run's mean, ± the sample standard deviation over
runs (n - 1), and the number of runs that had the method. A method present in one run only (a
deterministic baseline computed once) shows its single value without a spread.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--metrics", default="relevance_mass,relevance_rank,pointing_game")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    metrics = [m for m in args.metrics.split(",") if m]
    values: dict[str, dict[str, list[float]]] = {}
    for run in args.runs:
        summary = json.loads((Path(run) / "summary.json").read_text())
        for method, s in summary.items():
            for m in metrics + ["ms"]:
                v = s.get(m)
                v = v.get("mean") if isinstance(v, dict) else v
                if isinstance(v, (int, float)):
                    values.setdefault(method, {}).setdefault(m, []).append(float(v))
    lines = ["| method | runs | " + " | ".join(metrics) + " | ms / image |",
             "|---|---|" + "---|" * (len(metrics) + 1)]
    for method, per in values.items():
        cells = []
        for m in metrics + ["ms"]:
            xs = per.get(m, [])
            if not xs:
                cells.append("–")
            elif len(xs) == 1:
                cells.append(f"{xs[0]:.3f}" if m != "ms" else f"{xs[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if m != "ms"
                             else f"{statistics.mean(xs):.1f}")
        n = max(len(v) for v in per.values())
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
