"""How closely a student (NEMt trained on a teacher's maps) reproduces its teacher, on held-out images.

For every item of a split (each image explained for its true label), both
maps are made: the teacher's once (cached in ``out/teacher``, resumable, like
the training cache) and the student's in one pass. Per map: Pearson and
Spearman correlation of the two over the pixels. Against the lesion masks:
relevance mass and pointing game of both. And the cost of both in ms per
image on this machine, with the break-even number of explained images: the
student's up-front price (the teacher's cost on the training split plus the
student's own fit, its card's epoch seconds) divided by the time the student
saves per image.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nemt.errors import NemtError
from nemt.files import atomic_open, differing_keys, write_json
from nemt.metrics import pointing_game, relevance_mass
from nemt.metrics._common import pearson, spearman
from nemt.ops import seeded


def _mean_sd(v: list[float]) -> dict:
    """Mean and sample SD of the defined values (NaN: a correlation with a constant map, or a map without a
    mask), with ``n`` (values averaged) and ``n_undefined`` (NaN values left out); the SD is NaN for n < 2."""
    v = [float(a) for a in v]
    ok = [a for a in v if a == a]
    return {"mean": statistics.fmean(ok) if ok else float("nan"),
            "sd": statistics.stdev(ok) if len(ok) > 1 else float("nan"), "n": len(ok),
            "n_undefined": len(v) - len(ok)}


#: the teacher cache's key fields that name the items (not the teacher): a cache of other items is another
#: --limit, --split or data set, not another teacher
_ITEM_KEYS = {"items", "fingerprint", "first_items"}


def _refuse_other_cache(directory: Path, key: dict) -> None:
    """Refuse, before the cache is opened, a teacher cache holding other maps, saying which (the teacher's
    maps of other items, or another teacher's) and how to start over."""
    card = directory / "teacher.json"
    if not card.is_file():
        return
    old = (json.loads(card.read_text()).get("key") or {})
    if old == json.loads(json.dumps(key)):
        return
    diff = differing_keys(old, json.loads(json.dumps(key)))
    if set(diff) <= _ITEM_KEYS:
        raise NemtError(f"{directory}: holds the teacher's maps of other items (another --limit, --split or data "
                        f"set: other {', '.join(diff)}); use another --out, or delete {directory} to start over")
    raise NemtError(f"{directory}: holds another teacher's maps (other {', '.join(diff)}); use another --out, or "
                    f"delete {directory} to start over")


def teacher_seed(student: Any, seed: int | None = None) -> int:
    """The seed a fidelity report makes both maps under: the student's teacher seed (its card's
    ``teacher_seed``, the seed of its training maps); ``seed`` may only repeat it (another is refused, naming
    both, rather than silently replaced)."""
    if seed is not None and int(seed) != int(student.teacher_seed):
        raise NemtError(f"--seed {seed}: the fidelity's maps are made under the student's teacher seed "
                        f"{student.teacher_seed} (its card's teacher_seed, the seed of its training maps); "
                        f"leave --seed out or give {student.teacher_seed}")
    return int(student.teacher_seed)


def fidelity_report(student: Any, data: Any, out: str | Path, *, batch_size: int = 16, seed: int | None = None,
                    progress: bool = True, log: Callable[[str], None] = print,
                    cache_dir: str | Path | None = None) -> dict:
    """Student against its teacher on ``data`` (a :class:`~nemt.bench.runner.BenchmarkData`); writes
    ``fidelity.json`` and ``fidelity.md`` in ``out`` and returns the figures. The teacher's maps are cached in
    ``cache_dir`` (default ``out/teacher``): students of one teacher can share them.

    Both maps are made under the student's teacher seed (``student.teacher_seed``, from its card), the seed
    its training maps were made with; ``seed`` may only repeat it (another is refused, naming both)."""
    from nemt.explainers.nemt.estimator import model_checksum
    from nemt.explainers.nemt.teacher import TeacherCache, items_fingerprint

    seed = teacher_seed(student, seed)
    out = Path(out)
    items = data.items
    xs = [data.x[it.sample] for it in items]
    ys = [torch.tensor(it.target) for it in items]
    key = {"teacher": student.teacher, "params": student.teacher_params, "seed": seed,
           "model": model_checksum(student.model), "items": len(items), "fingerprint": data.fingerprint,
           "first_items": items_fingerprint(xs[:8])}
    cache_dir = Path(cache_dir) if cache_dir is not None else out / "teacher"
    _refuse_other_cache(cache_dir, key)
    out.mkdir(parents=True, exist_ok=True)
    cache = TeacherCache(cache_dir, key)
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
    has = gt.flatten(1).any(1)  # a non-empty mask: an empty one has no lesion to find (NaN in the metrics)
    rm_s = relevance_mass(s[:, None], gt)[:, 0]
    rm_t = relevance_mass(tm[:, None], gt)[:, 0]
    pg_s = pointing_game(s[:, None], gt)[:, 0]
    pg_t = pointing_game(tm[:, None], gt)[:, 0]
    pe_s = pointing_game(s[:, None], gt, ties="expected")[:, 0]   # tie-fair: a clamped teacher mask has plateaus
    pe_t = pointing_game(tm[:, None], gt, ties="expected")[:, 0]
    n = len(items)
    ms_s, ms_t = 1000 * s_seconds / n, 1000 * t_seconds / n
    train_seconds = student.teacher_seconds_
    fit_seconds = sum(float(r.get("seconds", 0.0)) for r in (getattr(student, "history_", None) or []) if isinstance(r, dict))
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
        "student_fit_seconds": round(fit_seconds, 1),
        "break_even_images": (None if train_seconds is None or ms_t <= ms_s
                              else (train_seconds + fit_seconds) / ((ms_t - ms_s) / 1000)),
    }
    write_json(out / "fidelity.json", json.loads(json.dumps(report)))
    with atomic_open(out / "fidelity.md", "w", encoding="utf-8") as fh:
        fh.write(markdown(report) + "\n")
    return report


def markdown(rep: dict) -> str:
    """The report as a small Markdown table (student against teacher); the headline says over how many maps
    each correlation is (n of the items, the undefined ones, constant maps, left out) and gives no SD for n < 2."""
    def f(d):
        n, undefined = d.get("n", 0), d.get("n_undefined", 0)
        if n == 0:
            text = "undefined"
        else:
            sd = d.get("sd")
            text = f"{d['mean']:.3f}" + (f" ± {sd:.3f}" if n >= 2 and sd is not None and sd == sd else "")
        return text + f" (n = {n} of {rep['n_items']}" + (
            f"; {undefined} undefined: constant maps, left out" if undefined else "") + ")"
    lines = [f"Student of {rep['teacher']} {rep['teacher_params'] or ''} on {rep['n_items']} images "
             f"({rep['n_with_mask']} with a non-empty mask): Pearson {f(rep['pearson'])}, "
             f"Spearman {f(rep['spearman'])}",
             "", "| maps | relevance mass | pointing game | pointing game (ties expected) | ms / image |",
             "|---|---|---|---|---|"]
    for name, key in (("teacher", "teacher_maps"), ("student", "student")):
        d = rep[key]
        pe = d.get("pointing_game_expected")
        lines.append(f"| {name} | {d['relevance_mass']['mean']:.3f} | {d['pointing_game']['mean']:.3f} | "
                     f"{'-' if pe is None else format(pe['mean'], '.3f')} | {d['ms_per_image']:.1f} |")
    if rep.get("teacher_seconds_on_training_split") is not None:
        be = rep["break_even_images"]
        fit = rep.get("student_fit_seconds")
        lines += ["", f"Teacher on the training split: {rep['teacher_seconds_on_training_split'] / 60:.1f} min"
                      + ("" if fit is None else f", the student's fit {fit / 60:.1f} min")
                      + f"; break-even after {'-' if be is None else f'{be:.0f}'} explained images."]
    return "\n".join(lines)
