"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning, composable sparse deltas (Ansell et al., ACL 2022,
arXiv 2110.07560).

Two phases in one run:
  1. full fine-tuning of the target layers for `full_ft_steps` steps: theta0 -> theta1;
  2. mask mu = the K entries with the largest |theta1 - theta0| over all target layers together
     (one global threshold), reset theta <- theta0, then train only the masked entries to the
     end of the run. The result is a sparse difference phi = theta2 - theta0 (indices + values).
Deltas compose by addition: theta = theta0 + phi_language + phi_task (`compose`).

Parameterization (ours): phase 1 trains W in place (theta0 is kept as a frozen copy for the
reset); at the switch W is restored bit-exactly, its Adam state is dropped, and phase 2 trains
`sparse_values`, a Parameter whose length (K for this layer) is set at the switch -- the same
Parameter object, so the optimizer built at the start keeps working. Readings we chose: the
optional L1 pull toward theta0 and several mask iterations (`n_ft_iterations`) of the reference
are not implemented (the method API has no loss hook); a run that stops before the switch saves
theta1 - theta0 as a (dense) sparse delta. The output head, embeddings and norms stay frozen.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from tunelab.methods import Method, register
from tunelab.methods import _sparse as S
from tunelab.methods._shared import decay_groups, freeze_all, set_module, target_linears
from tunelab.run.device import model_device
from tunelab.options import Options
from tunelab.run.context import StepContext


@dataclass(kw_only=True)
class LTSFTConfig(Options):
    ranges: ClassVar = {"full_ft_steps": ">= 1", "density": "(0, 1]", "num_tunable_weights": ">= 1"}
    full_ft_steps: int = 100
    """Phase 1: steps of full fine-tuning of the target layers before the mask is chosen."""
    num_tunable_weights: int | None = None
    """K, the number of entries in the mask (all target layers together). None: use `density`."""
    density: float = 0.01
    """K as a fraction of the target layers' weights, when num_tunable_weights is None."""
    target_modules: list[str] = ("all-linear",)
    """Linear layers that may change (LoRA's matching rules; the output head never)."""

    def validate(self) -> None:
        self.target_modules = list(self.target_modules)


class TicketLinear(S.SparseDeltaLinear):
    """Phase 1: W trains, `theta0` (a frozen copy) waits for the reset. Phase 2: the delta trains."""

    def __init__(self, base: nn.Linear):
        super().__init__(base, torch.zeros(0, dtype=torch.int64, device=base.weight.device))
        self.sparse_values.requires_grad_(False)
        self.register_buffer("theta0", base.weight.detach().clone(), persistent=False)

    @torch.no_grad()
    def start_sparse(self, indices: torch.Tensor) -> None:
        if self.theta0.numel():                                 # the reset theta <- theta0
            self.base_layer.weight.copy_(self.theta0)
            self.theta0 = torch.zeros(0, device=self.theta0.device)
        self.base_layer.weight.requires_grad_(False)
        self.sparse_indices = indices.to(self.sparse_indices.device)
        self.sparse_values.data = torch.zeros(len(indices), device=self.sparse_values.device)
        self.sparse_values.requires_grad_(True)


@torch.no_grad()
def lottery_ticket(diffs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Sorted flat indices, per tensor, of the k entries of largest |diff| over all tensors."""
    flat = torch.cat([d.abs().reshape(-1).float() for d in diffs])
    top = torch.topk(flat, k, sorted=False).indices.sort().values
    bounds = torch.tensor([0] + [d.numel() for d in diffs], device=flat.device).cumsum(0)
    return [top[(top >= lo) & (top < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def compose(model: nn.Module, dirs: list, scale: float = 1.0) -> nn.Module:
    """Add saved sparse deltas (e.g. a language and a task delta) onto a plain base model in
    place and return it: W = W0 + phi_1 + phi_2 + ... (scale=-1 removes them again)."""
    return S.add_sparse_deltas(model, [Path(d) for d in dirs], scale)


@register("lt_sft")
class LotteryTicketSFT(Method):
    """Lottery-ticket sparse fine-tuning; see the module docstring."""

    Config = LTSFTConfig
    parallel = ()
    single_process_why = "its switch to the sparse phase changes which tensors train (fixed at the start on several)"

    def apply(self, model):
        freeze_all(model)
        for n in target_linears(model, self.cfg.target_modules):
            base = model.get_submodule(n)
            base.weight.requires_grad_(True)
            set_module(model, n, TicketLinear(base))
        S.root_buffer(model, "lt_sft_step", torch.zeros(1, dtype=torch.int64, device=model_device(model)))
        return model

    def sparse_phase(self, model) -> bool:
        return int(model.lt_sft_step) >= self.cfg.full_ft_steps

    def budget(self, model) -> int:
        total = sum(m.base_layer.weight.numel() for m in S.sparse_layers(model).values())
        return min(total, self.cfg.num_tunable_weights or max(1, int(self.cfg.density * total)))

    def on_step(self, model, ctx: StepContext, optimizer) -> None:
        model.lt_sft_step.fill_(ctx.step)
        if ctx.step == self.cfg.full_ft_steps and any(m.theta0.numel() for m in S.sparse_layers(model).values()):
            self.switch(model, optimizer)

    @torch.no_grad()
    def switch(self, model, optimizer=None) -> None:
        layers = list(S.sparse_layers(model).values())
        masks = lottery_ticket([m.base_layer.weight - m.theta0 for m in layers], self.budget(model))
        for m, idx in zip(layers, masks):
            if optimizer is not None:
                optimizer.state.pop(m.base_layer.weight, None)   # no dense Adam state in phase 2
            m.start_sparse(idx)

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        layers = S.sparse_layers(model).values()
        return decay_groups([m.base_layer.weight for m in layers] + [m.sparse_values for m in layers],
                            weight_decay, decay_vectors=True)

    # -- state
    def trainable_state(self, model) -> dict:
        if self.sparse_phase(model):
            return S.layer_state(model) | {"lt_sft_step": model.lt_sft_step}
        return {f"{n}.base_layer.weight": m.base_layer.weight.detach()
                for n, m in S.sparse_layers(model).items()} | {"lt_sft_step": model.lt_sft_step}

    def load_trainable_state(self, model, state: dict) -> None:
        step = int(state["lt_sft_step"]) if "lt_sft_step" in state else 0
        if step >= self.cfg.full_ft_steps:
            for n, m in S.sparse_layers(model).items():
                m.start_sparse(state[f"{n}.sparse_indices"])
        model.lt_sft_step.fill_(step)
        S.load_state(model, state, set(self.trainable_state(model)), resizable=True)

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        state = None
        if not self.sparse_phase(model):
            warnings.warn(f"lt_sft: the run ended in phase 1 (before step {self.cfg.full_ft_steps}); "
                          "saving the dense difference theta1 - theta0 as the sparse delta")
            state = _dense_difference(model)
        S.save_sparse(model, out_dir, self.name, self.cfg, {"base_model": base_name}, state)

    def load(self, model, out_dir: Path) -> None:
        state, _ = S.read_sparse(out_dir)
        self.load_trainable_state(model, state | {"lt_sft_step": torch.tensor([self.cfg.full_ft_steps], device=model_device(model))})

    def merge(self, model):
        S.drop_root_buffers(model, "lt_sft_")
        return S.merge_layers(model)

    @contextmanager
    def disabled(self, model):
        """Phase 2: drop the delta. Phase 1 trains W in place: theta0 is swapped in meanwhile."""
        swapped = [m for m in S.sparse_layers(model).values() if m.theta0.numel()]
        for m in swapped:
            m.base_layer.weight.data, m.theta0 = m.theta0, m.base_layer.weight.data
        try:
            with S.layers_disabled(model):
                yield
        finally:
            for m in swapped:
                m.base_layer.weight.data, m.theta0 = m.theta0, m.base_layer.weight.data


@torch.no_grad()
def _dense_difference(model) -> dict[str, torch.Tensor]:
    """Phase 1 output: theta1 - theta0 at its nonzero entries, in the saved-delta layout."""
    state = {}
    for n, m in S.sparse_layers(model).items():
        diff = (m.base_layer.weight - m.theta0).reshape(-1)
        idx = diff.nonzero().squeeze(1)
        state[f"{n}.sparse_indices"], state[f"{n}.sparse_values"] = idx.cpu(), diff[idx].float().cpu()
    return state
