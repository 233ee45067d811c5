"""Smoothed or unsmoothed NEMt map on signals: a validation check (rule: ``benchmarks/results/nemt_signal_map.md``).

For each seed, synthetic ECGs and the 1D ResNet of :mod:`ecg_clusters` (same data, split and training), then NEMt
fitted twice: with plain defaults (``NEMt(clf)``: the 1D box rule, map area 1 %, 10 epochs) and with the ECG
benchmark's own settings (graded map of every training area, an 11-sample box, 4 epochs). Each fit is scored on
the **validation** records with a finding (inverted T, wide QRS, ST elevation), its map smoothed and unsmoothed
(an explanation-time choice: the same fit). Prints per seed and the means; writes ``OUT/results.json``.

    OMP_NUM_THREADS=1 python benchmarks/nemt_signal_map.py --out runs/nemt-signal-map --seed 0 --n-seeds 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ecg_clusters import synthetic_classifier  # noqa: E402  (the benchmark's own data and CNN)

from nemt.explainers.nemt import NEMt  # noqa: E402
from nemt.files import atomic_open  # noqa: E402
from nemt.metrics import pointing_game, relevance_mass  # noqa: E402

CONFIGS = {"defaults": {}, "benchmark": {"map_areas": None, "kernel_size": 11, "epochs": 4}}


def score(nemt: NEMt, x: torch.Tensor, y: torch.Tensor, gt: torch.Tensor) -> dict:
    out = {}
    for smooth in (True, False):
        nemt.set_map_smoothing(smooth)
        with torch.no_grad():
            m = torch.cat([nemt.explain(x[i:i + 64], target=y[i:i + 64]) for i in range(0, len(x), 64)])
        out["smoothed" if smooth else "unsmoothed"] = {
            "pointing_game": float(pointing_game(m, gt).nanmean()),
            "relevance_mass": float(relevance_mass(m, gt).nanmean())}
    return out


def run(seed: int, args) -> dict:
    t0 = time.time()
    ecg, splits, x, y, _, clf = synthetic_classifier(args.n, 1, seed, args.epochs, 0.25)
    clf.eval()
    tr = torch.as_tensor(splits["train"])
    va = splits["val"]
    sel = va[np.flatnonzero(ecg.findings[va].any(1))]
    gt = torch.as_tensor(ecg.findings[sel])[:, None]
    res = {"seed": seed, "n_val_with_finding": int(len(sel))}
    data = torch.utils.data.TensorDataset(x[tr], y[tr])
    for name, kw in CONFIGS.items():
        nemt = NEMt(clf, seed=seed, batch_size=16, **kw).fit(data, progress=False, log=lambda s: None)
        res[name] = {"kernel_size": nemt.kernel_size_, **score(nemt, x[sel], y[sel], gt)}
    res["seconds"] = time.time() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/nemt-signal-map"))
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--n-seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000, help="synthetic records")
    ap.add_argument("--epochs", type=int, default=12, help="the CNN's (as ecg_clusters.py)")
    args = ap.parse_args()
    results = []
    for seed in range(args.seed, args.seed + args.n_seeds):
        r = run(seed, args)
        results.append(r)
        print(f"seed {seed} ({r['n_val_with_finding']} validation records with a finding, {r['seconds']:.0f} s): "
              + "; ".join(f"{c} (box {r[c]['kernel_size']}) " + ", ".join(
                  f"{m} pg {r[c][m]['pointing_game']:.3f} rm {r[c][m]['relevance_mass']:.3f}"
                  for m in ("smoothed", "unsmoothed")) for c in CONFIGS), flush=True)
    print("\n| NEMt | map | pointing game (mean over seeds) | relevance mass |\n|---|---|---|---|")
    for c in CONFIGS:
        for m in ("smoothed", "unsmoothed"):
            pg = [r[c][m]["pointing_game"] for r in results]
            rm = [r[c][m]["relevance_mass"] for r in results]
            print(f"| {c} | {m} | {np.mean(pg):.3f} ({' / '.join(f'{v:.3f}' for v in pg)}) | "
                  f"{np.mean(rm):.3f} ({' / '.join(f'{v:.3f}' for v in rm)}) |")
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out / "results.json") as f:
        json.dump({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
