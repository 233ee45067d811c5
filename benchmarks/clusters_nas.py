"""Activation clusters (NAVE / NAS, issue 16) on the phantoms and on BUSI: the figures of docs/guide.md.

    python benchmarks/clusters_nas.py phantoms [--k 12] [--out runs/clusters/phantoms-k12]
    python benchmarks/clusters_nas.py busi [--k 12] [--out runs/clusters/busi-k12]

Each run (seed 0, k clusters and segments, default 12, the model's last 3 stages, k-means, the defaults of
`nemt clusters`) takes under 10 minutes on one thread:

1. `nemt clusters` on the model's training split, mapped on its test split (OUT/clusters: clustering, label
   and uncertainty maps, report.html with the cluster gallery): per finding, the IoU with the finding's mask
   of the best data-set cluster, of the best cluster per image, of the best SLIC segment (at least k
   segments) and of the best per-image NAS segment (k-means on each image's own activations with as many
   clusters as SLIC gave that image: equal segment counts);
2. `nemt benchmark` on the test split with NEMt and Grad-CAM++, raw and superpixelified with the three
   segmentations (`--superpixelify OUT/clusters --superpixelify nas:K --superpixelify slic:K`; rows
   METHOD@clusters, METHOD@nas, METHOD@slic), scored by MaxBoxAccV2 (dataset-level), relevance mass and
   pointing game (OUT/benchmark).

It prints both tables and writes them to OUT/figures.md. What it needs (made once, not timed here):

- phantoms: runs/demo3-0 from `nemt demo --seed 0 --out runs/demo3-0` (1000 phantoms of 96 px, smallcnn,
  NEMt; the README's demo), or `--model/--data/--explainer` of your own;
- busi: runs/busi-r18 (`nemt train ... --out runs/busi-r18`) and runs/busi3-nemt-s0 (`nemt fit ... --seed 0`),
  data ../shared/data/busi (docs/results.md's BUSI section).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PRESETS = {
    "phantoms": {"model": "runs/demo3-0/model", "data": "runs/demo3-0/data", "explainer": "runs/demo3-0/explainer",
                 "out": "runs/clusters/phantoms-k{k}"},
    "busi": {"model": "runs/busi-r18", "data": "../shared/data/busi", "explainer": "runs/busi3-nemt-s0",
             "out": "runs/clusters/busi-k{k}"},
}
METRICS = ["max_box_acc_v2", "relevance_mass", "pointing_game"]


def localisation_table(loc: dict) -> str:
    lines = ["| finding | images | best data-set cluster (IoU) | best cluster per image | clusters per image | "
             "NAS per image, best segment | NAS segments | SLIC, best segment | SLIC segments |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in loc.items():
        lines.append(f"| {name} | {r['n']} | {r['best_cluster']} ({r['fixed']:.3f}) | {r['per_image']:.3f} | "
                     f"{r['clusters_per_image']:.1f} | {r['nas']:.3f} | {r['nas_segments_per_image']:.1f} | "
                     f"{r['slic']:.3f} | {r['slic_segments_per_image']:.1f} |")
    return "\n".join(lines) + "\n"


def box_table(out: Path) -> str:
    summary = json.loads((out / "summary.json").read_text())
    details = json.loads((out / "dataset_metrics.json").read_text())
    lines = ["| method | MaxBoxAccV2 | MaxBoxAcc@0.3 | @0.5 | @0.7 | best tau (0.3/0.5/0.7) | relevance mass | "
             "pointing game | ms / image |", "|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        d = details[method]["max_box_acc_v2"]
        acc = list(d["max_box_acc"].values())
        taus = "/".join(f"{v:.2f}" for v in d["best_threshold"].values())
        lines.append(f"| {method} | {d['max_box_acc_v2']:.3f} | {acc[0]:.3f} | {acc[1]:.3f} | {acc[2]:.3f} | {taus} | "
                     f"{s['relevance_mass']['mean']:.3f} | {s['pointing_game']['mean']:.3f} | {s['ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--model"), ap.add_argument("--data"), ap.add_argument("--explainer"), ap.add_argument("--out")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="test images at most (default: the whole split)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)  # an entry point: it may set the thread count
    from nemt.bench.clusters import run_clusters
    from nemt.bench.runner import benchmark_model

    p = {k: getattr(args, k) or v for k, v in PRESETS[args.preset].items()}
    out = Path(p["out"].format(k=args.k))
    t0 = time.perf_counter()
    summary = run_clusters(p["model"], p["data"], out / "clusters", k=args.k, seed=args.seed, limit=args.limit,
                           progress=False)
    t1 = time.perf_counter()
    k = args.k
    benchmark_model(Path(p["model"]), Path(p["data"]), out / "benchmark", explainer_dir=Path(p["explainer"]),
                    methods=["nemt", "gradcam++"], metrics=METRICS, limit=args.limit, seed=args.seed,
                    superpixelify=[str(out / "clusters"), f"nas:{k}", f"slic:{k}"], progress=False, gallery=4)
    t2 = time.perf_counter()
    loc = localisation_table(summary["localisation"])
    box = box_table(out / "benchmark")
    text = (f"# Activation clusters: {args.preset} (seed {args.seed}, k = {k}, layers "
            f"{', '.join(summary['layers'])}, grid {'x'.join(map(str, summary['grid']))})\n\n"
            f"Clusters fitted on {summary['fit_images']} training images, mapped on {summary['images']} test images "
            f"({t1 - t0:.0f} s). IoU with the finding's mask, mean over that finding's test images with a mask:\n\n"
            f"{loc}\nMaxBoxAccV2 on the test split, raw and superpixelified maps ({t2 - t1:.0f} s):\n\n{box}\n"
            f"Reports: {out / 'clusters' / 'report.html'}, {out / 'benchmark' / 'report.html'}\n")
    (out / "figures.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
