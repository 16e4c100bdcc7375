"""TrainState: everything a checkpoint holds, saved and restored in one place.

    trainable   the method's trained tensors (its `trainable_state` hook) and the objective's own
                (`state_dict`, under `objective.`)
    optimizer   every optimizer tensor (moments, step counts) by parameter index, and its groups
    rng         torch's CPU and CUDA generators and Python's `random` (each process's own)
    state.json  the scheduler, the data position (epoch, index), the step, the batch layout
                (micro-batch, accumulation, processes) and the non-tensor parts of the above

One process writes trainable/optimizer/rng.safetensors itself; several write the same names through
torch.distributed.checkpoint (training/checkpoint.py). Either layout restores on any number of
processes: a sharded parameter reads its own slice. An exact resume restores all of it: the next
step computes what an uninterrupted run would have (tests/test_train.py, tests/test_distributed.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.run.dist import SINGLE, Dist
from tunelab.training import checkpoint as ckpt
from tunelab.training.batches import BatchStream

OBJECTIVE = "objective."
"""Key prefix of the objective's tensors among the trainable ones."""
_OPTIMIZER_KEY = re.compile(r"^(\d+)\.(\w+)$")


def method_tensors(trainable: dict) -> dict:
    """The method's part of a checkpoint's trainable tensors (the objective's removed)."""
    return {k: v for k, v in trainable.items() if not k.startswith(OBJECTIVE)}


@dataclass
class TrainState:
    model: object
    method: object
    objective: object
    optimizer: object
    scheduler: object
    stream: BatchStream
    step: int = 0
    """Optimizer steps done."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each process."""
    dist: Dist = SINGLE
    seed: int = 0
    """train.seed (a rank new to a resumed run seeds its RNG streams from it)."""
    sharded_files: bool = False
    """Write checkpoints through torch.distributed.checkpoint (a run on several processes)."""
    private: object = None
    """privacy.dp_sgd: a tunelab.privacy.PrivateGradients that computes the step's gradients
    (clipped per example, noised) instead of training.step.forward_backward; None otherwise. It
    holds no state of its own: its noise comes from torch's generator, saved with `rng`."""

    def trainable(self) -> dict:
        """What the method and the objective trained, by name."""
        own = {OBJECTIVE + k: v for k, v in self.objective.state_dict().items()}
        return self.method.trainable_state(self.model) | own

    def layout(self) -> dict:
        """How a step is split: the micro-batch, the accumulation, the processes, the examples per step."""
        world = self.dist.world_size
        return {"micro_batch_size": self.stream.size, "grad_accum": self.grad_accum, "world_size": world,
                "global_batch": self.stream.size * self.grad_accum * world}

    def save(self, root: Path, keep: int) -> Path:
        """Write ROOT/step-N (N = self.step) and prune ROOT to the newest `keep` checkpoints."""
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(self.optimizer)
        rng_tensors, rng_meta = ckpt.rng_state()
        meta = {"optimizer": opt_meta, "scheduler": self.scheduler.state_dict(), "rng": rng_meta,
                "step": self.step, "data": self.stream.state(), **self.layout()}
        directory = root / f"step-{self.step}"
        if self.sharded_files:
            meta["rng_ranks"] = self.dist.gather(rng_meta)
            path = ckpt.save_sharded(directory, self.trainable() | opt_tensors, rng_tensors, meta, self.dist)
        else:
            saved = ckpt.Saved({"trainable": self.trainable(), "optimizer": opt_tensors, "rng": rng_tensors}, meta)
            path = ckpt.save_checkpoint(directory, saved)
        if self.dist.is_main:
            ckpt.prune(root, keep)
        self.dist.barrier()
        return path

    def restore(self, saved: ckpt.Saved) -> None:
        """Load a checkpoint read by `checkpoint.load_checkpoint` into this state."""
        if saved.sharded or self.sharded_files:
            trainable, opt_tensors = self._read_in_place(saved.directory)
        else:
            trainable, opt_tensors = saved.tensors["trainable"], saved.tensors["optimizer"]
        self.objective.load_state_dict({k[len(OBJECTIVE):]: v for k, v in trainable.items() if k.startswith(OBJECTIVE)})
        self.method.load_trainable_state(self.model, method_tensors(trainable))
        ckpt.optimizer_from_flat(self.optimizer, opt_tensors, saved.meta["optimizer"])
        self.scheduler.load_state_dict(saved.meta["scheduler"])
        ckpt.load_rng(saved, self.dist.rank, self.seed)
        self.stream.seek(**saved.meta["data"])
        self.step = saved.meta["step"]

    def _read_in_place(self, directory: Path) -> tuple[dict, dict]:
        """(trainable, optimizer tensors) of a checkpoint of either layout, read into this process's
        own tensors (its slices of sharded ones): the trained tensors themselves, and optimizer
        moments allocated like their parameters for every entry the checkpoint has."""
        trainable = self.trainable()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt_tensors = {}
        for key in sorted(ckpt.checkpoint_keys(directory)):
            if (m := _OPTIMIZER_KEY.match(key)) and key not in trainable:
                p = params[int(m.group(1))]
                opt_tensors[key] = torch.zeros((), dtype=torch.float32, device="cpu") if m.group(2) == "step" else torch.zeros_like(p)
        ckpt.load_tensors(directory, trainable | opt_tensors)
        return trainable, opt_tensors
