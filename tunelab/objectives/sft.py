"""Supervised fine-tuning: mean cross-entropy over the trained (assistant/completion) tokens."""
from __future__ import annotations

import torch.nn.functional as F

from tunelab.objectives import LossOutput, Objective, register, trained_logits


@register("sft")
class SFT(Objective):
    """loss = sum over trained tokens of -log p(y_t | y_<t), divided by the number of trained
    tokens in the optimizer step."""

    def loss(self, model, batch):
        logits, targets = trained_logits(model, batch)  # (N, V), (N,)
        return LossOutput(F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel())
