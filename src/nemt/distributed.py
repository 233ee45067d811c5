"""Several processes, one result: torchrun support for training, fitting and benchmarking.

PyTorch's own engine does the work (``torch.distributed``: gloo on CPUs, NCCL
on GPUs; ``DistributedDataParallel`` for the weights that learn). This module
adds the two things our loops need to give the same answer however many
processes run them:

- :class:`StepBatches`: the items of an epoch in one seeded order (a function
  of the seed and the epoch only, so a resumed run sees the same order), cut
  into micro-batches of ``batch_size``; ``accumulate x world`` consecutive
  micro-batches make one optimiser step, and rank ``r`` takes the
  ``accumulate`` micro-batches ``r * accumulate ...`` of each step. One
  process with ``accumulate = A * W`` therefore sees exactly the micro-batches
  that ``W`` processes with ``accumulate = A`` see together: the same
  effective batch, the same batch-norm groups.
- :func:`batch_generator`: the random draws of a micro-batch (augmentation,
  training targets, mask areas, the smoothing kernel) come from a generator
  seeded by (seed, epoch, micro-batch index), not from one generator that
  runs through the epoch; so they do not depend on which process handles the
  micro-batch, nor on where a run was resumed.

:func:`context` is the process group when launched by torchrun with several
ranks (``WORLD_SIZE > 1``), else a one-process stand-in: every call here is
a no-op then and single-process behaviour is unchanged.
"""
from __future__ import annotations

import atexit
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch


CLOSE_TIMEOUT_S = 60


@dataclass(frozen=True)
class Context:
    """Rank and world size of this process (0 and 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes checkpoints and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def launched_world() -> int:
    """The number of processes torchrun launched this one among (``WORLD_SIZE``; 1 when not launched by
    torchrun), read without joining a process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def context(device: str | torch.device | None = None) -> Context:
    """The process group of a torchrun launch (initialised here on first use: NCCL for a CUDA ``device``,
    gloo otherwise), or a one-process :class:`Context`."""
    if launched_world() <= 1:
        return Context()
    import torch.distributed as dist
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_close)
    return Context(dist.get_rank(), dist.get_world_size())


def _close() -> None:
    """Tear the process group down at exit, every rank together.

    Ranks reach exit at different times (rank 0 writes the reports while the
    others are done), and a gloo group destroyed while a peer still talks to it
    can abort the process at exit ("terminate called without an active
    exception"). So under gloo each rank first waits for the others, for at
    most ``CLOSE_TIMEOUT_S`` (``monitored_barrier``): a rank that has died must
    not hold the survivors for the group's 30-minute timeout. NCCL's teardown
    has no such race and no bounded barrier, so it is destroyed as it is.
    """
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=CLOSE_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - a peer gone at exit: tear down what is left anyway
            pass
    dist.destroy_process_group()


def local_device(device: str | torch.device, ctx: Context) -> torch.device:
    """``cuda`` means this rank's GPU (``LOCAL_RANK``) under torchrun; any other device is used as given."""
    device = torch.device(device)
    if ctx.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for micro-batch ``index`` of ``epoch`` (NumPy's SeedSequence mixes the three)."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator that every random draw of micro-batch ``index`` in ``epoch`` comes from."""
    return torch.Generator().manual_seed(batch_seed(seed, epoch, index))


#: the generator index of an epoch's order (no micro-batch has it: SeedSequence takes no negative words)
ORDER_INDEX = 2 ** 31 - 1
#: the generator index of an epoch's DataLoader (its workers' base seed)
LOADER_INDEX = 2 ** 31 - 2


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The items' order in ``epoch``: a permutation that depends on (seed, epoch) only."""
    return torch.randperm(n, generator=batch_generator(seed, epoch, ORDER_INDEX)).tolist()


class StepBatches:
    """This rank's micro-batches of a map-style dataset, epoch by epoch (see the module docstring).

    Iterating yields ``(index, batch)``: the micro-batch's index in the epoch
    (the same on every rank for the same micro-batch; it keys
    :func:`batch_generator`) and the batch collated as a ``DataLoader``
    would. Micro-batches that would not fill a whole optimiser step of every
    rank are dropped (the last partial batch too), so each rank steps the same
    number of times; a data set smaller than one batch is one micro-batch of
    all its items. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, dataset: Any, batch_size: int, *, seed: int, accumulate: int = 1,
                 ctx: Context | None = None, num_workers: int = 0, shuffle: bool = True):
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.accumulate, self.ctx = int(accumulate), ctx or Context()
        self.num_workers, self.shuffle, self.epoch = int(num_workers), shuffle, 0
        if self.batch_size < 1 or self.accumulate < 1:
            raise ValueError(f"batch_size and accumulate must be >= 1, got {batch_size} and {accumulate}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def group(self) -> int:
        """Micro-batches per optimiser step, all ranks together."""
        return self.accumulate * self.ctx.world

    def _micro_batches(self) -> list[list[int]]:
        n = len(self.dataset)
        order = epoch_order(n, self.seed, self.epoch) if self.shuffle else list(range(n))
        if n < self.batch_size:
            return [order] if self.ctx.world == 1 and n else []
        k = n // self.batch_size
        if not (self.ctx.world == 1 and k < self.group):  # one process, fewer batches than a step: one short step
            k -= k % self.group
        return [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(k)]

    def _mine(self) -> list[tuple[int, list[int]]]:
        lo, a = self.ctx.rank * self.accumulate, self.accumulate
        return [(i, idx) for i, idx in enumerate(self._micro_batches()) if lo <= i % self.group < lo + a]

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        from torch.utils.data import DataLoader
        mine = self._mine()
        # its own generator: iterating a DataLoader draws the workers' base seed, from the caller's global RNG
        # without one (and so the workers' seeds follow the seed and epoch, not the caller's state)
        loader = DataLoader(self.dataset, batch_sampler=[idx for _, idx in mine], num_workers=self.num_workers,
                            generator=batch_generator(self.seed, self.epoch, LOADER_INDEX))
        for (i, _), batch in zip(mine, loader):
            yield i, batch


def all_reduce_sum(values: Sequence[float], ctx: Context) -> list[float]:
    """Per-rank sums (e.g. of losses for the log) added over the ranks; unchanged in one process."""
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def average_gradients(params: Iterable[torch.nn.Parameter], ctx: Context) -> None:
    """Replace each parameter's gradient by its mean over the ranks (in place; nothing in one process).

    What DistributedDataParallel does at the end of a backward pass, for loops it cannot wrap: a loss with
    double back-propagation (MIMIC's adversarial term), or two models stepping in turn. A parameter without a
    gradient on this rank counts as a zero one, so every rank joins the same all-reduce; one without a
    gradient on every rank keeps none (as in one process, where the optimiser skips it).
    """
    if not ctx.distributed:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [has])
    torch.distributed.all_reduce(flat)
    parts = flat[:-len(params)].div_(ctx.world).split([g.numel() for g in grads])
    for p, part, n in zip(params, parts, flat[-len(params):].tolist()):
        p.grad = part.view_as(p).clone() if n > 0 else None


def steps_per_epoch(n_micro: int, accumulate: int) -> int:
    """Optimiser steps of an epoch of ``n_micro`` micro-batches on one rank (a last partial step counts)."""
    return max(1, math.ceil(n_micro / accumulate))
