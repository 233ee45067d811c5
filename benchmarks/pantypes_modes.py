"""Do Pantypes' prototypes cover a class's rare modes? (issue 17; Kjærsgaard, Boubekki & Clemmensen, AAAI 2024)

Data: 28 px nemt phantoms (``nemt.data.phantoms``, normal ones: body, lungs, heart, spine, texture, noise)
in two classes. ``normal`` is the phantom alone; ``finding`` is a phantom with one planted finding of
three *modes* in fixed proportions 80 / 15 / 5 %: a bright disc (mode 0), a bright horizontal bar
(mode 1), a dark ring (mode 2), each of random position and size and contrast 0.4. The phantom's own
findings are 1-2 px wide at 28 px, too small for modes anyone could see; the planted ones are 5-14 px.
Training set: 200 normal + 400 finding (320 / 60 / 20); test set (other phantoms, other draws):
100 normal + 200 finding (160 / 30 / 10).

Per seed, three models on the same tensors:

- ``pantypes``: :class:`nemt.models.pantypes.Pantypes` (5 prototypes per class, latent 256, all loss
  weights 1, z sampled in training) trained by :func:`~nemt.models.pantypes.fit_pantypes` (Adam);
- ``no-volume``: the same with the volume loss off (``volume_weight=0``: ProtoVAE without its
  orthogonality term, the paper's ablation);
- ``smallcnn``: the plain CNN of the zoo, cross-entropy, Adam 1e-3.

Coverage (precise): each training image of class ``finding`` is assigned to the most similar of the
class's 5 prototypes (its *cell*; ``z = mu``, eval mode). A prototype *represents* mode ``m`` when its
cell holds at least ``--min-cell`` (5) images and more than half of them are of mode ``m``; a mode is
*covered* when some prototype represents it. A prototype whose cell is empty covers nothing (the paper's
"prototype with no nearest training sample", counted over all classes as ``dead``). Also reported: the
test accuracy, the recall of each mode on the test set (finding images called ``finding``), and how well
the latent space separates the modes at all (``latent 5-NN``: per mode, the share of each training
image's 5 nearest class-mates in mu that are of its own mode; chance is the mode's share).

Settings where the paper is silent or the budget decides: ``--lr 5e-3`` (the paper's 1e-3 is the
default of the library; at 30 epochs of 600 images it leaves the prototypes far from the data), 30
epochs, batch 16, latent 256 (the paper's for 28 px data), encoder width 16 (the paper: 32).
``--z-train mu`` trains with ``z = mu`` (``Pantypes(sample=False)``, what the public codes run; the
default ``sampled`` is the papers' ``mu + sigma * eps``, which leaves the similarities ~1/(L sigma^2)
and the classifier untrained at this budget).

Outputs under ``--out``: ``results.json`` (every figure per seed and model), ``summary.md`` (the tables
printed at the end) and ``prototypes-S.png`` (each variant's decoded ``finding`` prototypes, titled with
their cells' mode counts).

    OMP_NUM_THREADS=1 python benchmarks/pantypes_modes.py --out runs/pantypes-modes --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nemt.data.phantoms import make_phantoms
from nemt.files import atomic_path, write_json
from nemt.models.pantypes import Pantypes, fit_pantypes
from nemt.models.zoo import build_model
from nemt.ops import seeded
from nemt.visualize import subplots

MODES = ("disc", "bar", "ring")
SHARES = (0.80, 0.15, 0.05)
CONTRAST = 0.4


# ----------------------------------------------------------------------------- data

def _planted(n: int, size: int, mode: int, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) intensity changes of one mode, soft-edged (1 px), centred within 15 % of the middle."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        cy, cx = size / 2 + rng.uniform(-0.15, 0.15, 2) * size
        if mode == 0:  # bright disc, radius 17-24 % of the size
            r = rng.uniform(0.17, 0.24) * size
            out[i] = np.clip(r + 0.5 - np.hypot(yy - cy, xx - cx), 0, 1) * CONTRAST
        elif mode == 1:  # bright horizontal bar, half-height 7-11 %, half-width 28-36 %
            h, w = rng.uniform(0.07, 0.11) * size, rng.uniform(0.28, 0.36) * size
            out[i] = np.clip(h + 0.5 - abs(yy - cy), 0, 1) * np.clip(w + 0.5 - abs(xx - cx), 0, 1) * CONTRAST
        else:  # dark ring, radius 17-24 %, about 3 px wide
            r = rng.uniform(0.17, 0.24) * size
            out[i] = -np.clip(1.8 - abs(np.hypot(yy - cy, xx - cx) - r), 0, 1) * CONTRAST
    return out


def planted_modes(n_normal: int, n_finding: int, size: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (N, 1, size, size) in [0, 1], labels (N,) (0 normal, 1 finding) and modes (N,) (-1 for normal).

    The finding class is split 80 / 15 / 5 % over the modes (rounded, the rest to mode 0).
    """
    rng = np.random.default_rng(seed)
    counts = [int(round(s * n_finding)) for s in SHARES]
    counts[0] = n_finding - sum(counts[1:])
    total = n_normal + n_finding
    # half of them normal; the margin (60, or 5 % for large sets) keeps the default sets as they were
    ps = make_phantoms(2 * total + max(60, total // 20), size, findings=("nodule",), seed=seed)
    bg = ps.images[ps.labels == 0][:total, 0]
    if len(bg) < total:
        raise RuntimeError(f"only {len(bg)} normal phantoms for {total} images; raise the margin")
    images = bg.copy()
    labels = np.zeros(total, np.int64)
    modes = np.full(total, -1, np.int64)
    start = n_normal
    for m, c in enumerate(counts):
        images[start:start + c] = np.clip(images[start:start + c] + _planted(c, size, m, rng), 0, 1)
        labels[start:start + c], modes[start:start + c] = 1, m
        start += c
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels), torch.from_numpy(modes)


# ----------------------------------------------------------------------------- figures of a model

@torch.no_grad()
def _latent(net: Pantypes, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    return torch.cat([net.encode(x[i:i + 256])[0] for i in range(0, len(x), 256)])


@torch.no_grad()
def coverage(net: Pantypes, x: torch.Tensor, y: torch.Tensor, modes: torch.Tensor, *, cls: int = 1,
             min_cell: int = 5, knn: int = 5) -> dict:
    """The coverage figures of the module docstring for class ``cls`` on training images x, y, modes."""
    mu = _latent(net, x)
    return coverage_of(mu, net.similarities(mu), net.per_class, y, modes, cls=cls, min_cell=min_cell, knn=knn)


@torch.no_grad()
def coverage_of(mu: torch.Tensor, s: torch.Tensor, m: int, y: torch.Tensor, modes: torch.Tensor, *, cls: int = 1,
                min_cell: int = 5, knn: int = 5) -> dict:
    """:func:`coverage` from latent means ``mu`` (N, L), similarities ``s`` (N, K * m) to every prototype
    (class k's are columns k * m .. k * m + m - 1) and ``m`` prototypes per class: for any prototype model."""
    sel = y == cls
    cell = s[sel][:, cls * m:(cls + 1) * m].argmax(1)
    mo = modes[sel]
    cells, represents = [], []
    for j in range(m):
        counts = torch.bincount(mo[cell == j], minlength=len(MODES)).tolist()
        cells.append(counts)
        n = sum(counts)
        best = int(np.argmax(counts))
        represents.append(best if n >= min_cell and counts[best] > n / 2 else None)
    nearest = s.argmax(1)  # over every prototype of every class
    dead = int(s.shape[1] - len(torch.unique(nearest)))
    d = torch.cdist(mu[sel], mu[sel])
    d.fill_diagonal_(float("inf"))
    nn_modes = mo[d.topk(knn, largest=False).indices]
    same = (nn_modes == mo[:, None]).float().mean(1)
    purity = {MODES[k]: round(float(same[mo == k].mean()), 3) for k in range(len(MODES))}
    covered = sorted({r for r in represents if r is not None})
    return {"covered": [MODES[k] for k in covered], "n_covered": len(covered), "cells": cells,
            "represents": [None if r is None else MODES[r] for r in represents], "dead": dead,
            "latent_5nn_same_mode": purity}


@torch.no_grad()
def test_figures(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, modes: torch.Tensor) -> dict:
    model.eval()
    pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    recall = {MODES[k]: round(float((pred[modes == k] == 1).float().mean()), 3) for k in range(len(MODES))}
    return {"accuracy": round(float((pred == y).float().mean()), 4),
            "normal_specificity": round(float((pred[y == 0] == 0).float().mean()), 3), "mode_recall": recall}


def train_smallcnn(x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, seed: int,
                   lr: float = 1e-3) -> torch.nn.Module:
    with seeded(seed):  # initial weights from the seed; the global generator is handed back unchanged
        net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=2)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def _figure(path: Path, nets: dict[str, Pantypes], covs: dict[str, dict], seed: int) -> None:
    rows = list(nets)
    m = next(iter(nets.values())).per_class
    fig, axes = subplots(len(rows), m, figsize=(1.8 * m, 2.1 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        imgs = nets[name].decoded_prototypes()[m:2 * m, 0].numpy()  # class 'finding'
        for j in range(m):
            ax = axes[r, j]
            ax.imshow(imgs[j], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("/".join(str(c) for c in covs[name]["cells"][j]), fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(f"seed {seed}: decoded 'finding' prototypes; cell counts disc/bar/ring", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


# ----------------------------------------------------------------------------- main

def run_seed(seed: int, args: argparse.Namespace, out: Path) -> dict:
    xtr, ytr, mtr = planted_modes(args.n_normal, args.n_finding, args.size, seed=2 * seed)
    xte, yte, mte = planted_modes(args.n_normal // 2, args.n_finding // 2, args.size, seed=2 * seed + 1)
    mean, std = float(xtr.mean()), float(xtr.std())
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    result: dict = {"seed": seed, "n_train": {MODES[k]: int((mtr == k).sum()) for k in range(3)},
                    "n_test": {MODES[k]: int((mte == k).sum()) for k in range(3)}}
    nets, covs = {}, {}
    for name, vol in (("pantypes", 1.0), ("no-volume", 0.0)):
        t0 = time.time()
        net = Pantypes(out_channels=2, input_size=(args.size, args.size), latent_dim=args.latent_dim,
                       width=args.width, volume_weight=vol, sample=args.z_train == "sampled",
                       distance=args.distance, volume_centred=args.volume_centred, volume_form=args.volume_form,
                       reconstruction_weight=args.reconstruction_weight, seed=seed)
        hist = fit_pantypes(net, xtr, ytr, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            seed=seed, mean=[mean], std=[std], restart_dead=args.restart_dead)
        cov = coverage(net, xtr, ytr, mtr, min_cell=args.min_cell)
        result[name] = {**test_figures(net, xte, yte, mte), **cov,
                        "last_epoch": {k: round(v, 5) for k, v in hist[-1].items()},
                        "seconds": round(time.time() - t0, 1)}
        nets[name], covs[name] = net, cov
        print(f"seed {seed} {name}: acc {result[name]['accuracy']:.3f} covered {cov['covered']} "
              f"cells {cov['cells']} dead {cov['dead']} ({result[name]['seconds']:.0f}s)", flush=True)
    t0 = time.time()
    cnn = train_smallcnn(xtr, ytr, epochs=args.epochs, batch_size=args.batch_size, seed=seed)
    result["smallcnn"] = {**test_figures(cnn, xte, yte, mte), "seconds": round(time.time() - t0, 1)}
    print(f"seed {seed} smallcnn: acc {result['smallcnn']['accuracy']:.3f} "
          f"({result['smallcnn']['seconds']:.0f}s)", flush=True)
    _figure(out / f"prototypes-{seed}.png", nets, covs, seed)
    return result


def summary(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    lines = [f"Pantypes mode coverage: {len(results)} seeds, {args.epochs} epochs, lr {args.lr}, batch "
             f"{args.batch_size}, latent {args.latent_dim}, width {args.width}, z in training {args.z_train}, "
             f"distance {args.distance}, volume {'centred' if args.volume_centred else 'from the origin'} "
             f"({args.volume_form}); train "
             f"{json.dumps(results[0]['n_train'])} + {args.n_normal} normal; {seconds:.0f} s wall", "",
             "| seed | model | test acc | disc / bar / ring recall | modes covered | cells (disc/bar/ring per "
             "prototype) | dead prototypes | latent 5-NN same mode |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name in ("pantypes", "no-volume", "smallcnn"):
            f = r[name]
            rec = " / ".join(f"{f['mode_recall'][k]:.2f}" for k in MODES)
            if name == "smallcnn":
                lines.append(f"| {r['seed']} | {name} | {f['accuracy']:.3f} | {rec} | | | | |")
                continue
            cells = " ".join("/".join(map(str, c)) for c in f["cells"])
            pur = " / ".join(f"{f['latent_5nn_same_mode'][k]:.2f}" for k in MODES)
            lines.append(f"| {r['seed']} | {name} | {f['accuracy']:.3f} | {rec} | {f['n_covered']} "
                         f"({', '.join(f['covered']) or '-'}) | {cells} | {f['dead']} | {pur} |")
    lines += ["", "| model | mean test acc | modes covered (per seed) | rare modes covered (bar, ring) |",
              "|---|---|---|---|"]
    for name in ("pantypes", "no-volume", "smallcnn"):
        acc = np.mean([r[name]["accuracy"] for r in results])
        if name == "smallcnn":
            lines.append(f"| {name} | {acc:.3f} | | |")
            continue
        per = [r[name]["n_covered"] for r in results]
        rare = sum(k in r[name]["covered"] for r in results for k in ("bar", "ring"))
        lines.append(f"| {name} | {acc:.3f} | {per} | {rare} of {2 * len(results)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/pantypes-modes"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--n-normal", type=int, default=200)
    p.add_argument("--n-finding", type=int, default=400)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--latent-dim", type=int, default=256)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--min-cell", type=int, default=5)
    p.add_argument("--distance", choices=("squared", "euclidean"), default="squared",
                   help="d_j of the similarity: squared (the ProtoVAE paper) or euclidean (the public codes' cdist)")
    p.add_argument("--volume-form", choices=("inverse", "log"), default="inverse",
                   help="the volume loss: inverse (the paper's 1/sqrt(det G)) or log (-log sqrt(det G); "
                        "not in the paper)")
    p.add_argument("--volume-centred", action="store_true",
                   help="span the volume from a prototype, not from the origin (not in the paper)")
    p.add_argument("--reconstruction-weight", type=float, default=1.0,
                   help="weight of the reconstruction term (the paper's 1); larger asks the latent to keep "
                        "what tells the planted modes apart")
    p.add_argument("--restart-dead", action="store_true",
                   help="after each epoch, move dead prototypes onto their class's farthest image (not in the paper)")
    p.add_argument("--z-train", choices=("sampled", "mu"), default="sampled",
                   help="z in training: mu + sigma * eps (the papers' text) or mu (what the public codes run)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = [run_seed(int(s), args, args.out) for s in args.seeds.split(",")]
    text = summary(results, args, time.time() - t0)
    write_json(args.out / "results.json", {"settings": {k: str(v) if isinstance(v, Path) else v
                                                        for k, v in vars(args).items()}, "results": results})
    (args.out / "summary.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
