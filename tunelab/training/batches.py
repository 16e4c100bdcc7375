"""A deterministic, resumable stream of micro-batches: each epoch is a seeded permutation of the
examples; the position (epoch, index) is all a checkpoint needs to continue the same order.

On several processes every rank walks the same permutation: each micro-batch takes the next
`micro_batch_size * world_size` examples and rank r keeps the r-th run of `micro_batch_size` of
them, packed on its own. So N processes with micro-batch m see, per step, exactly the examples one
process with micro-batch N*m sees, and the position stays one number for every world size."""
from __future__ import annotations

import torch

from tunelab.data import collate
from tunelab.data.records import Example


class BatchStream:
    def __init__(self, examples: list[Example], micro_batch_size: int, *, seed: int, packing: bool,
                 pad_id: int, epoch: int = 0, pos: int = 0, rank: int = 0, world_size: int = 1):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.size, self.seed = examples, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.packing, self.pad_id = packing, pad_id
        self.epoch, self.pos = epoch, pos
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + epoch)  # host-side data order
        return torch.randperm(len(self.examples), generator=g, device="cpu").tolist()

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
        chosen = [self._next_index() for _ in range(self.size * self.world_size)]
        mine = chosen[self.rank * self.size:(self.rank + 1) * self.size]
        return collate([self.examples[i] for i in mine], packing=self.packing, pad_id=self.pad_id)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def seek(self, epoch: int, pos: int) -> None:
        """Continue from a `state()`: the same order from the same position."""
        self.epoch, self.pos = epoch, pos
        self._order = self._permutation(epoch)
