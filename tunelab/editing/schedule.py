"""The order in which edit requests train: breadth-first (LocFT-BF) or depth-first (the editing
literature's pipeline). A schedule calls `step(indices) -> loss` and returns its log; the step
decides whether to update (a mini-batch below the loss threshold takes none)."""
from __future__ import annotations

import random
from collections.abc import Callable
from statistics import fmean

Step = Callable[[list[int]], float]
"""Train on the requests with these indices (one mini-batch); return the batch's loss."""


class BreadthFirst:
    """Epochs over *all* requests: each epoch shuffles them (random.shuffle, seeded) and takes
    mini-batches of `batch_size`; training stops early when an epoch's mean batch loss is below
    `threshold` (LocFT fine-tune.py)."""

    def __init__(self, batch_size: int, epochs: int, threshold: float, seed: int = 0):
        self.batch_size, self.epochs, self.threshold = batch_size, epochs, threshold
        self.rng = random.Random(seed)

    def run(self, n: int, step: Step) -> list[dict]:
        log = []
        for epoch in range(self.epochs):
            order = list(range(n))
            self.rng.shuffle(order)
            losses = [step(order[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]
            log.append({"epoch": epoch, "loss": fmean(losses), "batches": len(losses)})
            if log[-1]["loss"] < self.threshold:
                break
        return log


class DepthFirst:
    """One request at a time, each trained until its loss is below `threshold` or for at most
    `max_steps` steps, before the next one starts."""

    def __init__(self, max_steps: int, threshold: float):
        self.max_steps, self.threshold = max_steps, threshold

    def run(self, n: int, step: Step) -> list[dict]:
        log = []
        for i in range(n):
            losses = []
            while len(losses) < self.max_steps and (not losses or losses[-1] >= self.threshold):
                losses.append(step([i]))
            log.append({"request": i, "loss": losses[-1], "batches": len(losses)})
        return log


def make_schedule(cfg):
    """The schedule an EditConfig names."""
    if cfg.schedule == "breadth_first":
        return BreadthFirst(cfg.batch_size, cfg.epochs, cfg.loss_threshold, cfg.seed)
    return DepthFirst(cfg.epochs, cfg.loss_threshold)
