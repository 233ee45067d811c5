"""Peak memory of NAS's per-pixel assignment at a volume's size: the composite at the input's size against
``nemt.clustering.nearest_centroid`` (stage-wise, 64 channels at a time). Each way runs in its own process, so
each peak RSS is its own.

    python benchmarks/nas_memory.py            # 96³, stages of 64/128/256 channels on 24³/12³/6³, K = 12

Prints one line per way: the peak resident memory above the process's start, the time, and whether the labels
agree (share of voxels with the same label).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def _stages(size: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(1, c, s, s, s, generator=g) for c, s in ((64, size // 4), (128, size // 8), (256, size // 16))]
    return feats, torch.randn(12, 448, generator=g)


def _one(way: str, size: int, out: str) -> None:
    from nemt.clustering import _pixels, compose, nearest_centroid, squared_distances
    torch.set_num_threads(2)
    feats, cen = _stages(size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if way == "composite":
        labels = squared_distances(_pixels(compose(feats, (size,) * 3)), cen).argmin(1)
    else:
        labels = nearest_centroid(feats, cen, (size,) * 3).reshape(-1)
    seconds = time.perf_counter() - t0
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    np.save(out, labels.to(torch.int8).numpy())
    print(json.dumps({"way": way, "peak_mb": round(peak_mb), "seconds": round(seconds, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--_way", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._way:
        _one(args._way, args.size, args._out)
        return
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        labels = {}
        for way in ("composite", "chunked"):
            out = str(Path(tmp) / f"{way}.npy")
            res = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--_way", way, "--_out", out],
                                 capture_output=True, text=True, check=True)
            print(res.stdout.strip().splitlines()[-1], flush=True)
            labels[way] = torch.from_numpy(np.load(out, allow_pickle=False))
        same = (labels["composite"] == labels["chunked"]).float().mean().item()
        print(f"labels agree on {same:.6f} of {labels['chunked'].numel()} voxels")


if __name__ == "__main__":
    main()
