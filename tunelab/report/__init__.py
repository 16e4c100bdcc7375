"""Run reports and comparisons: self-contained HTML pages (inline CSS and SVG, no scripts, no network).

Public surface:
    write_report(run_dir) -> Path                       RUN/report.html
    compare(targets, out, overrides=(), allow_mismatch=False) -> (Comparison, html, json, md)
                                                        train the recipes, then OUT/compare.{html,json,md}
    text_table(comparison) -> str                       the side-by-side table for a terminal
    FORCED                                              the config fields compare makes equal
"""
from __future__ import annotations

from pathlib import Path

from tunelab.report.compare import FORCED, Comparison, prepare
from tunelab.report.compare_page import text_table, write_comparison
from tunelab.report.report import write_report

__all__ = ["FORCED", "Comparison", "compare", "text_table", "write_report"]


def compare(targets: list[str], out: str | Path, overrides: list[str] = (),
            allow_mismatch: bool = False) -> tuple[Comparison, Path, Path, Path]:
    """Compare run directories and/or YAML recipes (trained first into OUT/runs/). `overrides` are
    `key.path=value` strings applied to every recipe (before the FORCED fields)."""
    c = prepare([str(t) for t in targets], Path(out), list(overrides), allow_mismatch)
    return (c, *write_comparison(c, Path(out)))
