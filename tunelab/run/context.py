"""Where training is when a hook runs: the step context every method and objective hook receives.

Hooks read the step from here, never from the state of the model (no "a gradient is None, so this
must be a new step" detection) and never from a copy of `train.steps` in their own options.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepContext:
    step: int
    """The optimizer step being computed, 1-based (in `Method.on_step`: the step just taken)."""
    total_steps: int
    """The run's length in optimizer steps (train.steps)."""
    micro_batch: int = 0
    """Which micro-batch of the step this forward computes (0-based; this process's own)."""
    num_micro_batches: int = 1
    """Micro-batches per optimizer step on this process (train.grad_accum)."""
    rank: int = 0
    """This process's rank among the processes training together (0 on one device)."""
    world_size: int = 1
    """How many processes train together."""

    def __post_init__(self):
        assert 1 <= self.step and 1 <= self.total_steps, self
        assert 0 <= self.micro_batch < self.num_micro_batches and 0 <= self.rank < self.world_size, self

    @property
    def progress(self) -> float:
        """The fraction of the run done before this step: (step - 1) / total_steps, in [0, 1)."""
        return (self.step - 1) / self.total_steps

    def at_micro_batch(self, index: int) -> StepContext:
        return StepContext(step=self.step, total_steps=self.total_steps, micro_batch=index,
                           num_micro_batches=self.num_micro_batches, rank=self.rank, world_size=self.world_size)


OUTSIDE_TRAINING = StepContext(step=1, total_steps=1)
"""What a hook sees when called outside the loop (evaluation, a test): the one step of a one-step
run, on the only process."""
