"""What NEMt's games reward, and where its maps point, per class, on the validation split (a choice, not a report).

For each fitted explainer (``--explainer NAME=FOLDER``, all for the same model and data) and each class with a
finding mask, on the validation images of that class explained for their true class:

- localisation: relevance mass and pointing game (Quantus' rule) of the map;
- with ``--games``: the nested objective's two games at each training area, for the explainer's own nested masks
  and for a *finding-centred* ranking of the same areas (the finding first, then outward by distance), as
  s_del, s_pres (log-odds change in units of the clean evidence, see ``game_loss``) and the loss (with the
  explainer's own ``preservation_bound`` and ``preservation_weight``; before 2026-11-29 the weight was left at
  1 here, so docs/results.md's earlier loss figures of fits at weight 0.5 are weight-1 losses). Where the
  finding-centred masks score a lower loss than the explainer's own, the fit did not find the objective's
  optimum; where they score a higher one, the objective itself prefers the place the maps point at.

    OMP_NUM_THREADS=1 python benchmarks/nemt_games.py --model runs/demo4-1/model --data runs/demo4-1/data \\
        --explainer default=runs/demo4-1/explainer --explainer pb1=runs/demo4-1/explainer-pb1 --games

Figures and the decision in docs/results.md ("NEMt's objective").
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from nemt.data import open_dataset
from nemt.data.dataset import ImageDataset
from nemt.explainers import NEMt
from nemt.explainers.nemt.losses import game_loss
from nemt.metrics import pointing_game, relevance_mass
from nemt.models import load_model
from nemt.models.training import load_splits


def finding_ranking(gt: torch.Tensor, steps: int = 30) -> torch.Tensor:
    """A ranking that puts the finding first, then spreads outward (a max-filter flood of the mask), ties broken
    by a seeded jitter far below the flood's steps: logits whose top-a masks are centred on the finding."""
    g = gt.float().clone()
    pool = F.avg_pool3d if gt.ndim == 5 else F.avg_pool2d
    for _ in range(steps):
        g = torch.maximum(gt.float(), pool(g, 5, 1, 2))
    return g + 1e-4 * torch.rand(g.shape, generator=torch.Generator().manual_seed(0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--explainer", action="append", required=True, help="NAME=FOLDER (repeatable)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--games", action="store_true", help="also score the games at each training area")
    ap.add_argument("--as-occlusion", default=None,
                    help="score the games with this --occlusion instead of each explainer's own (no refit: what "
                         "another objective would reward for the same masks)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # an entry point may
    clf = load_model(args.model)
    manifest = open_dataset(args.data, labels=clf.label_names if clf.task == "multiclass" else None)
    ds = ImageDataset(manifest, clf.preprocessing, load_splits(args.model, manifest)[args.split])
    b = ds.stacked()
    has = b["gt"].flatten(1).any(1)
    print(f"{args.split} split: {int(has.sum())} images with a finding mask")
    print("| explainer | class | images | relevance mass | pointing game |\n|---|---|---|---|---|")
    games_rows = []
    for spec in args.explainer:
        name, folder = spec.split("=", 1)
        ex = NEMt.load(folder, clf)
        if args.as_occlusion:
            ex.occlusion = args.as_occlusion
            train = ImageDataset(manifest, clf.preprocessing, load_splits(args.model, manifest)["train"])
            ex._set_mean_image(train)  # a no-op unless the games play on the mean image
        ex.module_.eval()
        ex.module_.smoothing.generator = torch.Generator().manual_seed(0)  # the games' random smoothing
        rm_all, pg_all = [], []
        for c, label in enumerate(clf.label_names):
            idx = (has & (b["y"] == c)).nonzero().flatten()
            if len(idx) == 0:
                continue
            x, gt, t = b["image"][idx], b["gt"][idx], b["y"][idx]
            maps = torch.cat([ex.explain(x[i:i + 32], target=t[i:i + 32]) for i in range(0, len(x), 32)])
            rm, pg = relevance_mass(maps, gt), pointing_game(maps, gt)
            rm_all.append(rm)
            pg_all.append(pg)
            print(f"| {name} | {label} | {len(idx)} | {float(rm.nanmean()):.3f} | {float(pg.nanmean()):.3f} |")
            if args.games:
                with torch.no_grad():
                    logits, out = ex._logits(x)
                    ranks = {"own": logits, "finding": finding_ranking(gt).expand(-1, logits.shape[1], *gt.shape[2:])}
                    for kind, lg in ranks.items():
                        for a in ex.areas:
                            areas = torch.full((len(idx),), float(a))
                            md, mp, cl = ex._games(x, lg, out, t.view(-1, 1), areas)
                            loss, parts = game_loss(md, mp, cl, min_scale=ex.min_scale,
                                                    preservation_bound=ex.preservation_bound,
                                                    preservation_weight=ex.preservation_weight)
                            games_rows.append((name, label, kind, a, parts["s_del"], parts["s_pres"], float(loss)))
        print(f"| {name} | all | {int(sum(len(r) for r in rm_all))} | {float(torch.cat(rm_all).nanmean()):.3f} | "
              f"{float(torch.cat(pg_all).nanmean()):.3f} |")
    if games_rows:
        print("\nThe games (loss: each explainer's own objective), own nested masks vs finding-centred ones:\n")
        print("| explainer | class | masks | area | s_del | s_pres | loss |\n|---|---|---|---|---|---|---|")
        for r in games_rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:g} | {r[4]:+.2f} | {r[5]:+.2f} | {r[6]:.2f} |")


if __name__ == "__main__":
    main()
