"""Supervised fine-tuning: mean cross-entropy over the trained (assistant/completion) tokens."""
from __future__ import annotations

from tunelab.objectives import IGNORE, LossOutput, Objective, model_inputs, register, token_cross_entropy


@register("sft")
class SFT(Objective):
    """loss = sum over trained tokens of -log p(y_t | y_<t), divided by the number of trained
    tokens in the optimizer step."""

    def loss(self, model, batch):
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
        ce = token_cross_entropy(logits, batch["targets"])
        n = int((batch["targets"] != IGNORE).sum())
        return LossOutput(ce.sum(), n)
