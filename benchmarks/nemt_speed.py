"""NEMt explain time against one forward pass of the explained model, in one run on the same images.

ResNet-18 (MONAI, 1 channel), 224 px by default, 2 CPU threads; a 3-class
multi-class model and a 14-label multi-label model (all 14 maps from one
explain call). Prints milliseconds per image (medians) and the median over
repeats of the ratio explain/forward, the two timed back to back in each repeat.
The decoder is untrained: its cost does not depend on its weights.

    python benchmarks/nemt_speed.py [--size 224] [--batch 8] [--repeats 11] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nemt.explainers import NEMt
from nemt.models import Classifier, build_model


def synchronize(device) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers the kernels it launched."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def paired(fwd, exp, repeats: int, device="cpu") -> tuple[float, float, float]:
    """Median seconds of ``fwd`` and of ``exp``, and the median of their per-repeat ratios.

    The two are timed back to back in every repeat (after one warm-up each),
    so a slow spell of a shared machine slows both and cancels in the ratio.
    On a GPU each interval ends with a synchronisation.
    """
    fwd(), exp()
    synchronize(device)
    tf, te = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd()
        synchronize(device)
        t1 = time.perf_counter()
        exp()
        synchronize(device)
        t2 = time.perf_counter()
        tf.append(t1 - t0)
        te.append(t2 - t1)
    return statistics.median(tf), statistics.median(te), statistics.median(e / f for f, e in zip(tf, te))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, args.size, args.size, device=args.device)
    where = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "CPU"
    print(f"ResNet-18, 1 channel, {args.size} px, batch {args.batch}, {args.threads} threads, {args.device} ({where}); "
          f"torch {torch.__version__}")
    print("| model | forward ms/image | NEMt explain ms/image | maps per call | ratio |")
    print("|---|---|---|---|---|")
    for task, n in (("multiclass", 3), ("multilabel", 14)):
        net = build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=n)
        clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(args.size, args.size),
                                     task=task, label_names=[f"l{i}" for i in range(n)],
                                     arch="resnet18").to(args.device).eval()
        ex = NEMt(clf, device=args.device).init_module()
        def forward():
            with torch.no_grad():
                clf(x)

        fwd, exp, ratio = paired(forward, lambda: ex.explain(x, target="all"), args.repeats, args.device)
        maps = ex.explain(x, target="all").shape[1]
        print(f"| {task} ({n} outputs) | {1000 * fwd / args.batch:.1f} | {1000 * exp / args.batch:.1f} | "
              f"{maps} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
