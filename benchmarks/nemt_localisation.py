"""Localisation of NEMt explainers against lesion masks, next to Grad-CAM(++) and reference maps.

Scores the test-split images that have a non-empty mask, explaining each
image's true label: relevance mass and relevance rank accuracy (higher is
better), the mean map value ("area"), and for NEMt the mean |change| of the
target probability when its mask is deleted. A centred Gaussian blob is
given the same mean value as the first NEMt explainer's maps.

    python benchmarks/nemt_localisation.py --model runs/busi-r18 --data ../shared/data/busi \
        --explainers runs/nemt-default,runs/nemt-mean [--markdown out.md]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from nemt.data import ImageDataset, open_dataset
from nemt.explainers import NEMt, get_explainer
from nemt.metrics import relevance_mass, relevance_rank
from nemt.models import load_model
from nemt.models.training import load_splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--explainers", default="", help="comma-separated NEMt explainer folders")
    ap.add_argument("--split", default="test")
    ap.add_argument("--baselines", default="gradcam,gradcam++,gaussian,random,sobel")
    ap.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)

    clf = load_model(args.model)
    manifest = open_dataset(args.data, labels=clf.label_names if clf.task == "multiclass" else None)
    idx = load_splits(args.model, manifest)[args.split]
    ds = ImageDataset(manifest, clf.preprocessing, idx)
    batch = ds.stacked()
    keep = batch["gt"].flatten(1).any(1)
    x, y, gt = batch["image"][keep], batch["y"][keep], batch["gt"][keep]
    print(f"{len(x)} {args.split} images with a non-empty mask (of {len(ds)})")

    rows = []

    def score(name: str, explain, extra: dict | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        maps = torch.cat([explain(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)])
        ms = 1000 * (time.perf_counter() - t0) / len(x)
        rm, rr = relevance_mass(maps, gt), relevance_rank(maps, gt)
        row = {"method": name, "relevance_mass": float(rm.nanmean()), "relevance_rank": float(rr.nanmean()),
               "mean_map": float(maps.mean()), "ms_per_image": ms, **(extra or {})}
        rows.append(row)
        print(json.dumps(row))
        return maps

    area = None
    for d in [p for p in args.explainers.split(",") if p]:
        ex = NEMt.load(d, clf)
        loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]
        val = ex.validate(loader)
        maps = score(f"nemt:{Path(d).name}", lambda a, b: ex.explain(a, target=b),
                     {"deleted_area": val["area"], "target_change": val["change"]})
        if area is None:
            area = float(maps.mean())
    for name in [b for b in args.baselines.split(",") if b]:
        params = {"area": area} if name == "gaussian" and area else {}
        ex = get_explainer(name, clf, **params)
        label = f"gaussian(area={area:.3f})" if name == "gaussian" and area else name
        score(label, lambda a, b: ex.explain(a, target=b))

    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    lines = ["| method | relevance mass | relevance rank | mean map value | deleted area | target change | ms/image |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda k: f"{r[k]:.3f}" if isinstance(r.get(k), float) and not math.isnan(r[k]) else "–"
        lines.append(f"| {r['method']} | {fmt('relevance_mass')} | {fmt('relevance_rank')} | {fmt('mean_map')} | "
                     f"{fmt('deleted_area')} | {fmt('target_change')} | {r['ms_per_image']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(table + "\n\n")


if __name__ == "__main__":
    main()
