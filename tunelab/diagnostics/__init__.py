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

from tunelab.diagnostics._base import Diagnostic, Findings
from tunelab.diagnostics._runner import run_diagnostics
from tunelab.registry import DIAGNOSTICS

register = DIAGNOSTICS.register
__all__ = ["DIAGNOSTICS", "Diagnostic", "Findings", "register", "run_diagnostics"]
