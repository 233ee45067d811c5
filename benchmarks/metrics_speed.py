"""Our metrics against Quantus 0.6.0 on the same maps, in one run: time and equality.

Random maps and random box masks (one box per image, 10-50 % of each side),
``--n`` maps of ``--size`` px, one channel. Each map holds the n standard-normal
quantiles in a random order: normally distributed values without ties (random
float32 normals repeat a few dozen values in 50,000 pixels, and Quantus' argsort
breaks ties arbitrarily while we break them by position, which moves a tied
pixel across a group boundary now and then). Both sides get the
same settings: maps min-max normalised per map (our default, METHODS.md;
passed to Quantus as its ``normalise_func``), Quantus' ``abs`` defaults,
warnings off. Faithfulness estimate uses a small CNN with random weights
(conv 5x5/2 to 8 channels, ReLU, conv 3x3/2 to 16, ReLU, 8x8 average pooling,
a linear head on the 16x7x7 features, 3 classes; eval mode), baseline = image
minimum (Quantus ``"black"``), ``size²/56`` pixels per step (896 at 224 px),
on the first ``--n-faithfulness`` maps (default all): its cost is the model's
forward passes (57 images per map on both sides), so the ratio is about 1.
The run therefore also times those passes alone (the same number of images,
in batches of 64, through the same model: the floor that the definition sets
for any implementation) and prints each side's own work, total minus floor,
and its ratio. (nemt's
``smallcnn`` with random weights ends in global average pooling and its logit
moves by only ~1e-4 of its value when 896 pixels change, so float32 rounding
of the forward pass alone shows at ~1e-5 in the correlation; the linear head
here responds to where the pixels change.) Model calls in batches of 64 on
both sides (Quantus' default batch size, our default ``batch_size``).
``--threads`` sets torch's threads: the model's, and the worker threads over
which our per-map metrics spread their slices of the batch (the script opts
in with ``nemt.metrics.parallel_chunks``; the library's default is serial). Quantus' NumPy
code is single-threaded. Each timing is the median of ``--repeats`` runs
after one warm-up (faithfulness estimate: one run each, no warm-up). The
machine's load is printed: other processes on the cores slow both sides.

    python benchmarks/metrics_speed.py [--n 256] [--size 224] [--threads 2] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np
import torch


def timed(fn, repeats: int, warm: bool = True):
    """(median seconds, last result) of ``repeats`` calls, after one warm-up call when ``warm``."""
    out = fn() if warm else None
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def minmax(a: np.ndarray, **_) -> np.ndarray:
    """Per-sample min-max normalisation for Quantus (its normalise_func gets the whole batch)."""
    ax = tuple(range(1, a.ndim))
    lo, hi = a.min(axis=ax, keepdims=True), a.max(axis=ax, keepdims=True)
    return (a - lo) / np.maximum(hi - lo, 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="maps (default 256)")
    ap.add_argument("--size", type=int, default=224, help="side in pixels (default 224)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-faithfulness", type=int, default=0, help="maps for faithfulness estimate (default 0: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    import quantus

    import nemt.metrics as M

    g = torch.Generator().manual_seed(args.seed)
    n, s = args.n, args.size
    npx = s * s
    ranks = torch.stack([torch.randperm(npx, generator=g) for _ in range(n)]).double()
    maps = (2 ** 0.5 * torch.erfinv(2 * (ranks + 0.5) / npx - 1)).float().view(n, 1, s, s)  # normal, no ties
    x = torch.randn(n, 1, s, s, generator=g)
    masks = torch.zeros(n, 1, s, s, dtype=torch.bool)
    for i in range(n):
        h, w = (torch.randint(s // 10, s // 2 + 1, (2,), generator=g)).tolist()
        y0 = int(torch.randint(0, s - h + 1, (1,), generator=g))
        x0 = int(torch.randint(0, s - w + 1, (1,), generator=g))
        masks[i, 0, y0:y0 + h, x0:x0 + w] = True
    a_np, x_np, s_np = maps.numpy(), x.numpy(), masks.numpy().astype(np.float32)
    y_np = np.zeros(n, dtype=int)
    k = 1000

    qkw = dict(normalise_func=minmax, disable_warnings=True)
    rows = []

    def parallel(fn):
        def run():
            with M.parallel_chunks(args.threads):
                return fn()
        return run

    def compare(name, ours, theirs, nan_ok=True, reps=args.repeats, warm=True):
        t_o, v_o = timed(parallel(ours), reps)
        t_q, v_q = timed(theirs, reps, warm)
        v_o = v_o.reshape(-1).double().numpy()
        v_q = np.asarray(v_q, dtype=np.float64).reshape(-1)
        diff = float(np.nanmax(np.abs(v_o - v_q)))
        rows.append((name, len(v_o), 1000 * t_o, 1000 * t_q, t_q / t_o, diff))
        print(f"  {name}: ours {1000 * t_o:.1f} ms, quantus {1000 * t_q:.1f} ms, max |diff| {diff:.2e}", flush=True)

    print(f"{n} maps, {s} px, 1 channel, {args.threads} threads, seed {args.seed}; "
          f"quantus {quantus.__version__}, torch {torch.__version__}; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    compare("relevance_mass", lambda: M.relevance_mass(maps, masks),
            lambda: quantus.RelevanceMassAccuracy(**qkw)(model=None, x_batch=x_np, y_batch=y_np,
                                                         a_batch=a_np, s_batch=s_np))
    compare("relevance_rank", lambda: M.relevance_rank(maps, masks),
            lambda: quantus.RelevanceRankAccuracy(**qkw)(model=None, x_batch=x_np, y_batch=y_np,
                                                         a_batch=a_np, s_batch=s_np))
    compare("pointing_game", lambda: M.pointing_game(maps, masks),
            lambda: quantus.PointingGame(**qkw)(model=None, x_batch=x_np, y_batch=y_np,
                                                a_batch=a_np, s_batch=s_np))
    compare(f"top_k_intersection (k={k})", lambda: M.top_k_intersection(maps, masks, k=k),
            lambda: quantus.TopKIntersection(k=k, **qkw)(model=None, x_batch=x_np, y_batch=y_np,
                                                         a_batch=a_np, s_batch=s_np))
    compare("complexity", lambda: M.complexity(maps),
            lambda: quantus.Complexity(**qkw)(model=None, x_batch=x_np, y_batch=y_np, a_batch=a_np.copy()))
    compare("sparseness", lambda: M.sparseness(maps),
            lambda: quantus.Sparseness(**qkw)(model=None, x_batch=x_np, y_batch=y_np, a_batch=a_np.copy()))

    nf = min(args.n_faithfulness, n) if args.n_faithfulness > 0 else n
    torch.manual_seed(args.seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5, stride=2, padding=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    with torch.no_grad():
        net(x[:1])  # materialise the linear head for this input size
        net(x[:64])  # and warm up the convolutions at the batch size both sides use
    net.eval()
    fis = s * s // 56 if (s * s) % 56 == 0 else next(f for f in range(s * s // 56, 0, -1) if (s * s) % f == 0)
    yf = torch.randint(0, 3, (nf,), generator=g)
    compare(f"faithfulness_estimate ({nf} maps, {fis} px/step)",
            lambda: M.faithfulness_estimate(net, x[:nf], maps[:nf], yf, features_in_step=fis, batch_size=64),
            lambda: quantus.FaithfulnessEstimate(features_in_step=fis, perturb_baseline="black", **qkw)(
                model=net, x_batch=x_np[:nf], y_batch=yf.numpy(), a_batch=a_np[:nf]),
            reps=1, warm=False)
    steps = s * s // fis
    passes = x[:nf].repeat_interleave(steps + 1, 0)  # the images both sides push through the model

    @torch.no_grad()
    def model_passes():
        for i in range(0, passes.shape[0], 64):
            net(passes[i:i + 64])

    t_floor, _ = timed(model_passes, 1, warm=False)
    _, _, t_o, t_q, _, _ = rows[-1]
    own_o, own_q = t_o - 1000 * t_floor, t_q - 1000 * t_floor
    print(f"  model passes alone ({passes.shape[0]} images): {1000 * t_floor:.1f} ms; own work (total - passes): "
          f"ours {own_o:.1f} ms, quantus {own_q:.1f} ms, ratio {own_q / max(own_o, 1e-9):.1f}x", flush=True)

    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}\n")
    print("| metric | maps | ours ms | Quantus ms | ratio (Quantus / ours) | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, m, to, tq, r, d in rows:
        print(f"| {name} | {m} | {to:.1f} | {tq:.1f} | {r:.1f}x | {d:.1e} |")
    print(f"| faithfulness_estimate, own work (total - {1000 * t_floor:.0f} ms of model passes) | {nf} | "
          f"{own_o:.1f} | {own_q:.1f} | {own_q / max(own_o, 1e-9):.1f}x | |")


if __name__ == "__main__":
    main()
