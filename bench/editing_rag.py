"""Issue 20's measurements on the built-in SmolLM2-135M, on CPU: LocFT-BF vs depth-first vs full
fine-tuning on the same edits (+ a scale check), fine-tuning x RAG per training-set size, and the
entity-tracking patching recovery. Raw JSON: bench/results/editing-rag-<part>.json.

    PYTHONPATH=$PWD python bench/editing_rag.py                 # every part (skips parts already written)
    PYTHONPATH=$PWD python bench/editing_rag.py --part editing  # one part; --force rewrites it

Budgets are sized for a shared 2-core CPU (see docs/results/editing-and-rag.md); BUDGET below holds them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "editing-rag"
BUDGET = {
    "edits": 20, "edit_epochs": 15, "edit_batch": 10, "edit_layer": 22, "full_lr": 1e-5,
    "scale": [10, 100], "scale_epochs": 15,
    "forgetting": {"num_prompts": 8, "drift_tokens": 16, "num_probes": 24, "answer_tokens": 12},
    "rag_sizes": [16, 32, 64], "rag_eval": 30, "rag_top_k": 2, "rag_entities": 60,
    "cmap_run": "examples/mechanisms/arith_lora_cmap.yaml",
}


def wilson(hits: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion hits/n."""
    if not n:
        return None
    p, d = hits / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(mid - half, 4), round(mid + half, 4)]


def machine() -> dict:
    import torch
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.machine(),
            "load_avg_at_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}


def forgetting(run: Path) -> dict:
    """The forgetting diagnostic's summary on an edit/train run, with BUDGET's smaller options."""
    from tunelab.diagnostics._context import Context
    from tunelab.diagnostics._runner import run_one

    ctx = Context(run)
    ctx.cfg.diagnostics.options["forgetting"] = BUDGET["forgetting"]
    return run_one(ctx, "forgetting")["summary"]


def with_intervals(summary: dict) -> dict:
    out = dict(summary)
    for key, n_key in (("reliability", "num_requests"), ("generalization", "num_rephrase"), ("locality", "num_locality")):
        if summary.get(key) is not None:
            out[f"{key}_ci"] = wilson(round(summary[key] * summary[n_key]), summary[n_key])
    return out


def edit_run(name: str, n: int, **options) -> dict:
    from tunelab.editing import edit, load_config

    out = RUNS / name
    cfg = load_config(None, [], output=str(out), precision="auto", max_new_tokens=8, eval_batch_size=32,
                      layer=BUDGET["edit_layer"], **options)
    t0 = time.perf_counter()
    edit(f"builtin:facts?n_entities={n}&seed=0", cfg)
    found = json.loads((out / "edit.json").read_text())
    return {"name": name, "num_edits": n, "options": options, "seconds": round(time.perf_counter() - t0, 1),
            "before": with_intervals(found["before"]), "after": with_intervals(found["after"]),
            "steps": found["train"]["steps"], "skipped_batches": found["train"]["skipped_batches"],
            "schedule_log_length": len(found["train"]["log"]), "forgetting": forgetting(out)}


def part_editing() -> dict:
    n, e, b = BUDGET["edits"], BUDGET["edit_epochs"], BUDGET["edit_batch"]
    rows = [edit_run("locft-bf", n, epochs=e, batch_size=b),
            edit_run("locft-df", n, epochs=e, schedule="depth_first"),
            edit_run("full-bf", n, epochs=e, batch_size=b, method="full", lr=BUDGET["full_lr"])]
    scale = [edit_run(f"locft-bf-{k}", k, epochs=BUDGET["scale_epochs"], batch_size=min(100, k)) for k in BUDGET["scale"]]
    return {"compare": rows, "scale": scale}


def part_mechanisms() -> dict:
    run = ROOT / "runs" / "arith_lora_cmap"
    if not (run / "final").is_dir():
        subprocess.run([sys.executable, "-m", "tunelab", "train", BUDGET["cmap_run"], "train.progress=false"],
                       check=True, cwd=ROOT)
    from tunelab.diagnostics import run_diagnostics
    result = run_diagnostics(run, only=["mechanisms"])["mechanisms"]
    s, n = result["summary"], result["summary"]["num_prompts"]
    for key in ("base_accuracy", "tuned_accuracy", "patched_accuracy", "back_accuracy"):
        s[f"{key}_ci"] = wilson(round(s[key] * n), n)
    return {"run": str(run.relative_to(ROOT)), "train_eval": json.loads((run / "eval.json").read_text()), **result}


def part_rag() -> dict:
    from tunelab.rag.experiment import run_experiment
    return run_experiment(RUNS / "rag", sizes=BUDGET["rag_sizes"], num_eval=BUDGET["rag_eval"],
                          top_k=BUDGET["rag_top_k"], n_entities=BUDGET["rag_entities"], interval=wilson)


PARTS = {"mechanisms": part_mechanisms, "editing": part_editing, "rag": part_rag}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=list(PARTS), action="append")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    for part in a.part or list(PARTS):
        path = RESULTS / f"editing-rag-{part}.json"
        if path.exists() and not a.force:
            print(f"{path} exists; --force to rerun")
            continue
        t0 = time.perf_counter()
        found = {"part": part, "machine": machine(), "budget": BUDGET, "command": " ".join(sys.argv), **PARTS[part]()}
        found["minutes"] = round((time.perf_counter() - t0) / 60, 1)
        path.write_text(json.dumps(found, indent=1))
        print(f"wrote {path} ({found['minutes']} min)")


if __name__ == "__main__":
    main()
