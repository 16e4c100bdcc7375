"""Supervised fine-tuning: mean cross-entropy over the trained (assistant/completion) tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tunelab.objectives import LossOutput, Objective, register, sum_cross_entropy
from tunelab.options import Options
from tunelab.run.context import OUTSIDE_TRAINING, StepContext


@dataclass(kw_only=True)
class SFTConfig(Options):
    ranges: ClassVar = {"chunk_tokens": ">= 1"}
    chunk_tokens: int = 4096
    """Apply the output head and cross-entropy to at most this many trained tokens at a time
    (fused with the loss; see objectives/_head_ce.py), so the full (tokens, vocab) fp32 logits
    never exist at once."""


@register("sft")
class SFT(Objective):
    """loss = sum over trained tokens of -log p(y_t | y_<t), divided by the number of trained
    tokens in the optimizer step. The head runs on trained positions only, in chunks."""
    per_token = True

    Config = SFTConfig

    def loss(self, model, batch, ctx: StepContext = OUTSIDE_TRAINING):
        return LossOutput(*sum_cross_entropy(model, batch, self.cfg.chunk_tokens))
