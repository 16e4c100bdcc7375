"""Side-effect diagnostics: what a fine-tuning run cost, next to what it gained.

Each module in this package registers one diagnostic (a `Diagnostic` with its own typed `Config`):
    forgetting  drift from the base on generic prompts (KL), retained general knowledge,
                and the same probes conjugated (lost capability vs suppressed task inference)
    knowledge   FineTuneBench-style probes on builtin:facts: verbatim vs rephrased, updated facts
    tuco        Tuning Contribution per prompt, and `tuco_forward` (scale the fine-tuning component)
    intruder    intruder dimensions per weight matrix of the merged model

Public surface:
    run_diagnostics(run_dir, only=None) -> {name: result}   run and write RUN/diagnostics/<name>.json
    DIAGNOSTICS, register, Diagnostic                       the registry and the base class
A result (and each JSON file) is {"name", "version", "config", "summary": {flat scalars},
"details": {tables as {"rows", "columns"}, distributions as {"values"}, samples}}.
Importing this package is cheap: torch loads inside the diagnostics.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tunelab.registry import DIAGNOSTICS, Component

register = DIAGNOSTICS.register
__all__ = ["DIAGNOSTICS", "Diagnostic", "Findings", "register", "run_diagnostics"]


@dataclass
class Findings:
    """What a diagnostic found: flat scalar figures, and everything else."""
    summary: dict[str, float | int | str | None]
    details: dict[str, Any]


class Diagnostic(Component):
    """Base class. `run(ctx)` measures the run behind `ctx` (tunelab.diagnostics._context.Context:
    the run's config, base and tuned models, tokenizer, method) and returns Findings.
    `not_applicable(ctx)` returns a reason when the diagnostic cannot run on this run."""

    version: ClassVar[int] = 1
    cheap: ClassVar[bool] = True
    """Whether it runs after training by default (where `makes_sense` agrees)."""
    merges_tuned: ClassVar[bool] = False
    """Whether it folds the tuned model's change into its weights (ctx.merged()); such diagnostics
    run after the others of the same call."""

    @classmethod
    def makes_sense(cls, run_cfg) -> bool:
        """Whether this diagnostic says something about a run with this config (default: yes)."""
        return True

    def not_applicable(self, ctx) -> str | None:
        return None

    def run(self, ctx) -> Findings:
        raise NotImplementedError


def run_diagnostics(run_dir: str | Path, only: list[str] | None = None) -> dict[str, dict]:
    """Run the diagnostics `only` names (default: the run config's `diagnostics.after_train`, or
    the defaults for its data) on a trained run; write RUN/diagnostics/<name>.json; return them."""
    from tunelab.diagnostics._runner import run_diagnostics as _run
    return _run(run_dir, only)
