"""What fine-tuning cost: LoRA r=8 vs LoRA r=64 vs full fine-tuning on `builtin:arith` (SmolLM2-135M,
equal steps and seed; the runs of bench/methods.py), with every side-effect diagnostic.

    python bench/methods.py --only lora-r8,lora-r64,full   (if runs/methods/ lacks them)
    python bench/side_effects.py

Runs `tunelab diagnose` (forgetting, tuco, intruder) on each run, `tunelab compare` into
runs/side-effects/ (compare.html), and writes the table into docs/results/side-effects.md.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROWS = ("lora-r8", "lora-r64", "full")
DIAGNOSTICS = ("forgetting", "tuco", "intruder")


def summaries(run: Path) -> dict[str, float]:
    """Target-task figures and every diagnostic's summary, flat."""
    out = {}
    ev = json.loads((run / "eval.json").read_text())
    out["target: exact match after (in-dist.)"] = ev["after"]["accuracy"]
    out["target: eval loss after"] = ev["after"]["eval_loss"]
    for name in DIAGNOSTICS:
        res = json.loads((run / "diagnostics" / f"{name}.json").read_text())
        for k, v in res["summary"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{name}: {k}"] = v
    return out


def markdown(table: dict[str, dict[str, float]], seconds: dict[str, float], cfg: dict) -> str:
    keys = list(dict.fromkeys(k for row in table.values() for k in row))
    t = cfg["train"]
    lines = [f"Runs: `runs/methods/<row>` from `python bench/methods.py` ({t['steps']} steps x "
             f"{t['micro_batch_size']} examples, seed {t['seed']}); "
             f"diagnostics by `python bench/side_effects.py`, {datetime.date.today().isoformat()}.", "",
             "| figure | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    for k in keys:
        cells = [table[r].get(k) for r in table]
        lines.append(f"| {k} | " + " | ".join("-" if c is None else f"{c:.4g}" for c in cells) + " |")
    lines += ["", "Diagnostics wall time (s): " + ", ".join(f"{r} {s:.0f}" for r, s in seconds.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    from report import write_docs
    from tunelab.diagnostics import run_diagnostics
    from tunelab import compare

    runs = {r: ROOT / "runs" / "methods" / r for r in ROWS}
    missing = [r for r, p in runs.items() if not (p / "eval.json").exists()]
    if missing:
        sys.exit(f"missing runs {missing}: run `python bench/methods.py --only {','.join(ROWS)}` first")
    seconds = {}
    for row, run in runs.items():
        t0 = time.perf_counter()
        run_diagnostics(run, only=list(DIAGNOSTICS))
        seconds[row] = time.perf_counter() - t0
        print(f"side effects: {row} diagnosed in {seconds[row]:.0f} s", flush=True)
    compare([str(p) for p in runs.values()], str(ROOT / "runs" / "side-effects"), [], allow_mismatch=False)
    table = {row: summaries(run) for row, run in runs.items()}
    (HERE / "results" / f"side-effects-{datetime.date.today().isoformat()}.json").write_text(
        json.dumps({"table": table, "seconds": seconds}, indent=1))
    import yaml
    md = markdown(table, seconds, yaml.safe_load((runs["full"] / "config.yaml").read_text()))
    write_docs(md, ROOT / "docs" / "results" / "side-effects.md")
    print(md)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
