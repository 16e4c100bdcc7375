"""Pipelines: several stages in one YAML (`stages:`), each a training run or a data stage, in
sub-directories of one run directory; resumable, with completed stages skipped.

Public surface: `is_pipeline(target)`, `load(target, overrides) -> Pipeline`, `run(target, *overrides)`
(load and run; returns the run directory), `Pipeline`, `Stage`. See spec.py for the YAML and
runner.py for the run directory.
"""
from __future__ import annotations

from pathlib import Path

from tunelab.pipeline.runner import run_pipeline
from tunelab.pipeline.spec import Pipeline, Stage, is_pipeline, load

__all__ = ["Pipeline", "Stage", "is_pipeline", "load", "run", "run_pipeline"]


def run(target, *overrides: str) -> Path:
    """Run the pipeline of a YAML path, a dict or a pipeline run directory (resumes it)."""
    return run_pipeline(load(target, list(overrides)))
