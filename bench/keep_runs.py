"""Keep the figures of a `tunelab compare`'s finished runs in the repository, without their weights, so a
table that takes several sessions (on machines whose runs/ does not survive) is assembled by
`tunelab compare` over run directories:

    python bench/keep_runs.py runs/methods bench/results/methods-runs
    tunelab compare bench/results/methods-runs/*/ --out runs/methods-table   # the table, every row

Copies, for each run of COMPARE_DIR/runs/ that finished (its final/ and eval.json exist), what compare
reads: config.yaml, metrics.jsonl, eval.json and diagnostics/*.json. A run already kept is left as it
is; an unfinished one is skipped and named.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

FILES = ("config.yaml", "metrics.jsonl", "eval.json")


def keep(compare_dir: Path, dest: Path) -> list[str]:
    kept = []
    for run in sorted(p for p in (compare_dir / "runs").iterdir() if p.is_dir()):
        if not ((run / "final").is_dir() and (run / "eval.json").is_file()):
            print(f"skipped (not finished): {run}", file=sys.stderr)
            continue
        target = dest / run.name
        if target.exists():
            print(f"already kept: {target}", file=sys.stderr)
            continue
        tmp = dest / f".{run.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "diagnostics").mkdir(parents=True)
        for name in FILES:
            shutil.copy2(run / name, tmp / name)
        for diag in sorted((run / "diagnostics").glob("*.json")):
            shutil.copy2(diag, tmp / "diagnostics" / diag.name)
        tmp.rename(target)  # a cut-off copy never looks kept
        kept.append(run.name)
    return kept


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print("kept:", ", ".join(keep(Path(sys.argv[1]), Path(sys.argv[2]))) or "nothing new")
