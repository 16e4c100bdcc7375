"""TrainState: everything a checkpoint holds, saved and restored in one place.

    trainable   the method's trained tensors (its `trainable_state` hook) and the objective's own
                (`state_dict`, under `objective.`)
    optimizer   every optimizer tensor (moments), its step counts and param groups
    rng         torch's CPU and CUDA generators and Python's `random`
    state.json  the scheduler, the data position (epoch, index), the step, and the non-tensor
                parts of the above

An exact resume restores all of it: the next step computes the same numbers as an uninterrupted
run would have (tests/test_train.py::test_resume_equals_uninterrupted).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.training import checkpoint as ckpt
from tunelab.training.batches import BatchStream

OBJECTIVE = "objective."
"""Key prefix of the objective's tensors among the trainable ones."""


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

    def trainable(self) -> dict:
        """What the method and the objective trained, by name."""
        own = {OBJECTIVE + k: v for k, v in self.objective.state_dict().items()}
        return self.method.trainable_state(self.model) | own

    def save(self, root: Path, keep: int) -> Path:
        """Write ROOT/step-N (N = self.step) and prune ROOT to the newest `keep` checkpoints."""
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(self.optimizer)
        rng_tensors, rng_meta = ckpt.rng_state()
        saved = ckpt.Saved({"trainable": self.trainable(), "optimizer": opt_tensors, "rng": rng_tensors},
                           {"optimizer": opt_meta, "scheduler": self.scheduler.state_dict(), "rng": rng_meta,
                            "step": self.step, "data": self.stream.state()})
        path = ckpt.save_checkpoint(root / f"step-{self.step}", saved)
        ckpt.prune(root, keep)
        return path

    def restore(self, saved: ckpt.Saved) -> None:
        """Load a checkpoint read by `checkpoint.load_checkpoint` into this state."""
        trainable = saved.tensors["trainable"]
        self.objective.load_state_dict({k[len(OBJECTIVE):]: v for k, v in trainable.items() if k.startswith(OBJECTIVE)})
        self.method.load_trainable_state(self.model, method_tensors(trainable))
        ckpt.optimizer_from_flat(self.optimizer, saved.tensors["optimizer"], saved.meta["optimizer"])
        self.scheduler.load_state_dict(saved.meta["scheduler"])
        ckpt.set_rng_state(saved.tensors["rng"], saved.meta["rng"])
        self.stream.seek(**saved.meta["data"])
        self.step = saved.meta["step"]
