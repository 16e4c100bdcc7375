"""Run reports and comparisons: self-contained HTML pages (inline CSS and SVG, no scripts, no network).

Public surface:
    write_report(run_dir) -> Path                       RUN/report.html
    compare(targets, out, overrides=(), allow_mismatch=False, *, train) -> (Comparison, html, json, md)
                                                        train the recipes (with `train`), then
                                                        OUT/compare.{html,json,md}; tunelab.compare
                                                        passes tunelab.train
    text_table(comparison) -> str                       the side-by-side table for a terminal
    FORCED                                              the config fields compare makes equal
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from tunelab.report.compare import FORCED, Comparison, prepare
from tunelab.report.compare_page import text_table, write_comparison
from tunelab.report.run_page import write_report

__all__ = ["FORCED", "Comparison", "compare", "text_table", "write_report"]


def compare(targets: list[str], out: str | Path, overrides: list[str] = (), allow_mismatch: bool = False, *,
            train: Callable[[object], Path]) -> tuple[Comparison, Path, Path, Path]:
    """Compare run directories and/or YAML recipes (trained first into OUT/runs/ by `train`, which
    takes a RunConfig and returns its run directory: `tunelab.compare` passes `tunelab.train`).
    `overrides` are `key.path=value` strings applied to every recipe (before the FORCED fields)."""
    c = prepare([str(t) for t in targets], Path(out), list(overrides), allow_mismatch, train=train)
    return (c, *write_comparison(c, Path(out)))
