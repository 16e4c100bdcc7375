"""Token-level training objectives. Each module in this package registers one.

Public surface: `Objective` (base class), `LossOutput`, `OBJECTIVES` (the registry), `register`,
`model_inputs` (from tunelab.data) and `token_cross_entropy` (shared helpers).

An objective returns the *sum* of its per-token losses and the number of tokens it counted; the
loop divides by the step's total, so gradient accumulation never depends on how a step is split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tunelab.data.collate import IGNORE, model_inputs
from tunelab.registry import Registry

OBJECTIVES: Registry["Objective"] = Registry("objective", __name__)
register = OBJECTIVES.register
__all__ = ["IGNORE", "OBJECTIVES", "LossOutput", "Objective", "model_inputs", "register", "token_cross_entropy"]


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    """Sum of per-token losses (a scalar with grad)."""
    num_tokens: int
    """How many tokens the sum counts: the normaliser the loop uses."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Per-step figures the objective reports (written to metrics.jsonl)."""


@dataclass(kw_only=True)
class NoOptions:
    """This objective takes no options."""


class Objective:
    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions

    def __init__(self, cfg: Any = None):
        self.cfg = cfg if cfg is not None else self.Config()

    def setup(self, model, tokenizer) -> None:
        """Called once before training (e.g. to read token ids from the tokenizer)."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens this objective will count in `batch` (known before the forward pass)."""
        return int((batch["targets"] != IGNORE).sum())

    def loss(self, model, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE in fp32, (B, T, V) x (B, T) -> (B, T); 0 where target == IGNORE."""
    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="none")
    return flat.view(targets.shape)
