"""SpIEL: sparse fine-tuning scaled to LLMs (Ansell et al., 2024, arXiv 2401.16405), the
accumulated-gradient variant SpIEL-AG.

Each target linear layer keeps W frozen and trains a sparse delta: W_eff = W + scatter(values at
indices), k entries per layer, so parameters, gradients and Adam state are O(k) and independent of
the model's size. Every `reselection_steps` steps the active set is updated after a selection
phase of `selection_accumulation_steps` steps:
  rate     p = initial_reselection_rate * (1 - t / num_decay_steps)   (p = 1 at the first selection,
           which replaces the random initial indices entirely);
  prune    the floor(p k) active entries with the smallest |value| (the smallest change from W);
  regrow   candidates = the top-k |dW_eff| entries of the phase's first backward, scored by their
           gradient summed over the phase |sum_t g_t|; the best non-active candidates take the
           pruned slots with value 0. A pruned entry that is re-chosen keeps its slot and value.
Readings we chose (the reference is a PEFT fork with its own optimizer):
- torch AdamW has one step count per tensor, so the reference's per-element age and its seeding of
  new slots' moments from the phase statistics are not available: new slots restart with zero
  moments (reset in place; the Parameter objects never change).
- the step horizon T of the decay is the run's length (train.steps, from the step context), as the
  paper decays over the whole run; `num_decay_steps` sets another one. No selection happens after T.
- weight decay applies to the deltas: an L2 pull toward the pretrained weights, as in the paper.
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
from tunelab.run.device import model_device
from tunelab.options import Options, require
from tunelab.run.context import StepContext


@dataclass(kw_only=True)
class SpIELConfig(Options):
    ranges: ClassVar = {"density": "(0, 1]", "num_tunable_weights": ">= 1",
                        "selection_accumulation_steps": ">= 1", "initial_reselection_rate": "[0, 1]",
                        "num_decay_steps": ">= 1"}
    num_tunable_weights: int | None = None
    """Total number of deltas across target layers, split proportionally to layer size (the paper
    matches a LoRA's parameter count). None: use `density`."""
    density: float = 0.01
    """Fraction of the target layers' weights that carry a delta, when num_tunable_weights is None."""
    target_modules: list[str] = ("all-linear",)
    """Linear layers with a delta (LoRA's matching rules); the paper uses q,k,v,o,gate,up,down."""
    reselection_steps: int = 20
    """Steps between the starts of two selection phases."""
    selection_accumulation_steps: int = 5
    """Steps over which gradients of candidate entries are accumulated before a selection."""
    initial_reselection_rate: float = 0.2
    """Fraction of the deltas replaced at the second selection; decays linearly to 0."""
    num_decay_steps: int | None = None
    """Step at which the reselection rate reaches 0; None: the run's last step (train.steps)."""
    seed: int = 0
    """Seeds the random initial indices."""

    def validate(self) -> None:
        self.target_modules = list(self.target_modules)
        require(self.selection_accumulation_steps <= self.reselection_steps, "selection_accumulation_steps",
                f"must be in [1, reselection_steps], got {self.selection_accumulation_steps}")


class SpIELLinear(S.SparseDeltaLinear):
    """A sparse-delta layer that, while `accumulating`, keeps k regrowth candidates:
    `cand_indices` (k,), their summed gradients `cand_grads` (k,), `cand_count` backwards seen."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor):
        super().__init__(base, indices)
        k, dev = len(indices), base.weight.device
        self.accumulating = False
        self.register_buffer("cand_indices", torch.zeros(k, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("cand_grads", torch.zeros(k, device=dev), persistent=False)
        self.register_buffer("cand_count", torch.zeros(1, dtype=torch.int64, device=dev), persistent=False)

    @torch.no_grad()
    def on_weight_grad(self, grad: torch.Tensor) -> None:
        if not self.accumulating or len(self.cand_indices) == 0:
            return
        g = grad.reshape(-1).float()                   # (out * in,) this backward's dense gradient
        if int(self.cand_count) == 0:
            self.cand_indices.copy_(torch.topk(g.abs(), len(self.cand_indices), sorted=False).indices)
            self.cand_grads.zero_()
        self.cand_grads += g[self.cand_indices]
        self.cand_count += 1

    @torch.no_grad()
    def reselect(self, p: float, optimizer) -> torch.Tensor:
        """Prune floor(p k) smallest-|value| deltas, regrow the best candidates; returns the
        changed slots."""
        k, count = len(self.sparse_values), int(self.cand_count)
        self.cand_count.zero_()
        if count == 0 or int(k * p) == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.sparse_values.device)
        out_slots = torch.topk(self.sparse_values.abs(), int(k * p), largest=False, sorted=True).indices
        stay = torch.ones(k, dtype=torch.bool, device=out_slots.device)
        stay[out_slots] = False
        valid = ~torch.isin(self.cand_indices, self.sparse_indices[stay])
        cands, scores = self.cand_indices[valid], self.cand_grads[valid].abs()
        incoming = cands[torch.topk(scores, min(len(out_slots), len(cands))).indices]
        outgoing = self.sparse_indices[out_slots]
        slots = out_slots[~torch.isin(outgoing, incoming)]          # re-chosen ones keep their slot
        incoming = incoming[~torch.isin(incoming, outgoing)]
        slots = slots[: len(incoming)]                               # smallest |value| first
        self.sparse_indices[slots] = incoming
        self.sparse_values[slots] = 0.0
        S.reset_moments(optimizer, self.sparse_values, slots)
        return slots


@register("spiel")
class SpIEL(Method):
    """Sparse fine-tuning with prune-and-regrow (SpIEL-AG); see the module docstring."""

    Config = SpIELConfig
    private_why = ("its regrowth accumulates raw, unclipped gradients of candidate weights during "
                   "backward, which DP-SGD's accounting does not cover")
    parallel = ()
    single_process_why = "its regrowth candidates come from each process's own dense gradients"

    def apply(self, model):
        freeze_all(model)
        names = target_linears(model, self.cfg.target_modules)
        sizes = [model.get_submodule(n).weight.numel() for n in names]
        total = self.cfg.num_tunable_weights or max(1, int(self.cfg.density * sum(sizes)))
        g = torch.Generator().manual_seed(self.cfg.seed)
        for n, numel, k in zip(names, sizes, S.split_budget(sizes, total)):
            idx = torch.randperm(numel, generator=g, device="cpu")[:k].sort().values  # host RNG: same support on any device
            set_module(model, n, SpIELLinear(model.get_submodule(n), idx))
        S.root_buffer(model, "spiel_step", torch.zeros(1, dtype=torch.int64, device=model_device(model)))
        self._arm(model, self.horizon(None))
        return model

    # -- schedule: phases accumulate during steps t with (t - 1) % R < A; selection after t = A + jR
    def _arm(self, model, horizon: float) -> None:
        """Accumulate candidates during the next step if it falls in a selection phase before `horizon`."""
        done = int(model.spiel_step)
        on = done % self.cfg.reselection_steps < self.cfg.selection_accumulation_steps
        for m in S.sparse_layers(model).values():
            m.accumulating = on and done < horizon

    def horizon(self, ctx: StepContext | None) -> float:
        """T of the decay: num_decay_steps, else the run's length (unknown outside a step: no bound)."""
        return self.cfg.num_decay_steps or (ctx.total_steps if ctx is not None else float("inf"))

    def rate(self, step: int, horizon: float) -> float:
        if step == self.cfg.selection_accumulation_steps:
            return 1.0
        return max(0.0, self.cfg.initial_reselection_rate * (1 - step / horizon))

    def on_step(self, model, ctx: StepContext, optimizer) -> None:
        step, horizon = ctx.step, self.horizon(ctx)
        model.spiel_step.fill_(step)
        a, r = self.cfg.selection_accumulation_steps, self.cfg.reselection_steps
        if step >= a and (step - a) % r == 0 and step <= horizon:
            p = self.rate(step, horizon)
            for m in S.sparse_layers(model).values():
                m.reselect(p, optimizer)
        self._arm(model, horizon)

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        return decay_groups([m.sparse_values for m in S.sparse_layers(model).values()], weight_decay,
                            decay_vectors=True)

    # -- state
    def trainable_state(self, model) -> dict:
        return S.layer_state(model, ("sparse_indices", "cand_indices", "cand_grads", "cand_count")) | {
            "spiel_step": model.spiel_step}

    def load_trainable_state(self, model, state: dict) -> None:
        S.load_state(model, state, set(self.trainable_state(model)))
        self._arm(model, self.horizon(None))

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        S.save_sparse(model, out_dir, self.name, self.cfg, {"base_model": base_name})

    def load(self, model, out_dir: Path) -> None:
        state, _ = S.read_sparse(out_dir)
        S.load_state(model, state, set(S.layer_state(model)))

    def merge(self, model):
        S.drop_root_buffers(model, "spiel_")
        return S.merge_layers(model)

    def disabled(self, model):
        return S.layers_disabled(model)
