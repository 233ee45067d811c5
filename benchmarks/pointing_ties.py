"""How much of a method's pointing game is its plateau of tied maxima (BUSI test split, true label).

Quantus' ``PointingGame`` (nemt's ``pointing_game``, default ``ties="any"``) counts a hit when *any* of the
pixels that share the map's maximum lies in the lesion. A clamped mask (extremal perturbation's) has a
plateau of hundreds of such pixels, so it is scored on whether the plateau touches the lesion; a continuous
map (NEMt's, Grad-CAM++'s) has one maximum. ``ties="expected"`` scores the plateau's share in the lesion
(the hit expected when the tie is broken at random), which equals the pointing game for a single maximum.
This prints both, the plateau's size, relevance mass, and the pointing game of each map's top-k pixels as a
plateau ("top-k any": the same rule applied to every map at one plateau size).

    OMP_NUM_THREADS=1 python benchmarks/pointing_ties.py --out runs/ties \\
        --method nemt-s0=nemt:path=runs/busi3-nemt-s0 --method extremal=extremal:steps=150 ...

Each method's maps are cached in OUT/NAME.safetensors (a rerun only scores); the table goes to OUT/table.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nemt.params import parse_value


def parse_method(spec: str):
    """``NAME=METHOD[:k=v,k=v]`` -> (NAME, METHOD, {k: v}); ``student_map=areas@0.01`` sets a student's map."""
    name, _, rest = spec.partition("=")
    method, _, params = rest.partition(":")
    kw = {k: parse_value(v) for k, v in (p.split("=", 1) for p in params.split(",") if p)}
    return name, method, kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/busi-r18")
    ap.add_argument("--data", default="../shared/data/busi")
    ap.add_argument("--split", default="test")
    ap.add_argument("--method", action="append", required=True, help="NAME=METHOD[:k=v,...] (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--topk", default="16,64,164,256")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from nemt.bench.runner import load_benchmark_data
    from nemt.data.manifest import open_dataset
    from nemt.explainers import get_explainer
    from nemt.metrics import pointing_game, relevance_mass
    from nemt.models import load_model
    from nemt.models.training import load_splits
    from nemt.ops import seeded

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clf = load_model(args.model)
    man = open_dataset(args.data, task=clf.task, labels=list(clf.label_names))
    bd = load_benchmark_data(clf, man, load_splits(args.model, man)[args.split])
    idx = torch.tensor([it.sample for it in bd.items])
    t = torch.tensor([it.target for it in bd.items])
    gt = bd.gt[idx].flatten(1)
    has = torch.tensor([it.has_gt for it in bd.items]) & gt.any(1)   # images with a lesion (normal ones: none)
    gt = gt[has]                                                      # (N, P) lesion masks
    ks = [int(k) for k in args.topk.split(",")]
    head = ["method", "n", "relevance mass", "pointing game (ties any)", "pointing game (ties expected)",
            "tied maxima (median)"] + [f"top-{k} any" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in args.method:
        name, method, kw = parse_method(spec)
        cache = out / f"{name}.safetensors"
        if cache.exists():
            maps = load_file(str(cache))["maps"]
        else:
            student_map = kw.pop("student_map", None)
            ex = get_explainer(method, clf, **kw)
            if student_map:
                kind, _, area = student_map.partition("@")
                ex.set_student_map(kind, [float(area)] if area else None)
            t0 = time.time()
            with seeded(args.seed):
                maps = torch.cat([ex.explain(bd.x[idx[i:i + 8]], target=t[i:i + 8]).detach()
                                  for i in range(0, len(idx), 8)])
            print(f"{name}: {len(idx)} maps in {time.time() - t0:.0f} s", flush=True)
            save_file({"maps": maps.float().contiguous()}, str(cache))
        maps = maps[has].float()
        m1 = gt[:, None].reshape(len(gt), 1, *maps.shape[2:])
        rm = relevance_mass(maps, m1)[:, 0].nanmean().item()
        pg_any = pointing_game(maps, m1)[:, 0].nanmean().item()
        pg_exp = pointing_game(maps, m1, ties="expected")[:, 0].nanmean().item()
        f = maps.flatten(1)
        tied = (f == f.amax(-1, keepdim=True)).sum(-1).float().median().item()
        tops = [torch.gather(gt, 1, f.topk(k, -1).indices).any(-1).float().mean().item() for k in ks]
        row = [name, str(len(f)), f"{rm:.3f}", f"{pg_any:.3f}", f"{pg_exp:.3f}", f"{tied:.0f}"] + [f"{v:.3f}" for v in tops]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
