"""The base of every diagnostic and what it returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tunelab.registry import Component


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
    brief: ClassVar[tuple[str, ...]] = ()
    """The summary figures of its one-line log after training (default: the first four)."""
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
