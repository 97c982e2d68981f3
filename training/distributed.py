"""Data-parallel training over processes with PyTorch's own distributed package.

Why this shape: the model is small (a few MB) and the data of a run fits every process,
so plain data parallelism is enough: each process holds the whole model, trains on its
share of every global batch, and ``DistributedDataParallel`` averages the gradients, so
all processes take the same optimizer step. Processes are started by ``torchrun``
(``torch.distributed.run``), on one machine or several; this module only joins the group
it sets up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in
the environment) and provides the few collective decisions the training loop needs:

- **sharding** (:func:`rank_batches`): every rank draws the same permutation of the
  epoch's windows from the same seeded generator, cuts it into the same *global* batches
  of ``batch_size`` windows, and keeps every ``world_size``-th row of each, starting at
  its rank. The global batch is therefore the configured one (per-rank batch = global /
  N), the shards are disjoint and deterministic by seed and epoch, and every rank takes
  the same number of steps. A last, short batch is padded with the epoch's first windows
  (as ``torch.utils.data.DistributedSampler`` pads) so each rank gets as many rows.
- **agreement**: the time budget and a non-finite loss end training on every rank at
  the same step (one small all-reduce per step), and the validation score, computed on
  rank 0 only, is broadcast so every rank takes the same early-stopping decision.
- **a final check** (:func:`require_same_weights`): the ranks must end with identical
  weights, or the run fails instead of writing a model only rank 0 believes in.

Rank 0 alone evaluates and writes checkpoints (``training/daily.py``); the others train
and leave. gloo on CPU, NCCL where CUDA is present (one GPU per process).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from common.errors import UserFacingError

# How long a rank waits for the others at a collective: rank 0 evaluates (and a bootstrap
# backtests) while the others wait at the next one, which takes minutes on ML-1M.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DataParallel:
    """This process' place among the training processes (``SINGLE``: the only one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """Whether other processes train with this one (collectives are needed)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that evaluates, writes checkpoints and reports."""
        return self.rank == 0


SINGLE = DataParallel()


def launched_by_torchrun() -> bool:
    """Whether this process is one of several workers started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def backend() -> str:
    """NCCL where CUDA is present, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def join_from_env() -> DataParallel:
    """Join the process group ``torchrun`` describes in the environment; returns our place.

    On CUDA each process takes the GPU of its local rank and refuses to share one (NCCL
    cannot run two ranks on the same device).
    """
    parallel = DataParallel(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if torch.cuda.is_available():
        if parallel.local_rank >= torch.cuda.device_count():
            raise UserFacingError(
                f"local rank {parallel.local_rank} has no GPU of its own"
                f" ({torch.cuda.device_count()} visible): start at most one training"
                " process per GPU on each machine"
            )
        torch.cuda.set_device(parallel.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend(), timeout=COLLECTIVE_TIMEOUT)
    return parallel


def leave(parallel: DataParallel) -> None:
    """Leave the process group (a no-op for a single process)."""
    if parallel.active and dist.is_initialized():
        dist.destroy_process_group()


def device_for(parallel: DataParallel) -> torch.device:
    """The device this process trains on: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", parallel.local_rank)
    return torch.device("cpu")


def per_rank_batch(batch_size: int, parallel: DataParallel) -> int:
    """The rows one rank trains on per step; the global batch must split evenly."""
    if batch_size % parallel.world_size:
        raise UserFacingError(
            f"train.batch_size {batch_size} does not split evenly over"
            f" {parallel.world_size} processes: choose a multiple of {parallel.world_size}"
        )
    return batch_size // parallel.world_size


def rank_batches(
    n_rows: int, batch_size: int, rng: np.random.Generator, parallel: DataParallel
) -> list[np.ndarray]:
    """This rank's rows of every global batch of one epoch (see the module docstring).

    Draws one permutation from ``rng`` whatever the world size, so one process and N
    processes see the same global batches in the same order.
    """
    order = rng.permutation(n_rows)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if not parallel.active:
        return batches
    per_rank_batch(batch_size, parallel)
    world = parallel.world_size
    shards = []
    for rows in batches:
        short = -len(rows) % world
        if short:  # pad with the epoch's first windows, cyclically if the epoch is tiny
            rows = np.concatenate([rows, np.resize(order, short)])
        shards.append(rows[parallel.rank :: world])
    return shards


def wrap(module: nn.Module, parallel: DataParallel) -> nn.Module:
    """``module`` under DistributedDataParallel (rank 0's weights broadcast to all)."""
    if not parallel.active:
        return module
    return nn.parallel.DistributedDataParallel(module)


def any_rank(flag: bool, parallel: DataParallel) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if not parallel.active:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_over_ranks(value: float, parallel: DataParallel) -> float:
    """The mean of ``value`` over the ranks (NaN/inf anywhere makes it non-finite)."""
    if not parallel.active:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total.item()) / parallel.world_size


def sum_over_ranks(value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(``value`` summed over the training processes, their number); alone: (value, 1).

    For a loss term whose mean must be over the global batch, not each process' share:
    every process calls it at the same step (a collective).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return value, 1
    total = value.detach().to(_collective_device(), torch.float64).clone()
    dist.all_reduce(total)
    return total.to(value.device), dist.get_world_size()


def from_main(value: float, parallel: DataParallel) -> float:
    """Rank 0's ``value`` on every rank."""
    if not parallel.active:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(box, src=0)
    return float(box.item())


def require_same_weights(model: nn.Module, parallel: DataParallel) -> None:
    """Fail unless every rank holds bit-identical weights (gradients really were averaged).

    Compares per-tensor sums (float64) across ranks with a MAX and a MIN all-reduce: any
    rank that stepped on its own gradients differs in them.
    """
    if not parallel.active:
        return
    sums = torch.stack([t.detach().double().sum() for t in model.state_dict().values()])
    sums = sums.to(_collective_device())
    high, low = sums.clone(), sums.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    same = torch.equal(high, low) or bool(
        torch.all((high == low) | (torch.isnan(high) & torch.isnan(low)))
    )
    if not same:
        raise UserFacingError(
            "the training processes ended with different weights: gradients were not"
            " averaged over all of them; nothing was written"
        )


def _collective_device() -> torch.device:
    """Where collective tensors live: NCCL needs them on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_threads(processes: int) -> int:
    """Intra-op threads per process so that N processes share this machine's cores."""
    return max(1, math.floor((os.cpu_count() or 1) / processes))


def torchrun_command(processes: int, *target: str) -> list[str]:
    """The command line that starts ``processes`` workers of ``target`` on this machine.

    ``--standalone`` rendezvous on a free local port, so concurrent runs do not collide.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        *target,
    ]
