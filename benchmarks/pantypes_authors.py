"""The authors' own Pantypes code on the planted-modes benchmark (issue 17): is the missing mode coverage ours?

``benchmarks/pantypes_modes.py`` finds that neither nemt's Pantypes nor its ablation covers all three
planted modes. This script asks whether that is our implementation: it runs the public code of
Kjærsgaard, Boubekki & Clemmensen (https://github.com/RuneDK93/pantypes, ``model.py``: their ProtoVAE with
the volume loss, their MNIST encoder and decoder, their similarity, KL and volume terms, their
initialisation) on the same planted-modes data, with and without the volume loss, and scores it with the
same coverage figures (``pantypes_modes.coverage_of``).

Nothing of their code is copied here: ``--authors-repo`` names a checkout of their repository, whose
``model.py`` is imported as it is. Their modules read their settings with ``from settings import *``
(an argparse module); this script puts a ``settings`` module in ``sys.modules`` first with the figures
below (their MNIST settings where they apply: latent 256, 5 prototypes per class, all loss weights 1,
Adam for every part at one rate; the data set's images scaled to [-1, 1] as their MNIST transform does).
Their ``train_and_test.py`` cannot run on current torch (it calls ``np.array`` on tensors that require
grad), so the training step is written out here, term for term as theirs: cross-entropy + MSE
reconstruction + their KL term + ``--volume-weight`` x their volume loss, the forward in training mode
with ``is_train=True`` (which, as in their code, still uses ``z = mu``: ``~True`` is -2).

    python benchmarks/pantypes_authors.py --authors-repo PATH --out runs/pantypes-authors --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pantypes_modes import MODES, coverage_of, planted_modes  # noqa: E402

from nemt.files import atomic_open, write_json  # noqa: E402
from nemt.ops import seeded  # noqa: E402


def authors_model(repo: Path, *, batch_size: int, lr: float, epochs: int, volume_weight: float):
    """Their ``model`` module, imported from ``repo`` under settings for 2 classes of 28 px images."""
    settings = types.ModuleType("settings")
    settings.__dict__.update(data_name="mnist", mode="train", img_size=28, latent=256, num_prototypes=10,
                             num_classes=2, batch_size=batch_size, lr=lr, num_train_epochs=epochs,
                             coefs={"crs_ent": 1, "recon": 1, "kl": 1, "vol": volume_weight, "orth": 0})
    sys.modules["settings"] = settings
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    if "model" in sys.modules:
        return importlib.reload(sys.modules["model"])
    return importlib.import_module("model")


@torch.no_grad()
def _figures(net, x: torch.Tensor, y: torch.Tensor, modes: torch.Tensor, latent: int) -> tuple[torch.Tensor, dict]:
    net.eval()
    mu = torch.cat([net.features(x[i:i + 256])[:, :latent] for i in range(0, len(x), 256)])
    s = net.calc_sim_scores(mu)
    return s, coverage_of(mu, s, 5, y, modes)


def run(seed: int, volume_weight: float, args: argparse.Namespace) -> dict:
    mod = authors_model(args.authors_repo, batch_size=args.batch_size, lr=args.lr, epochs=args.epochs,
                        volume_weight=volume_weight)
    xtr, ytr, mtr = planted_modes(args.n_normal, args.n_finding, 28, seed=2 * seed)
    xte, yte, mte = planted_modes(args.n_normal // 2, args.n_finding // 2, 28, seed=2 * seed + 1)
    xtr, xte = (xtr - 0.5) / 0.5, (xte - 0.5) / 0.5
    history = []
    t0 = time.time()
    with seeded(seed):
        net = mod.ProtoVAE()
        opt = torch.optim.Adam([{"params": net.features.parameters()}, {"params": net.prototype_vectors},
                                {"params": net.decoder_layers.parameters()},
                                {"params": net.last_layer.parameters()}], lr=args.lr)
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(args.epochs):
            net.train()
            totals = np.zeros(5)
            order = torch.randperm(len(xtr), generator=gen)
            for k in range(0, len(xtr), args.batch_size):
                idx = order[k:k + args.batch_size]
                xb, yb = xtr[idx], ytr[idx]
                out, decoded, kl, vol, *_ = net(xb, yb, True, False)
                ce, rec = F.cross_entropy(out, yb), F.mse_loss(decoded, xb)
                loss = ce + rec + kl + volume_weight * vol
                opt.zero_grad()
                loss.backward()
                opt.step()
                totals += np.array([ce.item(), rec.item(), kl.item(), vol.item(), 1.0])
            _, cov = _figures(net, xtr, ytr, mtr, mod.latent)
            mean = totals[:4] / totals[4]
            history.append({"epoch": epoch + 1, "ce": round(float(mean[0]), 4), "reconstruction": round(float(mean[1]), 4),
                            "kl": round(float(mean[2]), 4), "volume_loss": float(f"{mean[3]:.3g}"),
                            "n_covered": cov["n_covered"], "dead": cov["dead"]})
        _, cov = _figures(net, xtr, ytr, mtr, mod.latent)
        with torch.no_grad():
            net.eval()
            pred = net.last_layer(net.calc_sim_scores(net.features(xte)[:, :mod.latent])).argmax(1)
    norms = net.prototype_vectors.detach().norm(dim=1)
    return {"seed": seed, "volume_weight": volume_weight, "accuracy": round(float((pred == yte).float().mean()), 4),
            **cov, "prototype_norm": [round(float(v), 2) for v in norms],
            "history": history, "seconds": round(time.time() - t0, 1)}


def summary(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    lines = [f"The authors' Pantypes code ({args.authors_repo}) on planted modes: {args.n_normal} normal + "
             f"{args.n_finding} finding training images, {args.epochs} epochs, batch {args.batch_size}, Adam "
             f"{args.lr}; {seconds:.0f} s wall", "",
             "| seed | volume weight | test acc | modes covered | cells (disc/bar/ring per prototype) | dead (of 10) "
             "| volume loss, epochs 1 / last | latent 5-NN same mode |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = " ".join("/".join(map(str, c)) for c in r["cells"])
        pur = " / ".join(f"{r['latent_5nn_same_mode'][k]:.2f}" for k in MODES)
        lines.append(f"| {r['seed']} | {r['volume_weight']:g} | {r['accuracy']:.3f} | {r['n_covered']} "
                     f"({', '.join(r['covered']) or '-'}) | {cells} | {r['dead']} | "
                     f"{r['history'][0]['volume_loss']:.3g} / {r['history'][-1]['volume_loss']:.3g} | {pur} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--authors-repo", type=Path, required=True,
                   help="a checkout of https://github.com/RuneDK93/pantypes (its model.py is imported)")
    p.add_argument("--out", type=Path, default=Path("runs/pantypes-authors"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--volume-weights", default="1,0", help="1: Pantypes; 0: its ablation (ProtoVAE, no orthogonality)")
    p.add_argument("--n-normal", type=int, default=200)
    p.add_argument("--n-finding", type=int, default=400)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="the authors' MNIST rate")
    args = p.parse_args()
    if not (args.authors_repo / "model.py").is_file():
        p.error(f"--authors-repo {args.authors_repo}: no model.py there (a checkout of RuneDK93/pantypes)")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for s in args.seeds.split(","):
        for w in args.volume_weights.split(","):
            rows.append(run(int(s), float(w), args))
            r = rows[-1]
            print(f"seed {s} volume {w}: acc {r['accuracy']:.3f} covered {r['covered']} cells {r['cells']} "
                  f"dead {r['dead']} ({r['seconds']:.0f}s)", flush=True)
    text = summary(rows, args, time.time() - t0)
    write_json(args.out / "results.json", {"settings": {k: str(v) if isinstance(v, Path) else v
                                                        for k, v in vars(args).items()}, "results": rows})
    with atomic_open(args.out / "summary.md", "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
