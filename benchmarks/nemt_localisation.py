"""Localisation of NEMt explainers against lesion masks, next to Grad-CAM(++) and reference maps.

Scores the split's images that have a non-empty mask, explaining each
image's true label (see ``nemt.bench.localisation``). A centred Gaussian blob
gets, for each NEMt explainer, the same mean value as its maps.

    python benchmarks/nemt_localisation.py --model runs/busi-r18 --data ../shared/data/busi \
        --explainers runs/ablation/default,runs/ablation/adamw [--markdown out.md] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nemt.bench.localisation import markdown_table, score_methods
from nemt.data import ImageDataset, open_dataset
from nemt.explainers import NEMt
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
    ds = ImageDataset(manifest, clf.preprocessing, load_splits(args.model, manifest)[args.split])
    b = ds.stacked()
    nemt = {f"nemt:{Path(d).name}": NEMt.load(d, clf) for d in args.explainers.split(",") if d}
    rows = score_methods(clf, b["image"], b["y"], b["gt"], nemt, [n for n in args.baselines.split(",") if n])
    print(f"{rows[0]['n_images']} {args.split} images with a non-empty mask; "
          f"{rows[0]['excluded_empty_gt']} without one excluded")
    table = markdown_table(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(table + "\n\n")


if __name__ == "__main__":
    main()
