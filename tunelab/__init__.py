"""tunelab: fine-tuning methods for LLMs, made real, composable and comparable.

Public surface (tunelab/api.py, imported on first use so that `tunelab --help` stays fast):
    tunelab.train(config, *overrides) -> Path    train (or resume) a run, run its diagnostics, return its directory
                                                 (and write RUN/report.html)
    tunelab.load_run(run_dir)                    (cfg, model, tokenizer, method) of a trained run
    tunelab.compare(targets, out, ...)           runs and recipes side by side (OUT/compare.html)
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["compare", "load_run", "train"]


def __getattr__(name: str):
    if name in __all__:
        from tunelab import api
        return getattr(api, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
