"""Choose NEMt's map areas on the validation split (never the test split), for fitted explainers.

The nested objective's logits rank every pixel; the map is the mean of the
nested masks of ``map_areas``, so the areas can be chosen after fitting,
without a refit. For each explainer and each candidate set of areas, this
scores the validation images that have a lesion mask (each explained for its
true label): relevance mass, relevance rank, pointing game; and prints the
set with the highest relevance mass (ties: pointing game).

    python benchmarks/nemt_select.py --model runs/busi-r18 --data ../shared/data/busi \
        --explainers runs/busi-nemt-s0,runs/busi-nemt-s1 [--candidates "0.025,0.05,0.1,0.2;0.01,0.025,0.05"]
"""
from __future__ import annotations

import argparse
import json

import torch

from nemt.data import ImageDataset, open_dataset
from nemt.explainers import NEMt
from nemt.metrics import pointing_game, relevance_mass, relevance_rank
from nemt.models import load_model
from nemt.models.training import load_splits

CANDIDATES = "0.025,0.05,0.1,0.2;0.01,0.025,0.05,0.1;0.01,0.025,0.05;0.025,0.05;0.01,0.025;0.01;0.025;0.05;0.1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--explainers", required=True, help="comma-separated NEMt explainer folders")
    ap.add_argument("--split", default="val")
    ap.add_argument("--candidates", default=CANDIDATES, help="area sets separated by ';'")
    ap.add_argument("--json", default=None)
    ap.add_argument("--apply", action="store_true", help="re-save each explainer with the chosen map areas")
    args = ap.parse_args()
    clf = load_model(args.model)
    manifest = open_dataset(args.data, labels=clf.label_names if clf.task == "multiclass" else None)
    ds = ImageDataset(manifest, clf.preprocessing, load_splits(args.model, manifest)[args.split])
    b = ds.stacked()
    has = b["gt"].flatten(1).any(1)
    x, y, gt = b["image"][has], b["y"][has], b["gt"][has]
    print(f"{args.split} split: {len(x)} images with a lesion mask")
    rows = []
    print("| explainer | map areas | relevance mass | relevance rank | pointing game |\n|---|---|---|---|---|")
    for d in args.explainers.split(","):
        ex = NEMt.load(d, clf)
        for cand in args.candidates.split(";"):
            areas = [float(a) for a in cand.split(",")]
            ex.set_map_areas(areas)
            maps = torch.cat([ex.explain(x[i:i + 32], target=y[i:i + 32]) for i in range(0, len(x), 32)])
            r = {"explainer": d, "map_areas": areas, "relevance_mass": float(relevance_mass(maps, gt).nanmean()),
                 "relevance_rank": float(relevance_rank(maps, gt).nanmean()),
                 "pointing_game": float(pointing_game(maps, gt).nanmean())}
            rows.append(r)
            print(f"| {d} | {cand} | {r['relevance_mass']:.3f} | {r['relevance_rank']:.3f} | "
                  f"{r['pointing_game']:.3f} |")
    # the candidate with the best mean over explainers (seeds)
    by = {}
    for r in rows:
        by.setdefault(tuple(r["map_areas"]), []).append(r)
    best = max(by, key=lambda k: (sum(r["relevance_mass"] for r in by[k]) / len(by[k]),
                                  sum(r["pointing_game"] for r in by[k]) / len(by[k])))
    print(f"chosen on {args.split}: --map-areas {','.join(map(str, best))}")
    if args.apply:
        for d in args.explainers.split(","):
            NEMt.load(d, clf).set_map_areas(list(best)).save(d)
            print(f"{d}: map areas set to {list(best)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "chosen": list(best)}, fh, indent=2)


if __name__ == "__main__":
    main()
