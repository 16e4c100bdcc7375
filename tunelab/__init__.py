"""tunelab: fine-tuning methods for LLMs, made real, composable and comparable.

Public surface (imports are lazy so that `tunelab --help` stays fast):
    tunelab.train(config, *overrides) -> Path    train (or resume) a run, run its diagnostics, return its directory
                                                 (and write RUN/report.html)
    tunelab.load_run(run_dir)                    (cfg, model, tokenizer, method) of a trained run
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def train(config, *overrides: str) -> Path:
    """Train from a YAML path, a dict, a RunConfig, or an existing run directory (resumes).
    `overrides` are `key.path=value` strings. Returns the run directory."""
    from tunelab.training.loop import train as _train
    from tunelab.run.rundir import resolve

    cfg, run_dir = resolve(config, list(overrides))
    run_dir = _train(cfg, run_dir)
    from tunelab.diagnostics._runner import run_after_train
    run_after_train(run_dir)  # cfg.diagnostics.after_train; results already current are kept
    from tunelab.report import write_report
    print(f"report: {write_report(run_dir)}")  # last: it shows the diagnostics just written
    return run_dir


def load_run(run_dir):
    from tunelab.training.final import load_trained
    return load_trained(run_dir)
