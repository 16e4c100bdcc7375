"""Intruder dimensions (Shuttleworth, Andreas, Torralba, Sharma 2024, "LoRA vs Full Fine-tuning: An
Illusion of Equivalence"; arXiv 2410.21228).

For a weight W0 (out x in) and its fine-tuned W (both SVD'd, left singular vectors U0, U sorted by
singular value), the tuned singular vector u_j, j < top_k, is an *intruder* when
    max_i |cos(u_j, U0[:, i])| < epsilon        over every base left singular vector,
as in the authors' find_intruder_dimensions.py (k = 10, epsilon = 0.5 there; matrices in fp32).
Counts are summed per module type (q_proj, ...) and per layer.

The tuned weights are the method's `merge()` of the trained run (in place, after the other
diagnostics of the same call: a merged model computes the same function), so the count works
for any method that can fold its change into plain weights (full, LoRA merged, sparse deltas);
a method that cannot merge is "not applicable". Identical matrices count 0 without an SVD.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from tunelab.diagnostics import Diagnostic, Findings, register
from tunelab.options import Options


@dataclass(kw_only=True)
class IntruderConfig(Options):
    ranges: ClassVar = {"top_k": ">= 1", "epsilon": "(0, 1]"}
    top_k: int = 10
    """How many of the tuned matrix's top singular vectors are checked."""
    epsilon: float = 0.5
    """A tuned singular vector is an intruder when its best |cosine| with the base's is below this."""
    target_modules: list[str] = ("all-linear",)
    """Which linear layers to check, as in LoRA's target_modules ('all-linear': every nn.Linear but
    the output head)."""

    def validate(self) -> None:
        self.target_modules = list(self.target_modules)


@torch.no_grad()
def best_cosines(w_base: torch.Tensor, w_tuned: torch.Tensor, top_k: int) -> torch.Tensor:
    """(min(top_k, rank),): for each top tuned left singular vector, max |cos| with any base one."""
    u_base = torch.linalg.svd(w_base.float(), full_matrices=False).U  # (out, r)
    u_tuned = torch.linalg.svd(w_tuned.float(), full_matrices=False).U[:, :top_k]  # (out, k)
    return (u_tuned.T @ u_base).abs().max(dim=1).values  # columns are unit vectors: dots are cosines


def count_intruders(w_base: torch.Tensor, w_tuned: torch.Tensor, top_k: int = 10, epsilon: float = 0.5) -> int:
    """Intruders among the top_k tuned singular vectors; 0 for identical matrices."""
    if torch.equal(w_base, w_tuned):
        return 0
    return int((best_cosines(w_base, w_tuned, top_k) < epsilon).sum())


def layer_of(name: str) -> int | None:
    """The decoder layer index in a parameter path ('model.layers.3.mlp.up_proj' -> 3)."""
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def matrix_rows(base, tuned, names: list[str], top_k: int, epsilon: float) -> list[list]:
    """One row per linear layer: [name, layer, module, changed, intruders, min best |cos|]."""
    rows = []
    for name in names:
        w0 = base.get_submodule(name).weight
        w1 = tuned.get_submodule(name).weight.to(w0.device)
        changed = not torch.equal(w0, w1)
        cos = best_cosines(w0, w1, top_k) if changed else torch.ones(1, device=w0.device)
        rows.append([name, layer_of(name), name.rsplit(".", 1)[-1], changed,
                     int((cos < epsilon).sum()), round(float(cos.min()), 6)])
    return rows


def _totals(rows: list[list], key: int, label: str) -> dict:
    groups: dict = {}
    for r in rows:
        g = groups.setdefault(r[key], [0, 0, 0])
        g[0] += 1
        g[1] += int(r[3])
        g[2] += r[4]
    return {"columns": [label, "matrices", "changed", "intruders"], "rows": [[k, *v] for k, v in groups.items()]}


@register("intruder")
class IntruderDimensions(Diagnostic):
    """Intruder dimensions of the merged tuned weights against the base, per module type and layer."""

    Config = IntruderConfig
    cheap = False  # one SVD per changed weight matrix: minutes for a full fine-tune of a 135M model on CPU
    merges_tuned = True

    def not_applicable(self, ctx) -> str | None:
        if not ctx.method.supports_merge:
            return (f"method '{ctx.cfg.method.name}' cannot merge its change into plain weights, so there is "
                    "no tuned weight matrix to compare with the base")
        return None

    def run(self, ctx) -> Findings:
        from tunelab.methods._shared import select_linears

        c = self.cfg
        merged = ctx.merged()
        tuned_names = {n for n, _ in merged.named_modules()}
        names = [n for n in select_linears(ctx.base, c.target_modules) if n in tuned_names]
        rows = matrix_rows(ctx.base, merged, names, c.top_k, c.epsilon)
        per_module = _totals(rows, 2, "module")
        summary = {"intruders_total": sum(r[4] for r in rows), "matrices_checked": len(rows),
                   "matrices_changed": sum(r[3] for r in rows), "matrices_with_intruders": sum(r[4] > 0 for r in rows)}
        summary |= {f"intruders_{m}": n for m, _, _, n in per_module["rows"]}
        return Findings(summary, {
            "per_matrix": {"columns": ["name", "layer", "module", "changed", "intruders", "min_best_cos"],
                           "rows": rows},
            "per_module": per_module, "per_layer": _totals(rows, 1, "layer")})
