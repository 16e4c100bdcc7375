"""Supervised fine-tuning: mean cross-entropy over the trained (assistant/completion) tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from tunelab.errors import ConfigError
from tunelab.objectives import (LossOutput, Objective, chunked_head_cross_entropy, register, trained_hidden,
                                trained_logits)


@dataclass(kw_only=True)
class SFTConfig:
    chunk_tokens: int = 4096
    """Apply the output head and cross-entropy to at most this many trained tokens at a time
    (checkpointed per chunk), so the full (tokens, vocab) fp32 logits never exist at once."""

    def __post_init__(self):
        if self.chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens: must be >= 1, got {self.chunk_tokens}")


@register("sft")
class SFT(Objective):
    """loss = sum over trained tokens of -log p(y_t | y_<t), divided by the number of trained
    tokens in the optimizer step. The head runs on trained positions only, in chunks."""
    per_token = True

    Config = SFTConfig

    def loss(self, model, batch):
        hidden, targets = trained_hidden(model, batch)  # (N, d), (N,)
        if hidden is None:  # a head that transforms its logits: the model's own forward
            logits, targets = trained_logits(model, batch)
            return LossOutput(F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel())
        head = model.get_output_embeddings()
        return LossOutput(chunked_head_cross_entropy(hidden, head, targets, self.cfg.chunk_tokens), targets.numel())
