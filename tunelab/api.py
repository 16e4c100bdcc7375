"""What `import tunelab` offers (re-exported lazily by tunelab/__init__.py, so `tunelab --help`
stays fast): the whole pipeline of a run, and comparisons of runs."""
from __future__ import annotations

from pathlib import Path


def train(config, *overrides: str) -> Path:
    """Train from a YAML path, a dict, a RunConfig, or an existing run directory (resumes), run the
    configured diagnostics and write RUN/report.html. `overrides` are `key.path=value` strings.
    Returns the run directory. Under torchrun every process calls this: they train together, and
    rank 0 alone runs the diagnostics and writes the report. A config with `stages:` (or a run
    directory holding pipeline.yaml) runs its stages in order (tunelab.pipeline)."""
    from tunelab import pipeline
    if pipeline.is_pipeline(config):
        return pipeline.run(config, *overrides)
    from tunelab.diagnostics._runner import run_after_train
    from tunelab.report import write_report
    from tunelab.run.dist import join
    from tunelab.run.rundir import resolve
    from tunelab.training.loop import train as train_loop

    cfg, run_dir = resolve(config, list(overrides))
    dist = join(cfg.train.device)
    run_dir = train_loop(cfg, run_dir, dist)
    if dist.is_main:
        run_after_train(run_dir)  # cfg.diagnostics.after_train; results already current are kept
        print(f"report: {write_report(run_dir)}")  # last: it shows the diagnostics just written
    dist.barrier()
    return run_dir


def load_run(run_dir):
    """(cfg, model, tokenizer, method) of a trained run."""
    from tunelab.training.final import load_trained
    return load_trained(run_dir)


def compare(targets: list, out, overrides: list[str] = (), allow_mismatch: bool = False):
    """Compare run directories and/or YAML recipes side by side; recipes are trained first (into
    OUT/runs/) with the same data, budget and seed. Returns (Comparison, html, json, md paths)."""
    from tunelab.report import compare as compare_runs
    return compare_runs(targets, out, overrides, allow_mismatch, train=train)
