"""Time and memory of concept annotation: 1000 probe images x 512 neurons x 500 concepts (synthetic).

    OMP_NUM_THREADS=1 python benchmarks/concepts_speed.py

Activations and embeddings are random (the cost of the rules does not depend on their values);
the VLM and the model's forward passes are not timed (they depend on the models).
"""
from __future__ import annotations

import resource
import time

import torch

from nemt.concepts import clip_dissect, cosine, mammi


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(n: int = 1000, k: int = 512, c: int = 500, d: int = 512) -> None:
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(n, k, generator=g)
    img, txt, tmpl = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g), torch.randn(1, d, generator=g)
    print(f"{n} images x {k} neurons x {c} concepts, embedding dim {d}, {torch.get_num_threads()} thread(s)")
    base = peak_mib()
    t = time.perf_counter()
    sim = cosine(img, txt)
    t_sim = time.perf_counter() - t
    for name, fn in (("clip-dissect", lambda: clip_dissect(acts, sim)),
                     ("mammi", lambda: mammi(acts, sim, cosine(img, tmpl)[:, 0]))):
        fn()  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        print(f"{name:13s} best of 3: {min(times) * 1000:8.1f} ms   peak RSS {peak_mib():.0f} MiB "
              f"(+{peak_mib() - base:.0f} MiB over the inputs)")
    print(f"cosine P (N x C): {t_sim * 1000:.1f} ms")


if __name__ == "__main__":
    main()
