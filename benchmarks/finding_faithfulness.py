"""Pointing at the finding or following the model: per finding kind, on a fitted NEMt's run (issue 11).

The demo's pointing-game gap (NEMt below Gradient SHAP) is all on the "opacity" phantoms: nodules and cysts
are hit by both. This script asks whether NEMt misses the opacities because its maps are wrong about the
classifier, or because the classifier's evidence for "opacity" is not confined to the opacity's mask. On one
run (a model, its data, a fitted NEMt), the split's images with a finding, each explained for its label:

- per finding kind and method: pointing game (Quantus' rule, no tolerance), deletion and insertion AUC
  (probability of the label; blurred substrate, 50 steps: the benchmark's faithfulness settings);
- the same two curves for **the finding mask itself used as a map** (its pixels first, the interior before
  the rim, then the rest by distance to the finding): how fast deleting the finding removes the evidence;
- what deleting NEMt's own fixed-area masks (1 / 5 / 10 %, by the fit's fill) does to every class's logit,
  next to deleting the finding's mask (dilated by the smoothing box) by the same fill, and the share of
  NEMt's mask that lies on the finding.

    OMP_NUM_THREADS=1 python benchmarks/finding_faithfulness.py --model runs/demo4-0/model \\
        --data runs/demo4-0/data --explainer runs/demo4-0/explainer --limit 60 [--methods gradshap,ig]
    OMP_NUM_THREADS=1 python benchmarks/finding_faithfulness.py --model runs/busi-r18 --data ../shared/data/busi \
        --explainer runs/busi-s0 --methods extremal,gradshap --param extremal.steps=150

A lower deletion AUC than the finding mask's means the map removes the label's evidence faster than
deleting the finding does: the evidence is (also) elsewhere, and a map that follows the model cannot point
into the finding every time.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from nemt.data import ImageDataset, open_dataset
from nemt.explainers import get_explainer
from nemt.bench.runner import split_method_params
from nemt.explainers.nemt.losses import deletion_kinds, game_fills, nested_masks
from nemt.metrics import pointing_game
from nemt.metrics.localisation import pointing_game_expected
from nemt.metrics.faithfulness import deletion_auc, insertion_auc
from nemt.models import load_model
from nemt.models.training import load_splits


def finding_map(gt: torch.Tensor, box: int = 9, passes: int = 6) -> torch.Tensor:
    """The finding mask as a map (B, 1, H, W): 1 + a share of a blurred mask on it (interior before rim), and
    the blurred mask's tail outside it (nearer pixels first)."""
    soft = gt.float()
    k = torch.ones(1, 1, box, box) / box ** 2
    for _ in range(passes):
        soft = F.conv2d(F.pad(soft, [box // 2] * 4, mode="replicate"), k)
    return gt.float() + 0.5 * soft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--explainer", required=True, help="a fitted NEMt (nested objective)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--limit", type=int, default=None, help="the split's first N images (the benchmark's --limit)")
    ap.add_argument("--methods", default="gradshap,ig", help="baselines to compare, comma-separated")
    ap.add_argument("--param", action="append", default=[], help="METHOD.KEY=VALUE, as `nemt benchmark --param`")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    clf = load_model(args.model)
    names = clf.label_names
    manifest = open_dataset(args.data, labels=names)
    idx = load_splits(args.model, manifest)[args.split]
    idx = idx[: args.limit] if args.limit else idx
    st = ImageDataset(manifest, clf.preprocessing, idx).stacked()
    has = st["gt"].flatten(1).any(1)
    x, y, gt = st["image"][has], st["y"][has], st["gt"][has]
    t = y.view(-1, 1)
    params = split_method_params(args.param)
    # a fitted NEMt with its card's parameters; --param nemt.map_smoothing / nemt.map_areas change its map
    nemt = get_explainer("nemt", clf, path=args.explainer, **params.pop("nemt", {}))
    maps = {"finding mask": finding_map(gt),
            "nemt": torch.cat([nemt.explain(x[i:i + 16], target=y[i:i + 16]) for i in range(0, len(x), 16)])}
    for m in [m for m in args.methods.split(",") if m]:
        ex = get_explainer(m, clf, seed=args.seed, **params.get(m, {}))
        maps[m] = torch.cat([ex.explain(x[i:i + 16], target=y[i:i + 16]) for i in range(0, len(x), 16)])
    kinds = [c for c in range(len(names)) if bool((y == c).any())]
    print(f"{args.split} split, {len(x)} images with a finding: "
          + ", ".join(f"{names[c]} {int((y == c).sum())}" for c in kinds) + "\n")
    print("| map | " + " | ".join(f"{names[c]} pg / del ↓ / ins ↑" for c in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    plateaus = []
    for name, m in maps.items():
        pg = pointing_game(m, gt)[:, 0]
        one = pointing_game_expected(m, gt)[:, 0]  # one point per map: a plateau of tied maxima counts its share
        d = deletion_auc(clf, x, m, target=t, baseline="blur")[:, 0]
        i = insertion_auc(clf, x, m, target=t, baseline="blur")[:, 0]
        cells = [f"{float(pg[y == c].mean()):.3f} / {float(d[y == c].mean()):.3f} / {float(i[y == c].mean()):.3f}"
                 for c in kinds]
        print(f"| {name} | " + " | ".join(cells) + " |")
        if name != "finding mask" and not torch.allclose(pg, one):
            plateaus.append(f"{name}: " + ", ".join(f"{names[c]} {float(one[y == c].mean()):.3f}" for c in kinds))
    if plateaus:
        print("\nPointing game with one point per map (tied maxima share it; the table counts any of them in the "
              "finding as a hit, Quantus' rule): " + "; ".join(plateaus))

    fills = deletion_kinds(game_fills(nemt.occlusion)[0][0])  # the fit's deletion fill(s)
    how = fills[0] if len(fills) == 1 else " or ".join(fills) + ", the fit's game: the lower target logit"
    print(f"\nDeleting NEMt's fixed-area masks ({how}): mean change of each logit, per finding kind")
    print("| finding | deleted | fill | share on the finding | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))

    def changes(xs, keep, c, z0):
        """Logit change per fill, and (several fills) per image the fill that lowers logit c more."""
        dz = {f: clf(nemt._occlude(xs, keep, f)) - z0 for f in fills}
        if len(fills) > 1:
            stack = torch.stack([dz[f] for f in fills])  # (fills, n, outputs)
            pick = stack[:, :, c].argmin(0)
            dz["lower"] = stack.gather(0, pick.view(1, -1, 1).expand(1, *stack.shape[1:]))[0]
        return dz

    with torch.no_grad():
        logits, _ = nemt._logits(x)
        z0 = clf(x)
        g = (nemt.module_.smoothing(gt.float()) > 0).float()  # the finding, dilated by the smoothing box
        for c in kinds:
            s = y == c
            rows = []
            for area in (0.01, 0.05, 0.1):
                m = nested_masks(logits[s, c], torch.full((int(s.sum()),), area), hard=True).unsqueeze(1)
                m = nemt.module_.smoothing(m)
                on = float(((m * gt[s]).flatten(1).sum(1) / m.flatten(1).sum(1)).mean())
                rows.append((f"NEMt {area:.0%}", f"{on:.2f}", changes(x[s], 1 - m, c, z0[s])))
            rows.append((f"the finding ({float(g[s].mean()):.1%} of the image)", "1.00",
                         changes(x[s], 1 - g[s], c, z0[s])))
            for what, on, dz in rows:
                for f, d in dz.items():
                    print(f"| {names[c]} | {what} | {f} | {on} | " + " | ".join(f"{float(v):+.2f}" for v in d.mean(0))
                          + " |")


if __name__ == "__main__":
    main()
