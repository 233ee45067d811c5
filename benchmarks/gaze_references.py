"""How KL divergence and NSS against the simulated gaze score reference maps that need no model (issue 17).

Issue 17 asks mask guidance (and MIMIC) to make maps more plausible against eye gaze: KL divergence from the
gaze heat map lower and NSS at the fixations higher. This script asks what the two metrics reward at all, with
maps that need no model: the lesion mask itself (the map a perfectly "right for the right reasons" model would
give), the lesion mask blurred by the gaze heat map's own Gaussian, a uniform map, random noise, and the gaze
heat map itself (KL 0 by definition), next to the plain model's Grad-CAM++ for scale. Images with a finding
only (those without one have no lesion mask), on a ``benchmarks/guided_gaze.py`` seed folder (its data, gaze
file, split and ``plain`` model):

    OMP_NUM_THREADS=1 python benchmarks/gaze_references.py --run runs/guided-gaze-epyc/s0 --size 48
    OMP_NUM_THREADS=1 python benchmarks/gaze_references.py --run runs/guided-busi-epyc/s0 --size 64 \\
        --data ../shared/data/busi

Also printed: the share of the gaze heat map's mass inside the lesion mask. The metrics are nemt's
(``kl_divergence``: the MIT saliency benchmark's ``Σ G log(eps + G / (S + eps))`` after min-max
normalisation, so a map's minimum is 0 wherever it lies; ``nss``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nemt.data import ImageDataset, open_dataset
from nemt.data.gaze import SIGMA_FRACTION, gaze_targets, match_fixations, read_fixations
from nemt.explainers import get_explainer
from nemt.metrics.gaze import kl_divergence, nss
from nemt.models import load_model
from nemt.models.training import load_splits
from nemt.ops import gaussian_blur


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a guided_gaze.py seed folder (plain/, data/ or --data)")
    ap.add_argument("--size", type=int, required=True, help="the models' input size (px)")
    ap.add_argument("--data", type=Path, help="the data set, when not RUN/data (then the gaze file is RUN/../gaze.csv"
                                              " or RUN/gaze.csv)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--seed", type=int, default=0, help="the random map's draws")
    args = ap.parse_args()

    data = args.data or args.run / "data"
    candidates = [data / "gaze.csv", args.run / "gaze.csv", args.run.parent / "gaze.csv"]
    gaze_file = next((p for p in candidates if p.is_file()), None)
    if gaze_file is None:
        raise SystemExit(f"no gaze.csv in any of {[str(p) for p in candidates]}")
    manifest = open_dataset(data)
    plain = load_model(args.run / "plain")
    idx = load_splits(args.run / "plain", manifest)[args.split]
    matched, _ = match_fixations(manifest, read_fixations(gaze_file), gaze_file)
    heat, fix, _ = gaze_targets(manifest, idx, (args.size, args.size), matched)
    st = ImageDataset(manifest, plain.preprocessing, idx).stacked()
    has = st["gt"].flatten(1).any(1)
    x, y, gt = st["image"][has], st["y"][has], st["gt"][has].float()
    heat, fix = heat[has], fix[has]
    g = torch.Generator().manual_seed(args.seed)
    jitter = 1e-6 * torch.rand(gt.shape, generator=g)  # breaks a mask's ties so that min-max keeps it a mask

    inside = (heat * gt).flatten(1).sum(1) / heat.flatten(1).sum(1)
    print(f"{args.run} ({args.split}, {len(x)} images with a finding, gaze {gaze_file}): "
          f"{inside.mean():.2f} of the gaze heat map's mass lies in the lesion mask")
    rows = {
        "gaze heat map itself": heat.clone(),
        "uniform": 1 + 1e-3 * torch.rand(gt.shape, generator=g),
        "random": torch.rand(gt.shape, generator=g),
        "lesion mask": gt + jitter,
        "lesion mask, blurred as the gaze": gaussian_blur(gt, SIGMA_FRACTION * args.size) + jitter,
        "plain model, Grad-CAM++": get_explainer("gradcam++", plain).explain(x, target=y[:, None]).detach(),
    }
    print("| map | KL ↓ | NSS ↑ |\n|---|---|---|")
    for name, maps in rows.items():
        print(f"| {name} | {kl_divergence(maps, heat).nanmean():.3f} | {nss(maps, fix).nanmean():.3f} |")


if __name__ == "__main__":
    main()
