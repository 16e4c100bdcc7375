"""LIFT: Low-rank Informed sparse Fine-Tuning (Liu et al., ICML 2025, arXiv 2506.00772).

Only the "principal weights" train. For each target matrix W (m x n, every linear but the output
head): take the rank-r approximation W_r = U_r diag(s_r) V_rᵀ of the current weight (r =
filter_rank, SVD in fp32), and train the k = min((m + n) * lora_rank, m * n) entries where |W_r| is
largest (a LoRA of rank lora_rank has the same parameter count). Every `update_interval` steps
the mask is recomputed from the current weight; entries that stay keep their value and Adam
moments, new entries start at 0 with zero moments (the reference's sparse AdamW).

Parameterization (ours): W_eff = W + P + D, W frozen, D the trained delta (`sparse_values`, k per
matrix, so gradients and Adam state are O(k)); when an entry leaves the mask its delta moves into
P, a frozen sparse buffer (`past_indices`, `past_values`), so the base weights are never written
and disabling the method recovers the base model. P is at most the union of all masks so far.
Readings we chose: weight decay acts on the delta D (the reference decays the masked entries of W
itself); embeddings, norms and the head stay frozen, as in all of the reference's configs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from tunelab.methods import Method, register
from tunelab.methods import _sparse as S
from tunelab.methods._shared import decay_groups, freeze_all, set_module, target_linears
from tunelab.options import Options
from tunelab.run.context import StepContext


@dataclass(kw_only=True)
class LIFTConfig(Options):
    ranges: ClassVar = {"lora_rank": ">= 1", "filter_rank": ">= 1", "update_interval": ">= 0"}
    lora_rank: int = 128
    """Budget per matrix: k = min((m + n) * lora_rank, m * n) principal weights (the reference's
    README default 128; about 6% of a 4096 x 4096 matrix -- use ~16 for a 576-wide model)."""
    filter_rank: int = 128
    """Rank r of the low-rank approximation whose largest-magnitude entries are selected."""
    update_interval: int = 400
    """Recompute the masks every this many optimizer steps (0: never)."""
    target_modules: list[str] = ("all-linear",)
    """Linear layers to fine-tune (LoRA's matching rules; the output head never)."""
    randomized_svd: bool = False
    """Use torch.svd_lowrank (q = 2r, 2 power iterations) instead of the full SVD (large models)."""

    def validate(self) -> None:
        self.target_modules = list(self.target_modules)


def num_principal(shape: torch.Size, lora_rank: int) -> int:
    m, n = shape
    return min((m + n) * lora_rank, m * n)


@torch.no_grad()
def principal_indices(weight: torch.Tensor, k: int, filter_rank: int, randomized: bool = False) -> torch.Tensor:
    """Sorted flat indices of the k largest entries of |rank-r approximation of weight|."""
    w = weight.float()
    r = min(filter_rank, *w.shape)
    if randomized:
        u, s, v = torch.svd_lowrank(w, q=min(2 * r, *w.shape), niter=2)
        low = (u[:, :r] * s[:r]) @ v[:, :r].T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        low = (u[:, :r] * s[:r]) @ vh[:r]                          # (m, n)
    return torch.topk(low.abs().reshape(-1), k, sorted=False).indices.sort().values


class PrincipalLinear(S.SparseDeltaLinear):
    """A sparse delta on the principal weights plus the frozen deltas of entries that left it."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor):
        super().__init__(base, indices)
        dev = base.weight.device
        self.register_buffer("past_indices", torch.zeros(0, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("past_values", torch.zeros(0, device=dev), persistent=False)

    def fixed_terms(self) -> tuple:
        return ((self.past_indices, self.past_values),) if len(self.past_indices) else ()

    @torch.no_grad()
    def retire(self, idx: torch.Tensor, vals: torch.Tensor) -> None:
        """Move deltas into the frozen past, summing entries that were retired before."""
        all_idx, inv = torch.unique(torch.cat([self.past_indices, idx]), return_inverse=True)
        summed = torch.zeros(len(all_idx), device=vals.device)
        self.past_indices = all_idx
        self.past_values = summed.index_add_(0, inv, torch.cat([self.past_values, vals]))

    @torch.no_grad()
    def refresh(self, new_idx: torch.Tensor, optimizer) -> None:
        old_idx, values = self.sparse_indices, self.sparse_values
        sorted_old, order = old_idx.sort()
        pos = torch.searchsorted(sorted_old, new_idx).clamp(max=len(old_idx) - 1)
        found = sorted_old[pos] == new_idx
        source = torch.where(found, order[pos], torch.full_like(pos, -1))   # new slot -> old slot
        leaving = ~torch.isin(old_idx, new_idx)
        self.retire(old_idx[leaving], values[leaving])
        values.copy_(torch.where(found, values[source.clamp(min=0)], torch.zeros_like(values)))
        self.sparse_indices.copy_(new_idx)
        S.reset_moments(optimizer, values, torch.zeros(0, dtype=torch.int64, device=values.device), source)


@register("lift")
class PrincipalWeights(Method):
    """Principal-weight sparse fine-tuning; see the module docstring."""

    Config = LIFTConfig

    def apply(self, model):
        freeze_all(model)
        for n in target_linears(model, self.cfg.target_modules):
            base = model.get_submodule(n)
            k = num_principal(base.weight.shape, self.cfg.lora_rank)
            idx = principal_indices(base.weight, k, self.cfg.filter_rank, self.cfg.randomized_svd)
            set_module(model, n, PrincipalLinear(base, idx))
        return model

    def on_step(self, model, ctx: StepContext, optimizer) -> None:
        if self.cfg.update_interval and ctx.step % self.cfg.update_interval == 0:
            self.refresh(model, optimizer)

    @torch.no_grad()
    def refresh(self, model, optimizer=None) -> None:
        for m in S.sparse_layers(model).values():
            w = m.dense_weight(m.base_layer.weight, m.sparse_values)   # the current weight
            m.refresh(principal_indices(w, len(m.sparse_indices), self.cfg.filter_rank,
                                        self.cfg.randomized_svd), optimizer)

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        return decay_groups([m.sparse_values for m in S.sparse_layers(model).values()], weight_decay,
                            decay_vectors=True)

    def trainable_state(self, model) -> dict:
        return S.layer_state(model, ("sparse_indices", "past_indices", "past_values"))

    def load_trainable_state(self, model, state: dict) -> None:
        S.load_state(model, state, set(self.trainable_state(model)))

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        S.save_sparse(model, out_dir, self.name, self.cfg, {"base_model": base_name})

    def load(self, model, out_dir: Path) -> None:
        state, _ = S.read_sparse(out_dir)
        renamed = {k.replace(".fixed0_", ".past_"): v for k, v in state.items()}
        for n, m in S.sparse_layers(model).items():  # entries never retired: an empty past
            renamed.setdefault(f"{n}.past_indices", torch.zeros(0, dtype=torch.int64, device=m.sparse_values.device))
            renamed.setdefault(f"{n}.past_values", torch.zeros(0, device=m.sparse_values.device))
        S.load_state(model, renamed, set(self.trainable_state(model)))

    def merge(self, model):
        return S.merge_layers(model)

    def disabled(self, model):
        return S.layers_disabled(model)
