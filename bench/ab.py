"""Before/after on one machine: tunelab's contender (bench/contenders.py) with the tunelab code of
an earlier commit (A) and of the working tree (B), in separate processes, in A B B A order per
round, so the shared machine's drifting speed favours neither. Only the `tunelab` package differs
between A and B (PYTHONPATH points at a git worktree of the commit); the contender script is this
tree's.

    python bench/ab.py COMMIT [--modes lora full] [--rounds 2] [--steps 8] [--warmup 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def run_one(tree: Path, mode: str, steps: int, warmup: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "contenders.py"), "tunelab", mode, str(steps), str(warmup)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(commit: str, modes: list[str], rounds: int, steps: int, warmup: int, out: str | None) -> dict:
    from common import machine_note

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "tunelab"], capture_output=True, text=True).stdout)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python bench/ab.py", *sys.argv[1:]]),
           "A": commit, "B": head + (" + uncommitted changes under tunelab/" if dirty else ""),
           "machine": machine_note(),
           "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "a"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), commit], check=True)
        try:
            for mode in modes:
                got = {"A": [], "B": []}
                for r in range(rounds):
                    for side in "ABBA":
                        row = run_one(base if side == "A" else ROOT, mode, steps, warmup)
                        got[side].append({k: row[k] for k in ("tokens_per_s", "peak_memory_mb", "final_loss", "precision")})
                        print(f"{mode} round {r + 1} {side}: {row['tokens_per_s']:.0f} tokens/s, "
                              f"{row['peak_memory_mb']:.0f} MB, {row['precision']}", flush=True)
                med = {s: statistics.median(x["tokens_per_s"] for x in v) for s, v in got.items()}
                res["modes"][mode] = {"runs": got, "tokens_per_s_median": med, "B_over_A": med["B"] / med["A"]}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    print(json.dumps({m: {"A": v["tokens_per_s_median"]["A"], "B": v["tokens_per_s_median"]["B"], "B/A": v["B_over_A"]}
                      for m, v in res["modes"].items()}))
    if out:
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("commit")
    ap.add_argument("--modes", nargs="+", default=["lora", "full"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    main(a.commit, a.modes, a.rounds, a.steps, a.warmup, a.out)
