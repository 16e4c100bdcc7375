"""DePT: Decomposed Prompt Tuning (Shi & Lipani, ICLR 2024, arXiv 2309.05173).

A short soft prompt P (m, d) plus a position-wise low-rank update of the frozen token embeddings:
    E'(x)_t = E(x)_t + (α / √r) · A[t] B,   A: (s, r), B: (r, d),   input = [P; E'(x)]
A is Kaiming-uniform (a = √5) and B zero, so DePT starts as prompt tuning with m tokens. P and
(A, B) train with two learning rates (two optimizer groups; one schedule scales both), as in
DePT's train.py. Trainable parameters: m·d + r·(s + d).

Readings chosen for a causal LM (DePT was built on T5 with inputs padded to exactly s tokens):
t is the token's position *within its example* (so packed rows and left-padded generation index A
correctly) and tokens at positions >= s get no update (A[:seq_len], the brief's reading for
variable lengths). The prompt runs as a K/V prefix (see tunelab.methods._prefix), equal to the
concatenated forward.

Output: tunelab's own safetensors (`prompt.embedding`, `prompt.lora_A`, `prompt.lora_B`); PEFT has
no DePT type, so PEFT cannot load it. The embedding update alone could be folded into a model only
as a per-position table, and the prompt cannot be folded at all: no merge. Disable recovers the base.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from tunelab.methods import register
from tunelab.methods._prompt_base import PrefixMethod, SoftPrompt, SoftPromptConfig, initial_prompt


@dataclass(kw_only=True)
class DePTConfig(SoftPromptConfig):
    ranges: ClassVar = {"r": ">= 1", "max_positions": ">= 1", "prompt_lr": "> 0", "lowrank_lr": "> 0"}
    num_virtual_tokens: int = 40
    """m: length of the short soft prompt (DePT: 40 or 60, replacing a 100-token prompt)."""
    r: int = 45
    """Rank of the embedding update A B."""
    alpha: float = 8.0
    """Scale numerator: the update is multiplied by alpha / sqrt(r) (DePT's lora_alpha)."""
    max_positions: int = 256
    """s: rows of A, one per position; tokens at positions >= s get no update (DePT's max_length)."""
    prompt_lr: float | None = None
    """Learning rate of the prompt P (DePT's grid: 3e-1, 4e-1); None: train.lr."""
    lowrank_lr: float | None = 5e-3
    """Learning rate of A and B (DePT's lora_embedding_lr; grid 5e-3, 3e-1, 5e-4); None: train.lr."""

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r)


class DecomposedPrompt(SoftPrompt):
    """P plus the low-rank position-wise embedding update (A, B)."""

    def __init__(self, embedding: torch.Tensor, r: int, max_positions: int, scaling: float):
        super().__init__(embedding)
        d = embedding.shape[1]
        self.lora_A = nn.Parameter(embedding.new_empty(max_positions, r))  # (s, r)
        self.lora_B = nn.Parameter(embedding.new_zeros(r, d))  # (r, d)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = scaling

    def delta(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(B or 1, T) positions -> (B or 1, T, d): (α/√r)·A[t] B, zero where t >= s or t < 0."""
        s = self.lora_A.shape[0]
        inside = (position_ids >= 0) & (position_ids < s)
        rows = self.lora_A[position_ids.clamp(0, s - 1)] * inside[..., None]  # (B, T, r)
        return (rows @ self.lora_B) * self.scaling

    def update_embeds(self, embeds, position_ids):
        return embeds + self.delta(position_ids).to(embeds.dtype)


def two_lr_groups(first: list, second: list, first_lr: float | None, second_lr: float | None,
                  weight_decay: float) -> list[dict]:
    """Two AdamW groups, each with its own lr where given (else the optimizer's, i.e. train.lr)."""
    groups = []
    for params, lr in ((first, first_lr), (second, second_lr)):
        group = {"params": params, "weight_decay": weight_decay}
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return groups


@register("dept")
class DePT(PrefixMethod):
    """Short soft prompt + low-rank position-wise update of the input embeddings, two learning rates."""

    Config = DePTConfig
    attr = "prompt"

    def build(self, model):
        c = self.cfg
        return DecomposedPrompt(initial_prompt(model, c), c.r, c.max_positions, c.scaling)

    def lowrank_params(self, model) -> list[nn.Parameter]:
        src = self.source(model)
        return [src.lora_A, src.lora_B]

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        low = {id(p) for p in self.lowrank_params(model)}
        prompt = [p for p in self.source(model).parameters() if id(p) not in low]
        return two_lr_groups(prompt, self.lowrank_params(model), self.cfg.prompt_lr, self.cfg.lowrank_lr,
                             weight_decay)
