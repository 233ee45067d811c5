"""Score explainers' localisation on images with ground-truth masks, explaining each image's true label.

One row per method: relevance mass, relevance rank accuracy and the pointing
game (Quantus' rule: a hit when any tied maximum lies in the mask; means over
images with a non-empty mask; images without one are excluded and counted),
the mean map value, milliseconds per image, and for NEMt the deleted area and
the mean |change| of the target quantity when its mask is deleted. A constant
map localises nothing: its scores are undefined (NaN), left out of the means
and counted (``constant_maps``, named under the table).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from nemt.errors import NemtError
from nemt.explainers import NEMt, get_explainer
from nemt.metrics import pointing_game, relevance_mass, relevance_rank


def score_methods(model, x: torch.Tensor, y: torch.Tensor, gt: torch.Tensor, nemt: dict[str, NEMt],
                  baselines: list[str], batch_size: int = 16) -> list[dict]:
    """Rows of figures; with NEMt explainers, ``gaussian`` gives one centred blob per explainer with
    the same mean map value, right after it. Images without a non-empty mask are left out (and counted); none
    with one is a :class:`~nemt.errors.NemtError`."""
    has = gt.flatten(1).any(1)
    if not bool(has.any()):
        raise NemtError(f"score_methods: none of the {len(gt)} images has a non-empty ground-truth mask, so there "
                        "is no localisation to score; give images with masks (or boxes)")
    x, y, gt = x[has], y[has], gt[has]
    rows: list[dict] = []

    def run(name: str, explain: Callable, extra: dict | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        maps = torch.cat([explain(x[i:i + batch_size], y[i:i + batch_size]).detach()
                          for i in range(0, len(x), batch_size)])
        ms = 1000 * (time.perf_counter() - t0) / max(len(x), 1)
        pg = pointing_game(maps, gt)  # NaN for a constant map (nothing localised; every image here has a mask)
        rows.append({"method": name, "relevance_mass": float(relevance_mass(maps, gt).nanmean()),
                     "relevance_rank": float(relevance_rank(maps, gt).nanmean()),
                     "pointing_game": float(pg.nanmean()),
                     "mean_map": float(maps.mean()), "ms_per_image": ms, "n_images": int(len(x)),
                     "excluded_empty_gt": int((~has).sum()), "constant_maps": int(pg.isnan().sum()),
                     **(extra or {})})
        return maps

    for name, ex in nemt.items():
        val = ex.validate([(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)])
        maps = run(name, lambda a, b: ex.explain(a, target=b),
                   {"deleted_area": val["area"], "target_change": val["change"]})
        if "gaussian" in baselines:  # a centred blob of the same mean value, for each NEMt
            area = float(maps.mean())
            blob = get_explainer("gaussian", model, area=area)
            run(f"gaussian (area {area:.3f})", lambda a, b: blob.explain(a, target=b))
    for name in baselines:
        if name == "gaussian" and nemt:
            continue
        ex = get_explainer(name, model)
        run(name, lambda a, b: ex.explain(a, target=b))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    def fmt(r: dict, k: str) -> str:
        v = r.get(k)
        return f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else "–"
    lines = ["| method | relevance mass | relevance rank | pointing game | mean map value | deleted area | target change "
             "| ms/image |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {fmt(r, 'relevance_mass')} | {fmt(r, 'relevance_rank')} | "
              f"{fmt(r, 'pointing_game')} | {fmt(r, 'mean_map')} | "
              f"{fmt(r, 'deleted_area')} | {fmt(r, 'target_change')} | {r['ms_per_image']:.1f} |" for r in rows]
    constant = [f"{r['method']} {r['constant_maps']} of {r['n_images']}" for r in rows if r.get("constant_maps")]
    if constant:  # they localise nothing: undefined, left out of the means above, and named here
        lines += ["", "Constant maps (undefined, not in the means): " + ", ".join(constant) + "."]
    return "\n".join(lines)
