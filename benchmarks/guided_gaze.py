"""Plain vs ensemble vs MIMIC-guided vs mask-guided training: accuracy, gaze plausibility, agreement of the copies.

    OMP_NUM_THREADS=1 python benchmarks/guided_gaze.py --out runs/guided-gaze            # phantoms, seeds 0,1,2
    OMP_NUM_THREADS=1 python benchmarks/guided_gaze.py --out runs/guided-busi --data ../shared/data/busi \\
        --size 64 --arch smallcnn --width 8 --epochs 20 --lr 5e-3 --nemt-epochs 10 --seeds 0  # BUSI, ~23 min/seed

Per seed: a new phantom set (``--n`` images of ``--size`` px, findings nodule and cyst, so 3 classes; or the
``--data`` set), simulated gaze for every image (``nemt.data.gaze``: 70 % of ~40 fixations on the finding, the rest
on the anatomy prior; written as ``gaze.csv`` beside the phantoms' manifest, or in OUT for ``--data``), and four
models of one recipe (``--arch``, ``--epochs``, ``--lr``, batch 32, augmentation, class weighting):

- ``plain``: ``nemt train``;
- ``ensemble``: ``nemt train --guide mimic --beta 0``: 3 copies trained side by side, no adversarial term (the
  copies' agreement without MIMIC; its discriminator still learns, so its accuracy says how distinguishable the
  copies' maps are);
- ``mimic``: ``nemt train --guide mimic --copies 3 --beta 1``;
- ``mask``: ``nemt train --guide mask`` (the share of the squared input gradient outside the lesion mask, λ
  ``--mask-weight``, 1 by default).

On the test split (all images, the true class explained): accuracy and macro AUROC; for Grad-CAM++ and
Integrated Gradients (``--ig-steps`` points, baseline 0) and ``gxi`` (|input x gradient|, min-max: the map MIMIC's
discriminator sees, so its copies' agreement is what the adversarial term acts on), KL divergence from the gaze heat map (lower is better),
NSS at the fixations (higher is better) and relevance mass in the lesion mask (images with a finding); for the
ensembles, each copy is explained on its own (its logits, as the plain model's) and the model's map is the mean of
the copies' min-max maps; ``agreement`` is the mean pairwise Pearson correlation of the copies' maps of an image.
``random`` (uniform noise maps) gives the chance level of KL and NSS. ``--nemt-epochs N`` adds NEMt (default
objective, N epochs, fitted on each model's training split; for an ensemble on the model as a whole, its mean
log-softmax, so it has no per-copy agreement); ``--nemt-map-areas`` scores its maps at other areas (no refit). ``--disc-lr`` and ``--beta`` set MIMIC's discriminator learning rate
(the paper's 1e-4) and adversarial weight; ``--split val`` scores the validation split, for choosing them.

Writes OUT/results.csv (one row per seed, model and method), OUT/summary.md (mean ± sd over seeds) and
OUT/summary.json; models and data stay in OUT/s{seed}/ and a rerun resumes (finished models are not retrained,
finished seeds not re-evaluated).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
from pathlib import Path

import torch

from nemt.data import ImageDataset, open_dataset, write_phantom_dataset
from nemt.data.gaze import gaze_targets, match_fixations, read_fixations, simulate_gaze, write_fixations
from nemt.explainers import get_explainer
from nemt.files import atomic_open, write_json
from nemt.metrics import kl_divergence, nss, relevance_mass
from nemt.models import TrainConfig, load_model, train_classifier
from nemt.models.guided import GuideConfig, copy_agreement, copy_classifiers, explanation_maps, train_guided
from nemt.models.training import evaluate, load_splits
from nemt.ops import normalise_maps

MODELS = ("plain", "ensemble", "mimic", "mask")
# MIMIC variants (not in the paper): the discriminator on each map's deviation from the copies' mean map ("dev"),
# the copies bringing the discriminator to the uniform label instead of maximising its cross-entropy ("conf"),
# the discriminator on Grad-CAM maps instead of |x * grad| ("gc")
EXTRA_MODELS = ("mimic-dev", "mimic-conf", "mimic-dev-conf", "mimic-gc", "mimic-gc-conf")
METHODS = ("gradcam++", "ig", "gxi", "nemt")
FIGURES = ("kl", "nss", "relevance_mass", "agreement")


def log(msg: str) -> None:
    print(msg, flush=True)


def prepare_data(args, seed: int, home: Path) -> tuple[Path, Path]:
    """The data set and its gaze file for ``seed``: (data path, gaze CSV)."""
    if args.data:
        data, gaze = Path(args.data), home / "gaze.csv"
    else:
        data = home / "data"
        if not (data / "manifest.csv").is_file():
            write_phantom_dataset(data, args.n, args.size, seed=seed, findings=("nodule", "cyst"))
        gaze = data / "gaze.csv"
    if not gaze.is_file():
        write_fixations(gaze, simulate_gaze(open_dataset(data), seed=seed))
    return data, gaze


def train_models(args, seed: int, data: Path, home: Path) -> dict[str, Path]:
    manifest = open_dataset(data)
    kw = {"width": args.width} if args.width else {}
    cfg = TrainConfig(arch=args.arch, size=(args.size, args.size), epochs=args.epochs, batch_size=32, lr=args.lr,
                      seed=seed, arch_kwargs=kw)
    quiet = {"progress": False, "log": lambda s: None}
    out = {}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        out[name] = home / name
        card = out[name] / "model.json"
        if card.is_file() and "test" in json.loads(card.read_text()).get("metrics", {}):
            continue  # finished (its test figures are written last): kept even if nemt's code was edited since
        if name == "plain":
            train_classifier(manifest, out[name], cfg, **quiet)
        elif name == "mask":
            train_guided(manifest, out[name], cfg, GuideConfig(kind="mask", mask_weight=args.mask_weight,
                                                               mask_target=args.mask_target), **quiet)
        else:
            train_guided(manifest, out[name], cfg, GuideConfig(
                kind="mimic", copies=3, disc_lr=args.disc_lr, beta=0.0 if name == "ensemble" else args.beta,
                disc_input="deviation" if "-dev" in name else "map",
                adversary="confusion" if "-conf" in name else "paper",
                explanation="gradcam" if "-gc" in name else "gxi"), **quiet)
        log(f"  seed {seed}: {name} trained ({time.perf_counter() - t0:.0f} s)")
    return out


def fit_nemt(clf, manifest, folder: Path, seed: int, epochs: int):
    """NEMt (default objective) fitted for the model in ``folder`` on its training split; cached in folder/nemt."""
    from torch.utils.data import DataLoader

    from nemt.explainers import NEMt
    out = folder / "nemt"
    if (out / "explainer.json").is_file():
        return get_explainer("nemt", clf, path=out)
    splits = load_splits(folder, manifest)
    train, val = (ImageDataset(manifest, clf.preprocessing, splits[k]) for k in ("train", "val"))
    ex = NEMt(clf, seed=seed, epochs=epochs)
    ex.fit(train, val_data=DataLoader(val, batch_size=32), out_dir=out, progress=False, log=lambda s: None)
    return ex


def model_maps(clf, method: str, x: torch.Tensor, y: torch.Tensor, seed: int, ig_steps: int, nemt=None):
    """(maps (N, 1, *spatial) in [0, 1], per-copy maps or None) of the true classes."""
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(x.shape[0], 1, *x.shape[2:], generator=g), None
    if method == "nemt":
        return normalise_maps(nemt.explain(x, target=y).detach(), x.ndim - 2), None
    if method == "gxi":  # the explanation MIMIC's discriminator sees: |x ⊙ ∇_x f_y|, min-max per image
        nets = [c.net for c in copy_classifiers(clf)] if clf.card.arch == "mimic" else [clf.net]
        per = [torch.cat([explanation_maps(n, x[i:i + 64], y[i:i + 64], create_graph=False)
                          for i in range(0, len(x), 64)]) for n in nets]
        return (normalise_maps(torch.stack(per).mean(0), x.ndim - 2), per) if len(per) > 1 else (per[0], None)
    params = {"n_steps": ig_steps} if method == "ig" else {}
    if clf.card.arch != "mimic":
        return get_explainer(method, clf, seed=seed, **params).explain(x, target=y), None
    per = [get_explainer(method, c, seed=seed, **params).explain(x, target=y) for c in copy_classifiers(clf)]
    return normalise_maps(torch.stack(per).mean(0), x.ndim - 2), per


def evaluate_seed(args, seed: int, data: Path, gaze: Path, models: dict[str, Path]) -> list[dict]:
    manifest = open_dataset(data)
    rows = []
    test = load_splits(models[next(iter(models))], manifest)[args.split]
    matched, _ = match_fixations(manifest, read_fixations(gaze), gaze)
    heat, fix, _ = gaze_targets(manifest, test, (args.size, args.size), matched)
    for name, folder in models.items():
        clf = load_model(folder)
        assert list(load_splits(folder, manifest)[args.split]) == list(test), "one split per seed"
        st = ImageDataset(manifest, clf.preprocessing, test).stacked()
        x, y, gt = st["image"], st["y"], st["gt"]
        card = clf.card.metrics["test"] if args.split == "test" else evaluate(clf, ImageDataset(manifest,
                                                                                                  clf.preprocessing, test))
        hist = json.loads((folder / "history.json").read_text()) if (folder / "history.json").is_file() else []
        disc = [h["discriminator_accuracy"] for h in hist if h.get("phase") == "discriminator"]
        disc_acc = disc[-1] if disc else math.nan   # the discriminator's accuracy in its last epoch (chance 1/copies)
        nemt = fit_nemt(clf, manifest, folder, seed, args.nemt_epochs) if args.nemt_epochs else None
        if nemt is not None and args.nemt_map_areas:
            nemt.set_map_areas([float(a) for a in args.nemt_map_areas.split(",")])
        methods = [m for m in METHODS if m != "nemt" or nemt is not None]
        for method in methods + (["random"] if name == "plain" else []):  # random maps: once, as "chance"
            t0 = time.perf_counter()
            maps, per = model_maps(clf, method, x, y, seed, args.ig_steps, nemt)
            row = {"seed": seed, "model": "chance" if method == "random" else name, "method": method,
                   "accuracy": card["accuracy"],
                   "auroc_macro": card["auroc_macro"], "disc_acc": disc_acc,
                   "kl": float(kl_divergence(maps, heat).nanmean()), "nss": float(nss(maps, fix).nanmean()),
                   "relevance_mass": float(relevance_mass(maps, gt).nanmean()),
                   "agreement": float(copy_agreement(per).mean()) if per is not None else float("nan"),
                   "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
        log(f"  seed {seed}: {name} evaluated ({args.split} accuracy {card['accuracy']:.3f}, "
            f"AUROC {card['auroc_macro']:.3f})")
    return rows


def fmt(xs: list[float]) -> str:
    xs = [v for v in xs if v is not None and not math.isnan(v)]  # NaN is saved as null
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def summarise(rows: list[dict], split: str = "test") -> tuple[str, dict]:
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Mean ± sd over seeds {', '.join(map(str, seeds))} (each seed: its {split} split's mean).", "",
             "| model | accuracy | macro AUROC | discriminator accuracy (last epoch) |", "|---|---|---|---|"]
    out: dict = {}
    for model in MODELS + EXTRA_MODELS:
        mine = [r for r in rows if r["model"] == model and r["method"] == METHODS[0]]
        if mine:
            lines.append(f"| {model} | {fmt([r['accuracy'] for r in mine])} | "
                         f"{fmt([r['auroc_macro'] for r in mine])} | {fmt([r.get('disc_acc', math.nan) for r in mine])} |")
            out[model] = {"accuracy": [r["accuracy"] for r in mine], "auroc_macro": [r["auroc_macro"] for r in mine]}
    lines += ["", "| method | model | KL ↓ | NSS ↑ | relevance mass ↑ | copy agreement ↑ |",
              "|---|---|---|---|---|---|"]
    for method in METHODS + ("random",):
        for model in MODELS + EXTRA_MODELS + ("chance",):
            mine = [r for r in rows if r["model"] == model and r["method"] == method]
            if not mine:
                continue
            lines.append(f"| {method} | {model} | " + " | ".join(fmt([r[f] for r in mine]) for f in FIGURES) + " |")
            out.setdefault(model, {})[method] = {f: [r[f] for r in mine] for f in FIGURES}
    return "\n".join(lines) + "\n", out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/guided-gaze"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default=None, help="a data set with lesion masks instead of phantoms (e.g. BUSI)")
    ap.add_argument("--n", type=int, default=800, help="phantoms per seed")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--arch", default="smallcnn")
    ap.add_argument("--width", type=int, default=8, help="smallcnn width (0: the architecture's default)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--ig-steps", type=int, default=16)
    ap.add_argument("--models", default=",".join(MODELS), help="a subset of " + ",".join(MODELS + EXTRA_MODELS))
    ap.add_argument("--disc-lr", type=float, default=1e-4, help="MIMIC's discriminator learning rate (paper: 1e-4)")
    ap.add_argument("--beta", type=float, default=1.0, help="MIMIC's adversarial weight (paper: 1)")
    ap.add_argument("--nemt-epochs", type=int, default=0, help="add NEMt maps, fitted N epochs (0: no NEMt)")
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--mask-target", default="all", choices=("all", "true"),
                    help="--guide mask differentiates Σ_k log p_k (all, Ross et al.) or the true class's log p")
    ap.add_argument("--mask-weight", type=float, default=1.0, help="--guide mask's λ (the mask model's folder "
                    "keeps the λ it was trained with: use a new --out for another)")
    ap.add_argument("--nemt-map-areas", default="", help="NEMt's map areas for scoring, e.g. 0.01,0.05,0.1 "
                    "(no refit; default: the fit's own, 1 %%)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # an entry point may: the figures below are for one thread
    t_start = time.perf_counter()
    rows: list[dict] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        home = args.out / f"s{seed}"
        done = home / ("eval.json" if args.split == "test" else f"eval-{args.split}.json")
        if done.is_file():
            rows += json.loads(done.read_text())
            log(f"seed {seed}: evaluated before ({done})")
            continue
        t0 = time.perf_counter()
        data, gaze = prepare_data(args, seed, home)
        log(f"seed {seed}: data and gaze ready ({time.perf_counter() - t0:.0f} s)")
        models = train_models(args, seed, data, home)
        mine = evaluate_seed(args, seed, data, gaze, models)
        write_json(done, mine)
        rows += mine
    fields = ["seed", "model", "method", "accuracy", "auroc_macro", "disc_acc", *FIGURES, "seconds"]
    with atomic_open(args.out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    table, summary = summarise(rows, args.split)
    wall = time.perf_counter() - t_start
    table += f"\nWall time of this invocation: {wall:.0f} s, {torch.get_num_threads()} torch thread(s).\n"
    with atomic_open(args.out / "summary.md", "w", encoding="utf-8") as fh:
        fh.write(table)
    write_json(args.out / "summary.json", {"settings": {k: str(v) for k, v in vars(args).items()}, **summary})
    print(table)


if __name__ == "__main__":
    main()
