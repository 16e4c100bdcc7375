"""GreenTrainer: adaptive backpropagation under a FLOPs budget (Huang et al., arXiv 2309.13192).

Which tensors train is chosen by dynamic programming: maximise sum_k m_k I_k subject to
    backward FLOPs(m) = sum_k m_k t_dw[k] + sum_{j from the deepest selected tensor to the output} t_dy[j]
                      <= rho_bp * T_bp,
since the activation gradient must reach the deepest (closest to the input) selected tensor.
t_dw (weight gradient) and t_dy (activation gradient) come from an analytic count per module
(multiply-accumulates for one sequence of `seq_len` tokens: a linear layer in x out costs
N in out for each of forward, t_dw and t_dy; attention's N^2 products are charged to v_proj's
t_dy, as the reference does). The user's rho is a fraction of full fine-tuning's training FLOPs:
rho_bp = rho (1 + T_fp / T_bp) - T_fp / T_bp (at least 0.05). Costs are rounded up to
1/num_budget_units of T_bp, so the exact-arithmetic budget always holds.
Importance of tensor k: the first-order loss decrease of an Adam step, I_k = -g_k . dw_k, with
dw_k = -lr sign(g_k) (Adam's first step), i.e. I_k = lr |g_k|_1, normalised by max_k I_k.
Readings we chose:
- "tensor" = the parameters of one module (weight and bias together);
- the reference takes one extra AdamW step on a probe batch and re-evaluates the gradient at the
  moved weights; methods here see no batch, so importance comes from the gradient of a regular
  step, a probe step: every `interval` steps (the reference: every 2 epochs) all tensors get
  gradients for one step, tensors outside the current selection do not update, and the new
  selection takes effect from the next step. The very first step is such a probe, with an empty
  selection: nothing updates in step 1.
- tensors leaving the selection drop their Adam state (they restart with fresh moments).
`stats` reports the FLOPs saved per training step against full fine-tuning.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar
from functools import partial
from pathlib import Path

import torch
from torch import nn

from tunelab.methods import register
from tunelab.methods import _sparse as S
from tunelab.options import Options
from tunelab.run.device import model_device
from tunelab.run.context import StepContext


@dataclass(kw_only=True)
class GreenTrainerConfig(Options):
    ranges: ClassVar = {"rho": "(0, 1]", "interval": ">= 1", "seq_len": ">= 1", "num_budget_units": ">= 1"}
    rho: float = 0.5
    """Fraction of full fine-tuning's training FLOPs (forward + backward) to spend."""
    interval: int = 100
    """Re-select the trainable tensors every this many steps (each selection costs a probe step)."""
    seq_len: int = 512
    """Tokens per sequence assumed by the FLOPs count (sets the weight of attention's N^2 terms)."""
    num_budget_units: int = 1000
    """Resolution of the dynamic programme: costs in units of T_bp / num_budget_units."""


@dataclass
class Entry:
    """One module in forward order: the parameters it owns and its costs for one sequence."""
    params: list[str]
    fwd: float
    dw: float
    dy: float
    shared: list[int] = field(default_factory=list)


def module_costs(name: str, mod: nn.Module, model: nn.Module, n: int) -> tuple[float, float, float]:
    """(forward, t_dw, t_dy) multiply-accumulates of `mod` for n tokens."""
    if isinstance(mod, nn.Linear):
        c = float(n * mod.in_features * mod.out_features)
        fwd, dw, dy = c, c, c
    elif isinstance(mod, nn.Embedding):
        fwd, dw, dy = 0.0, float(n * mod.embedding_dim), 0.0
    else:
        c = float(n * sum(p.numel() for p in mod.parameters(recurse=False)))
        fwd, dw, dy = c, c, c
    if name.endswith(".v_proj"):  # attention's Q Kᵀ and A V: forward 2 N^2 d, backward twice that
        q = getattr(model.get_submodule(name.rpartition(".")[0]), "q_proj", mod)
        d = getattr(q, "out_features", 0)
        fwd, dy = fwd + 2.0 * n * n * d, dy + 4.0 * n * n * d
    return fwd, dw, dy


@torch.no_grad()
def chain_costs(model: nn.Module, seq_len: int) -> list[Entry]:
    """Modules with parameters in the order the forward pass calls them (input -> output).
    A module whose weights another owns (a tied head) keeps its t_dy in place and adds its t_dw
    to the owner's entry."""
    calls: list[nn.Module] = []
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append(mod)) for m in owners]
    try:
        dev = next(model.parameters()).device
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=dev))
    finally:
        for h in hooks:
            h.remove()
    names = {id(m): n for n, m in model.named_modules()}
    pname = {id(p): n for n, p in model.named_parameters()}
    entry_of: dict[int, int] = {}
    entries: list[Entry] = []
    for mod in dict.fromkeys(calls):
        fwd, dw, dy = module_costs(names[id(mod)], mod, model, seq_len)
        ps = [p for p in mod.parameters(recurse=False)]
        new = [p for p in ps if id(p) not in entry_of]
        if ps and not new:
            entries[entry_of[id(ps[0])]].dw += dw
            dw = 0.0
        entry_of |= {id(p): len(entries) for p in new}
        entries.append(Entry([pname[id(p)] for p in new], fwd, dw, dy))
    return entries


def backward_cost(mask: list[bool], t_dw: list[float], t_dy: list[float]) -> float:
    """Backward FLOPs of a selection (input -> output order): chosen t_dw plus every t_dy from the
    deepest chosen tensor to the output."""
    if not any(mask):
        return 0.0
    deepest = mask.index(True)
    return sum(w for w, m in zip(t_dw, mask) if m) + sum(t_dy[deepest:])


def select_tensors(t_dw: list[int], t_dy: list[int], importance: list[float], budget: int) -> list[bool]:
    """The selection (input -> output order) of maximal total importance whose `backward_cost` is
    at most `budget`: for each candidate deepest tensor k, a 0/1 knapsack over the tensors
    between k and the output with weights t_dw. Exact, O(N * budget)."""
    n = len(t_dw)
    table = torch.zeros(budget + 1, dtype=torch.float64, device="cpu")  # best importance within capacity t (host)
    keep, best, best_val, dy_sum = [], None, 0.0, 0
    for q, k in enumerate(reversed(range(n))):             # output first
        dy_sum += t_dy[k]
        rem = budget - dy_sum - t_dw[k]
        if importance[k] > 0 and rem >= 0 and importance[k] + float(table[rem]) > best_val:
            best_val, best = importance[k] + float(table[rem]), (k, rem, q)
        take = torch.zeros(budget + 1, dtype=torch.bool, device="cpu")
        w = t_dw[k]
        if importance[k] > 0 and w <= budget:
            cand = table[: budget + 1 - w] + importance[k]
            take[w:] = cand > table[w:]
            table = torch.where(take, torch.cat([table[:w], cand]), table)
        keep.append(take)
    mask = [False] * n
    if best is not None:
        k, t, q = best
        mask[k] = True
        for qq in range(q - 1, -1, -1):
            kk = n - 1 - qq
            if keep[qq][t]:
                mask[kk], t = True, t - t_dw[kk]
    return mask


def backward_rho(rho: float, t_fp: float, t_bp: float) -> float:
    r = rho * (1 + t_fp / t_bp) - t_fp / t_bp
    return min(1.0, r if r > 0 else 0.05)


@register("greentrainer")
class GreenTrainer(S.TensorSelection):
    """FLOPs-budgeted tensor selection; see the module docstring."""

    Config = GreenTrainerConfig
    private_why = ("it picks the tensors to train from raw, unclipped gradients (a hook on gradient "
                   "accumulation), which DP-SGD's accounting does not cover")

    def apply(self, model):
        self.entries = chain_costs(model, self.cfg.seq_len)
        self.stash: dict[str, torch.Tensor] = {}
        params = dict(model.named_parameters())
        for n in (names := [n for e in self.entries for n in e.params]):
            params[n].requires_grad_(True)            # a hook needs it; _init_selection freezes
            params[n].register_post_accumulate_grad_hook(partial(self._probe, n))
        self._init_selection(model, names)
        S.root_buffer(model, "greentrainer_selected", torch.zeros(len(self.entries), dtype=torch.bool, device=model_device(model)))
        self._restore(model)
        return model

    def _probe(self, name: str, p: torch.Tensor) -> None:
        """During a probe step, keep this step's gradient; tensors outside the selection drop it."""
        if not self.probing:
            return
        if name in self.trainable:
            self.stash[name] = p.grad.detach().clone()          # p.grad accumulates in place
        else:
            prev = self.stash.get(name)
            self.stash[name] = p.grad.detach().clone() if prev is None else prev + p.grad
            p.grad = None

    def _selected_names(self, model) -> set[str]:
        mask = model.greentrainer_selected.tolist()
        return {n for e, on in zip(self.entries, mask) if on for n in e.params}

    def _restore(self, model) -> None:
        self.probing = self._step(model) % self.cfg.interval == 0
        probe = set(self.candidates) if self.probing else set()
        self.set_trainable(model, self._selected_names(model), grad_also=probe)

    def on_step(self, model, ctx: StepContext, optimizer) -> None:
        self.mark_trained()
        self._set_step(model, ctx.step)
        if self.probing:
            mask = self.select(self.importance())
            model.greentrainer_selected.copy_(torch.tensor(mask, device=model.greentrainer_selected.device))
            self.stash.clear()
            self.set_trainable(model, self._selected_names(model), optimizer)
        self._restore(model)

    def importance(self) -> list[float]:
        """I_k = |g_k|_1 over the entry's parameters, normalised by the largest."""
        imp = [sum(float(self.stash[n].abs().sum()) for n in e.params if n in self.stash)
               for e in self.entries]
        top = max(imp, default=0.0)
        return [i / top if top > 0 else 0.0 for i in imp]

    def select(self, importance: list[float]) -> list[bool]:
        dw, dy = [e.dw for e in self.entries], [e.dy for e in self.entries]
        t_bp = sum(dw) + sum(dy)
        rho_bp = backward_rho(self.cfg.rho, sum(e.fwd for e in self.entries), t_bp)
        usable = [i > 0 and bool(e.params) for i, e in zip(importance, self.entries)]
        if rho_bp >= 1:
            return usable
        unit = t_bp / self.cfg.num_budget_units
        q = lambda xs: [math.ceil(x / unit) for x in xs]   # noqa: E731 -- rounded up: never over budget
        imp = [i if u else 0.0 for i, u in zip(importance, usable)]
        return select_tensors(q(dw), q(dy), imp, math.floor(rho_bp * self.cfg.num_budget_units))

    def stats(self, model) -> dict[str, float]:
        dw, dy = [e.dw for e in self.entries], [e.dy for e in self.entries]
        mask = model.greentrainer_selected.tolist()
        fwd = sum(e.fwd for e in self.entries)
        used = fwd + backward_cost(mask, dw, dy)
        return {"greentrainer_flops_saved": 1 - used / (fwd + sum(dw) + sum(dy)),
                "greentrainer_selected_tensors": float(sum(mask))}

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        super().save(model, tokenizer, out_dir, base_name)
        meta = {"options": asdict(self.cfg), "selected": sorted(self._selected_names(model)),
                "base_model": base_name}
        (Path(out_dir) / "greentrainer.json").write_text(json.dumps(meta, indent=2))
