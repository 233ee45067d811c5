"""NEMt explain time against one forward pass of the explained model, in one run on the same images.

ResNet-18 (MONAI, 1 channel), 224 px by default, 2 CPU threads; a 3-class
multi-class model and a 14-label multi-label model (all 14 maps from one
explain call). Prints milliseconds per image and the ratio explain/forward.
The decoder is untrained: its cost does not depend on its weights.

    python benchmarks/nemt_speed.py [--size 224] [--batch 8] [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nemt.explainers import NEMt
from nemt.models import Classifier, build_model


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, args.size, args.size, device=args.device)
    print(f"ResNet-18, 1 channel, {args.size} px, batch {args.batch}, {args.threads} threads, {args.device}")
    print("| model | forward ms/image | NEMt explain ms/image | maps per call | ratio |")
    print("|---|---|---|---|---|")
    for task, n in (("multiclass", 3), ("multilabel", 14)):
        net = build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=n)
        clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(args.size, args.size),
                                     task=task, label_names=[f"l{i}" for i in range(n)],
                                     arch="resnet18").to(args.device).eval()
        ex = NEMt(clf, device=args.device).init_module()
        with torch.no_grad():
            fwd = timed(lambda: clf(x), args.repeats)
        exp = timed(lambda: ex.explain(x, target="all"), args.repeats)
        maps = ex.explain(x, target="all").shape[1]
        print(f"| {task} ({n} outputs) | {1000 * fwd / args.batch:.1f} | {1000 * exp / args.batch:.1f} | "
              f"{maps} | {exp / fwd:.2f}x |")


if __name__ == "__main__":
    main()
