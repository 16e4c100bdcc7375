"""A deterministic, resumable stream of micro-batches: each epoch is a seeded permutation of the
examples; the position (epoch, index) is all a checkpoint needs to continue the same order."""
from __future__ import annotations

import torch

from tunelab.data import collate
from tunelab.data.records import Example


class BatchStream:
    def __init__(self, examples: list[Example], micro_batch_size: int, *, seed: int, packing: bool,
                 pad_id: int, epoch: int = 0, pos: int = 0):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.size, self.seed = examples, micro_batch_size, seed
        self.packing, self.pad_id = packing, pad_id
        self.epoch, self.pos = epoch, pos
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def _next_index(self) -> int:
        if self.pos == len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        i = self._order[self.pos]
        self.pos += 1
        return i

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        chosen = [self.examples[self._next_index()] for _ in range(self.size)]
        return collate(chosen, packing=self.packing, pad_id=self.pad_id)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def seek(self, epoch: int, pos: int) -> None:
        """Continue from a `state()`: the same order from the same position."""
        self.epoch, self.pos = epoch, pos
        self._order = self._permutation(epoch)
