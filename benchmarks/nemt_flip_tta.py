"""Does averaging NEMt's map with the map of the flipped image (test-time augmentation) point better?

Validation split only (a choice, not a report): for each fitted explainer, the images with a lesion mask are
explained for their true class as they are ("plain"), flipped along the last axis and flipped back
("flip-only"), and the mean of the two ("tta"); pointing game (Quantus' rule) and relevance mass.

    OMP_NUM_THREADS=1 python benchmarks/nemt_flip_tta.py --model runs/busi-r18 --data ../shared/data/busi \\
        --explainer runs/busi3-nemt-s0 --explainer runs/busi3-nemt-s1 --explainer runs/busi3-nemt-s2
    OMP_NUM_THREADS=1 python benchmarks/nemt_flip_tta.py --model runs/demo4-0/model --data runs/demo4-0/data \\
        --explainer runs/demo4-0/explainer          # (and demo4-1, demo4-2 with their own model and data)

Figures and the decision (not adopted: twice the cost) in docs/known-gaps.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nemt.data import open_dataset
from nemt.data.dataset import ImageDataset
from nemt.explainers import get_explainer
from nemt.metrics import get_metric
from nemt.models import load_model
from nemt.models.training import load_splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--explainer", type=Path, action="append", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)  # an entry point may
    clf = load_model(args.model)
    manifest = open_dataset(args.data)
    ds = ImageDataset(manifest, clf.preprocessing, load_splits(args.model, manifest)["val"])
    st = ds.stacked()
    keep = st["has_gt"].bool() & st["gt"].flatten(1).any(1)  # images with a lesion (normal ones: none)
    x, gt, t = st["image"][keep], st["gt"][keep], st["y"][keep].long()[:, None]
    b = args.batch_size
    print("| explainer | images | pointing game: plain / flip-only / tta | relevance mass: plain / flip-only / tta |")
    print("|---|---|---|---|")
    for path in args.explainer:
        ex = get_explainer("nemt", clf, path=path)
        plain = torch.cat([ex.explain(x[i:i + b], target=t[i:i + b]) for i in range(0, len(x), b)])
        xf = x.flip(-1)
        flip = torch.cat([ex.explain(xf[i:i + b], target=t[i:i + b]) for i in range(0, len(x), b)]).flip(-1)
        maps = (plain, flip, (plain + flip) / 2)
        pg = [get_metric("pointing_game").call({"maps": m, "gt": gt}).nanmean().item() for m in maps]
        rm = [get_metric("relevance_mass").call({"maps": m, "gt": gt}).nanmean().item() for m in maps]
        print(f"| {path} | {len(x)} | " + " / ".join(f"{v:.3f}" for v in pg) + " | "
              + " / ".join(f"{v:.3f}" for v in rm) + " |", flush=True)


if __name__ == "__main__":
    main()
