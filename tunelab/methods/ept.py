"""EPT: Efficient Prompt Tuning by Multi-Space Projection and Prompt Fusion (Lan et al., arXiv 2405.11464).

EPT = DePT (tunelab.methods.dept: short prompt P_s (m, d) + low-rank position-wise update
(α/√r)·A[t] B of the input embeddings, two learning rates) whose prompt is produced by a generator:

  prompt fusion   P_f = P_s + γ · softmax((P_s W_q)(M W_k)ᵀ / √k) · M,   M = [P_s; B]  ((m + r), d)
                  the short prompt attends over a memory of its own rows and the rows of B, which
                  span the subspace the embedding update moves in; W_q, W_k: (d, k); γ a scalar.
  multi-space     P = Σ_i g_i · P_f W_i,   W_i = I + U_i V_i  (U_i: (d, k_s), V_i: (k_s, d)),
  projection      g = softmax(MLP(mean over rows of P_f)) ∈ Δ^N: the gate sees only the prompt,
                  never the input, so every example gets the same prompt.

No reference code exists and the paper's equations are unverified (brief §8); these are our
readings, chosen so that EPT *starts exactly at DePT*: γ = 0 and V_i = 0 at init, so P = P_s
(tested). A single space (N = 1) has no projection: a lone learned map of a free prompt only
re-parameterises it, so with N = 1 and fusion off EPT is DePT exactly, after training too (tested).
The gate, fusion and projection train with the prompt's learning rate, A and B with DePT's other.

Output: tunelab's own safetensors (names `prompt.*`); PEFT has no EPT type and cannot load it. The
generated prompt is extra positions: no merge. Disable recovers the base model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from tunelab.methods import register
from tunelab.methods._prompt_base import initial_prompt
from tunelab.methods.dept import DePT, DePTConfig, DecomposedPrompt


@dataclass(kw_only=True)
class EPTConfig(DePTConfig):
    ranges: ClassVar = {"num_spaces": ">= 1", "space_rank": ">= 1", "fusion_rank": ">= 1",
                        "gate_hidden": ">= 1"}
    num_spaces: int = 4
    """N: projection subspaces mixed by the gate; 1 turns the projection off."""
    space_rank: int = 8
    """k_s: rank of each space's residual map W_i = I + U_i V_i."""
    fusion: bool = True
    """Prompt fusion: the short prompt attends over [P_s; B] before projection."""
    fusion_rank: int = 16
    """k: width of the fusion attention's query/key projections."""
    gate_hidden: int = 32
    """Hidden width of the gating MLP."""


class EPTPrompt(DecomposedPrompt):
    """DePT's prompt and embedding update, with the prompt passed through fusion and projection."""

    def __init__(self, embedding: torch.Tensor, cfg: EPTConfig):
        super().__init__(embedding, cfg.r, cfg.max_positions, cfg.scaling)
        d, like = embedding.shape[1], dict(device=embedding.device, dtype=embedding.dtype)
        self.num_spaces = cfg.num_spaces
        if cfg.fusion:
            self.fusion_q = nn.Parameter(torch.randn(d, cfg.fusion_rank, **like) / math.sqrt(d))
            self.fusion_k = nn.Parameter(torch.randn(d, cfg.fusion_rank, **like) / math.sqrt(d))
            self.fusion_gate = nn.Parameter(torch.zeros((), **like))  # γ = 0: fusion starts as identity
        if cfg.num_spaces > 1:
            self.space_U = nn.Parameter(torch.randn(cfg.num_spaces, d, cfg.space_rank, **like) / math.sqrt(d))
            self.space_V = nn.Parameter(torch.zeros(cfg.num_spaces, cfg.space_rank, d, **like))  # W_i = I at init
            self.gate = nn.Sequential(nn.Linear(d, cfg.gate_hidden, **like), nn.Tanh(),
                                      nn.Linear(cfg.gate_hidden, cfg.num_spaces, **like))

    def fused(self) -> torch.Tensor:
        """P_f (m, d)."""
        P = self.embedding
        if not hasattr(self, "fusion_gate"):
            return P
        memory = torch.cat([P, self.lora_B], dim=0)  # (m + r, d)
        scores = (P @ self.fusion_q) @ (memory @ self.fusion_k).T / math.sqrt(self.fusion_q.shape[1])  # (m, m + r)
        return P + self.fusion_gate * (scores.softmax(-1) @ memory)

    def gates(self, fused: torch.Tensor) -> torch.Tensor:
        """g (N,): softmax of the gating MLP on the mean prompt row."""
        return self.gate(fused.mean(0)).softmax(-1)

    def prompt(self) -> torch.Tensor:
        P_f = self.fused()
        if self.num_spaces == 1:
            return P_f
        spaces = P_f + torch.einsum("md,nde,nef->nmf", P_f, self.space_U, self.space_V)  # (N, m, d) = P_f W_i
        return torch.einsum("n,nmf->mf", self.gates(P_f), spaces)


@register("ept")
class EPT(DePT):
    """DePT with a generated prompt: prompt fusion + gated multi-space projection. See the module docstring."""

    Config = EPTConfig

    def build(self, model):
        return EPTPrompt(initial_prompt(model, self.cfg), self.cfg)
