"""How closely a student (NEMt trained on a teacher's maps) reproduces its teacher, on held-out images.

For every item of a split (each image explained for its true label), both
maps are made: the teacher's once (cached in ``out/teacher``, resumable, like
the training cache) and the student's in one pass. Per map: Pearson and
Spearman correlation of the two over the pixels. Against the lesion masks:
relevance mass and pointing game of both. And the cost of both in ms per
image on this machine, with the break-even number of explained images: the
teacher's cost on the training split (the student's up-front price) divided
by the time the student saves per image.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nemt.files import write_json
from nemt.metrics import pointing_game, relevance_mass
from nemt.metrics._common import pearson, spearman
from nemt.ops import seeded


def _mean_sd(v: list[float]) -> dict:
    v = [float(a) for a in v if a == a]
    return {"mean": statistics.fmean(v) if v else float("nan"),
            "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


def fidelity_report(student: Any, data: Any, out: str | Path, *, batch_size: int = 16, seed: int = 0,
                    progress: bool = True, log: Callable[[str], None] = print,
                    cache_dir: str | Path | None = None) -> dict:
    """Student against its teacher on ``data`` (a :class:`~nemt.bench.runner.BenchmarkData`); writes
    ``fidelity.json`` and ``fidelity.md`` in ``out`` and returns the figures. The teacher's maps are cached in
    ``cache_dir`` (default ``out/teacher``): students of one teacher can share them."""
    from nemt.explainers.nemt.estimator import model_checksum
    from nemt.explainers.nemt.teacher import TeacherCache, items_fingerprint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = data.items
    xs = [data.x[it.sample] for it in items]
    ys = [torch.tensor(it.target) for it in items]
    seed = student.teacher_seed
    key = {"teacher": student.teacher, "params": student.teacher_params, "seed": seed,
           "model": model_checksum(student.model), "items": len(items), "fingerprint": data.fingerprint,
           "first_items": items_fingerprint(xs[:8])}
    cache = TeacherCache(Path(cache_dir) if cache_dir is not None else out / "teacher", key)
    cache.fill(student.make_teacher(), list(zip(xs, ys)), student.model, targets="true", seed=seed,
               device=student.device,
               batch_size=batch_size, progress=progress, log=log)
    t_maps, _, t_seconds = cache.load(len(items))
    s_maps, s_seconds = [], 0.0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        x = torch.stack(xs[start:start + len(chunk)]).to(student.device)
        t = torch.tensor([it.target for it in chunk], device=student.device)
        if student.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with seeded(seed, student.device):
            m = student.explain(x, target=t).detach()
        if student.device.type == "cuda":
            torch.cuda.synchronize()
        s_seconds += time.perf_counter() - t0
        s_maps.append(m.cpu())
    s = torch.cat(s_maps)[:, 0].float()
    tm = t_maps[:, 0].float()
    flat_s, flat_t = s.flatten(1).double(), tm.flatten(1).double()
    r = pearson(flat_s, flat_t)
    rho = spearman(flat_s, flat_t)
    gt = torch.stack([data.gt[it.sample] for it in items]).cpu()  # (N, 1, *spatial)
    has = torch.tensor([it.has_gt for it in items])
    rm_s = relevance_mass(s[:, None], gt)[:, 0]
    rm_t = relevance_mass(tm[:, None], gt)[:, 0]
    pg_s = pointing_game(s[:, None], gt)[:, 0]
    pg_t = pointing_game(tm[:, None], gt)[:, 0]
    pe_s = pointing_game(s[:, None], gt, ties="expected")[:, 0]   # tie-fair: a clamped teacher mask has plateaus
    pe_t = pointing_game(tm[:, None], gt, ties="expected")[:, 0]
    n = len(items)
    ms_s, ms_t = 1000 * s_seconds / n, 1000 * t_seconds / n
    train_seconds = student.teacher_seconds_
    report = {
        "teacher": student.teacher, "teacher_params": student.teacher_params, "n_items": n,
        "n_with_mask": int(has.sum()),
        "pearson": _mean_sd(r.tolist()), "spearman": _mean_sd(rho.tolist()),
        "student": {"relevance_mass": _mean_sd(rm_s[has].tolist()), "pointing_game": _mean_sd(pg_s[has].tolist()),
                    "pointing_game_expected": _mean_sd(pe_s[has].tolist()), "ms_per_image": ms_s},
        "teacher_maps": {"relevance_mass": _mean_sd(rm_t[has].tolist()),
                         "pointing_game": _mean_sd(pg_t[has].tolist()),
                         "pointing_game_expected": _mean_sd(pe_t[has].tolist()), "ms_per_image": ms_t},
        "teacher_seconds_on_training_split": train_seconds,
        "break_even_images": (None if train_seconds is None or ms_t <= ms_s
                              else train_seconds / ((ms_t - ms_s) / 1000)),
    }
    write_json(out / "fidelity.json", json.loads(json.dumps(report)))
    (out / "fidelity.md").write_text(markdown(report) + "\n")
    return report


def markdown(rep: dict) -> str:
    """The report as a small Markdown table (student against teacher)."""
    def f(d):
        return f"{d['mean']:.3f} ± {d['sd']:.3f}"
    lines = [f"Student of {rep['teacher']} {rep['teacher_params'] or ''} on {rep['n_items']} images "
             f"({rep['n_with_mask']} with a mask): Pearson {f(rep['pearson'])}, Spearman {f(rep['spearman'])}",
             "", "| maps | relevance mass | pointing game | pointing game (ties expected) | ms / image |",
             "|---|---|---|---|---|"]
    for name, key in (("teacher", "teacher_maps"), ("student", "student")):
        d = rep[key]
        pe = d.get("pointing_game_expected")
        lines.append(f"| {name} | {d['relevance_mass']['mean']:.3f} | {d['pointing_game']['mean']:.3f} | "
                     f"{'-' if pe is None else format(pe['mean'], '.3f')} | {d['ms_per_image']:.1f} |")
    if rep.get("teacher_seconds_on_training_split") is not None:
        be = rep["break_even_images"]
        lines += ["", f"Teacher on the training split: {rep['teacher_seconds_on_training_split'] / 60:.1f} min; "
                      f"break-even after {'-' if be is None else f'{be:.0f}'} explained images."]
    return "\n".join(lines)
