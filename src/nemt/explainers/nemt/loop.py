"""The training loop of NEMt's decoder (and of the students that reuse it), apart from any objective.

:func:`fit_loop` runs epochs over batches with an optimiser, a cosine schedule
over the whole run, gradient accumulation, a resume point written after every
epoch (``state/last``: weights, optimiser, schedule, the history; the random
draws are keyed by seed, epoch and micro-batch, so they need no saved state) that a re-run continues from when its ``key`` (the
settings and the model's checksum) is the same, a progress bar and one log
line per epoch. The objective comes in as ``step(x, y, gen) -> (loss, parts)``
and the validation as ``validate() -> dict``.
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from nemt.checkpoint import load_state, save_state
from nemt.distributed import Context, StepBatches, all_reduce_sum, batch_generator, steps_per_epoch
from nemt.errors import NemtError
from nemt.files import differing_keys
from nemt.progress import progress_bar

Step = Callable[[torch.Tensor, "torch.Tensor | None", torch.Generator], "tuple[torch.Tensor, dict]"]


def make_optimizer(params, name: str, lr: float | None, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (learning rate 3e-3 unless ``lr``) or Prodigy (``lr`` 1 unless given; its own step size)."""
    if name == "prodigy":
        from prodigyopt import Prodigy
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice on construction
            return Prodigy(params, lr=lr or 1.0, weight_decay=weight_decay, safeguard_warmup=True)
    return torch.optim.AdamW(params, lr=lr or 3e-3, weight_decay=weight_decay)


def split_xy(b: Any) -> tuple[torch.Tensor, Any]:
    """(x, y or None) from a batch or an item given as a dict ({"image", "y"}), a tuple (x, y, ...: y is the
    rest as a tuple) or a bare tensor."""
    if isinstance(b, dict):
        return b["image"], b.get("y")
    if isinstance(b, (list, tuple)):
        return b[0], (b[1] if len(b) == 2 else tuple(b[1:]) if len(b) > 2 else None)
    return b, None


def batches(data: Iterable) -> Iterable[tuple[torch.Tensor, Any]]:
    """:func:`split_xy` of every batch of ``data``."""
    return (split_xy(b) for b in data)


def _to(y, device):
    if y is None:
        return None
    if isinstance(y, (list, tuple)):
        return type(y)(_to(v, device) for v in y)
    return y.to(device)


def fit_loop(module: nn.Module, data: Iterable, step: Step, *, epochs: int, optimizer: str, lr: float | None,
             weight_decay: float, schedule: str, accumulate: int, seed: int, device: torch.device,
             key: dict, out_dir: str | Path | None, history: list[dict], log: Callable[[str], None],
             progress: bool, validate: Callable[[], dict] | None = None,
             on_generator: Callable[[torch.Generator], None] | None = None,
             ddp: nn.Module | None = None, ctx: Context | None = None,
             check_batch: Callable[[Any, Any], None] | None = None) -> list[dict]:
    """Train ``module``'s trainable parameters with ``step``; return the history (one record per epoch).

    ``data``: a :class:`~nemt.distributed.StepBatches` (this rank's micro-batches, in an order fixed by the seed
    and the epoch) or any iterable of batches. Each micro-batch's random draws come from its own generator
    (:func:`~nemt.distributed.batch_generator` of the seed, the epoch and its index), handed to ``on_generator``
    and to ``step``. ``key`` must equal the one stored with a resume point in ``out_dir`` (a run with other
    settings is refused). Under torchrun (``ctx.distributed``), ``ddp`` is the ``DistributedDataParallel``
    wrapper that ``step`` calls the module through: gradients are averaged over the ranks once per optimiser
    step (``no_sync`` on the other micro-batches), only rank 0 validates, logs and writes the resume point,
    and every rank resumes from it. ``check_batch(x, y)`` sees every batch before it is used (and raises on a
    bad one); an epoch without a batch is an error.
    """
    ctx = ctx or Context()
    if ctx.distributed and not isinstance(data, StepBatches):
        raise NemtError("a distributed fit needs a map-style data set (torch.utils.data.Dataset) to shard; "
                        "got batches")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, lr, weight_decay)
    try:
        n_batches = len(data)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    total_steps = None if n_batches is None else epochs * steps_per_epoch(n_batches, accumulate)
    # cosine decay to zero over the whole run: the masks settle instead of fluctuating epoch to epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        if schedule == "cosine" and total_steps else 1.0)
    start = 0
    state_path = Path(out_dir) / "state" / "last" if out_dir else None
    if state_path and state_path.with_suffix(".json").is_file():
        st = load_state(state_path)
        if st["key"] != key:
            diff = ", ".join(differing_keys(st["key"], key))
            raise NemtError(f"{out_dir} holds an explainer trained with other {diff}; use another output folder")
        module.load_state_dict(st["module"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start, history = st["epoch"], st["history"]
        if ctx.main:
            log(f"resuming explainer in {out_dir} after epoch {start}")
    with progress_bar(progress and ctx.main) as bar:
        tid = bar.add_task("fit", total=None if n_batches is None else n_batches * (epochs - start), info="")
        for epoch in range(start, epochs):
            t0 = time.time()
            module.train()
            sums: dict[str, float] = {}
            n = 0
            opt.zero_grad(set_to_none=True)
            if isinstance(data, StepBatches):
                data.set_epoch(epoch)
                numbered = iter(data)
            else:
                numbered = enumerate(data)
            for i, (index, b) in enumerate(numbered):
                x, y = split_xy(b)
                if check_batch is not None:
                    check_batch(x, y)
                x = x.to(device, torch.float32)  # the module learns in float32 (float64 data from NumPy too)
                y = _to(y, device)
                gen = batch_generator(seed, epoch, index)
                if on_generator is not None:
                    on_generator(gen)
                last = (i + 1) % accumulate == 0 or (n_batches is not None and i + 1 == n_batches)
                with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                    loss, parts = step(x, y, gen)
                    (loss / accumulate).backward()
                if last:
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                parts["loss"] = loss.detach().item()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
                bar.update(tid, advance=1, description=f"epoch {epoch + 1}/{epochs}",
                           info=" ".join(f"{k} {v / n:.4f}" for k, v in sums.items()))
            if n_batches is None and n % accumulate:  # batches of unknown number: the last partial step
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            names = sorted(sums)
            totals = all_reduce_sum([sums[k] for k in names] + [n], ctx)  # the log covers every rank's batches
            if not totals[-1]:
                raise NemtError("the training data gave no batch (an empty data set or loader, or fewer items "
                                "than one batch with the last partial batch dropped"
                                + (f", or fewer batches than one step of {accumulate} accumulated batches per "
                                   "process" if accumulate > 1 or ctx.world > 1 else "") + "): nothing to fit")
            record = {"epoch": epoch + 1, **{k: v / max(totals[-1], 1) for k, v in zip(names, totals)},
                      "seconds": round(time.time() - t0, 1)}
            if validate is not None and ctx.main:
                record["val"] = validate()
            history.append(record)
            if state_path and ctx.main:
                save_state(state_path, {"key": key, "epoch": epoch + 1, "history": history,
                                        "module": module.state_dict(), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict()})  # draws are keyed: no generator state
            ctx.barrier()  # no rank starts the next epoch before the resume point of this one exists
            if ctx.main:
                log(f"epoch {epoch + 1}/{epochs} " + " ".join(
                    f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "seconds")
                    + (f" val={record['val']}" if "val" in record else "") + f" ({record['seconds']}s)")
    module.eval()
    return history
