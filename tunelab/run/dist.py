"""More than one process: the torch.distributed process group a `torchrun` launch sets up, and the
few collective operations the loop needs (a barrier, sums, a flag every rank agrees on).

A process started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR in its environment)
joins the process group: nccl when it trains on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo
on CPU. That holds at world size 1 too, so one GPU under torchrun runs the distributed code path.
Without torchrun there is no process group and every helper here is a no-op on rank 0 of 1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tunelab.errors import TunelabError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun exports to each process it starts."""


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m tunelab ARGS` with this Python."""
    import sys
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tunelab", *args]


@dataclass(frozen=True)
class Dist:
    """This process's place among the processes training together."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False
    """True when a process group is in use (under torchrun), even at world size 1."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run directory, logs and evaluates."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes (float64, so token counts stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (e.g. a stop request seen by one rank)."""
        return bool(self.sum([float(flag)])[0]) if self.active else flag

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


SINGLE = Dist()
"""One process, no process group."""


def join(device: str) -> Dist:
    """Join the process group when launched by torchrun (once per process); else SINGLE.
    `device` is train.device: cuda (or auto with a GPU) uses nccl, cpu uses gloo."""
    if not launched_by_torchrun():
        return SINGLE
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise TunelabError("train.device: cuda, but this process sees no GPU")
    if not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, active=True)


def leave() -> None:
    """Leave the process group (at the end of a command)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
