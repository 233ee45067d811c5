"""Teachers for NEMt students: any slow explainer's maps on the training items, cached on disk and resumable.

A student (``NEMt(objective="teacher", teacher="extremal", ...)``) learns to
reproduce in one pass what a slow explainer computes per image (CXPlain,
Schwab & Karlen 2019; FastSHAP, Jethani et al. 2022; stochastic amortisation,
Covert et al. 2024: cheap, noisy per-example targets suffice). The teacher's
maps of the training items are computed once, in shards of ``shard`` items
(``teacher/maps-00000.safetensors`` …, float16, written atomically), next to a
``teacher.json`` that names the method, its parameters, the model's checksum
and the items; a re-run computes only the shards that are missing, and a
cache made for another teacher, model or item set is refused.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nemt.distributed import Context
from nemt.errors import NemtError
from nemt.files import atomic_path, differing_keys, write_json
from nemt.ops import ParameterError, resolve_targets, seeded
from nemt.progress import progress_bar

FORMAT = "nemt-teacher/1"
TEACHER_TARGETS = ("true", "all", "predicted")


def items_fingerprint(xs: Iterable[torch.Tensor], h=None) -> str:
    """SHA-256 over the items' shapes and bytes (float32): which images a cache belongs to. ``h``: a hashlib
    object already fed (by :func:`fingerprint_update`) with earlier items, which ``xs`` follow."""
    h = hashlib.sha256() if h is None else h
    for x in xs:
        fingerprint_update(h, x)
    return h.hexdigest()


def fingerprint_update(h, x: torch.Tensor) -> None:
    """Feed one item to an :func:`items_fingerprint` hash (for a pass over the data that does more)."""
    t = x.detach().to("cpu", torch.float32).contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())


class TeacherCache:
    """The maps of one teacher on a fixed list of items: (N, T', *spatial) float16 and their targets (N, T')."""

    def __init__(self, directory: str | Path | None, key: dict, shard: int = 64):
        self.directory = Path(directory) if directory is not None else None
        self.key, self.shard = json.loads(json.dumps(key)), int(shard)
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        if self.directory is not None:
            card = self.directory / "teacher.json"
            if card.is_file():
                old = json.loads(card.read_text())
                if old.get("key") != self.key:
                    raise NemtError(f"{self.directory} holds another teacher's maps (other "
                                    f"{', '.join(differing_keys(old.get('key') or {}, self.key))}); use another "
                                    "output folder")
            else:
                self.directory.mkdir(parents=True, exist_ok=True)
                write_json(card, {"format": FORMAT, "key": self.key, "shard": self.shard})

    def _path(self, i: int) -> Path:
        return self.directory / f"maps-{i:05d}.safetensors"

    def has(self, i: int) -> bool:
        return i in self._memory or (self.directory is not None and self._path(i).is_file())

    def put(self, i: int, maps: torch.Tensor, targets: torch.Tensor, seconds: float) -> None:
        entry = {"maps": maps.detach().to("cpu", torch.float16).contiguous(),
                 "targets": targets.detach().to("cpu", torch.int64).contiguous(),
                 "seconds": torch.tensor([seconds], dtype=torch.float64)}
        if self.directory is None:
            self._memory[i] = entry
            return
        with atomic_path(self._path(i)) as tmp:
            save_file(entry, str(tmp))

    def get(self, i: int) -> dict[str, torch.Tensor]:
        return self._memory[i] if i in self._memory else load_file(str(self._path(i)))

    def fill(self, explainer: Any, items: Sequence[tuple[torch.Tensor, Any]], model: nn.Module, *,
             targets: str, seed: int, device: torch.device, batch_size: int, progress: bool,
             log: Callable[[str], None], ctx: Context | None = None) -> None:
        """Compute the missing shards: each item (x, y) explained for its ``targets`` (``"true"``: its label,
        ``"all"``: every output, ``"predicted"``), ``batch_size`` items per explain call, under ``seed``.
        Under torchrun, rank r computes the shards k with k mod world = r, and every rank waits for all."""
        ctx = ctx or Context()
        if ctx.distributed and self.directory is None:
            raise NemtError("a distributed teacher cache needs a folder that every rank can read (an out_dir)")
        n = len(items)
        shards = [range(s, min(s + self.shard, n)) for s in range(0, n, self.shard)]
        todo = [k for k in range(len(shards)) if not self.has(k) and k % ctx.world == ctx.rank]
        if len(todo) < len(shards):
            log(f"teacher: {len(shards) - len(todo)} of {len(shards)} shards cached, computing {len(todo)}")
        with progress_bar(progress and ctx.main) as bar:
            task = bar.add_task("teacher", total=sum(len(shards[k]) for k in todo), info="")
            for k in todo:
                maps, tg, t0 = [], [], time.perf_counter()
                for s in range(shards[k].start, shards[k].stop, batch_size):
                    idx = list(range(s, min(s + batch_size, shards[k].stop)))
                    pairs = [items[i] for i in idx]  # each item read once
                    x = torch.stack([p[0] for p in pairs]).to(device)
                    y = [p[1] for p in pairs]
                    t = _teacher_targets(targets, y, model, x)
                    with seeded(seed, device):
                        maps.append(explainer.explain(x, target=t).detach().cpu())
                    tg.append(t.cpu())
                    bar.update(task, advance=len(idx))
                self.put(k, torch.cat(maps), torch.cat(tg), time.perf_counter() - t0)
        ctx.barrier()

    def load(self, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """All maps (N, T', *spatial) float16, targets (N, T') and the seconds the teacher took for them."""
        k = (n + self.shard - 1) // self.shard
        parts = [self.get(i) for i in range(k)]
        maps = torch.cat([p["maps"] for p in parts])
        if maps.shape[0] != n:
            raise NemtError(f"teacher cache holds {maps.shape[0]} maps, expected {n}")
        return maps, torch.cat([p["targets"] for p in parts]), float(sum(float(p["seconds"]) for p in parts))


def _teacher_targets(mode: str, y: list, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if mode == "true":
        if any(v is None for v in y):
            raise ParameterError("teacher_targets='true' needs labelled items; use 'predicted'")
        yy = torch.stack([torch.as_tensor(v) for v in y])
        if yy.ndim == 1 or yy.shape[1] == 1:  # one class per item
            return yy.view(-1, 1).long().to(x.device)
        raise ParameterError("teacher_targets='true' is for one label per item (multi-class); use 'all'")
    if mode not in TEACHER_TARGETS:
        raise ParameterError(f"teacher_targets must be one of {TEACHER_TARGETS}, got {mode!r}")
    return resolve_targets(mode, model, x)
