"""Issue 20's measurements on the built-in SmolLM2-135M, on CPU: LocFT-BF vs depth-first vs full
fine-tuning on the same edits (+ a scale check), fine-tuning x RAG per training-set size, and the
entity-tracking patching recovery. Raw JSON: bench/results/editing-rag-<part>.json.

    PYTHONPATH=$PWD python bench/editing_rag.py                 # every part (skips parts already written)
    PYTHONPATH=$PWD python bench/editing_rag.py --part editing  # one part; --force rewrites it
    PYTHONPATH=$PWD python bench/editing_rag.py --model DIR --results /tmp/r --runs /tmp/runs --layer 1   # a smoke run

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
WHERE = {"model": "smollm2-135m", "results": ROOT / "bench" / "results", "runs": ROOT / "runs" / "editing-rag"}
"""The model measured, where the JSON goes, where the runs go (the command line may change them)."""
BUDGET = {
    # LocFT on SmolLM2 layer 22's mlp.down_proj; the lrs chosen on other edits (bench/results/editing-rag-lr-probe.json)
    "edits": 20, "edit_epochs": 25, "edit_batch": 10, "edit_layer": 22, "edit_lr": 1e-2, "full_lr": 1e-4,
    # the chat template: SmolLM2-Instruct answers a raw question with nothing, so under `raw` every
    # locality prompt's reply before the edit was empty and locality only measured "stays silent"
    "edit_template": "chat",
    # the scale check: every size takes `scale_steps_per_epoch` batches per epoch (batch = edits / that)
    "scale": [10, 100, 1000], "scale_epochs": 6, "scale_steps_per_epoch": 10, "scale_scored": 100,
    "forgetting": {"num_prompts": 16, "drift_tokens": 16, "num_probes": 64, "answer_tokens": 12},
    "rag_sizes": [25, 50, 100], "rag_eval": 60, "rag_top_k": 2, "rag_entities": 60,
    "cmap_run": "examples/mechanisms/arith_lora_cmap.yaml",
}


def wilson(hits: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion hits/n."""
    if not n:
        return None
    p, d = hits / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)]


def paired_bootstrap(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> dict:
    """mean(b - a) over paired per-question scores and its 95% percentile bootstrap interval."""
    import random

    rng, d = random.Random(seed), [y - x for x, y in zip(a, b)]
    means = sorted(sum(rng.choices(d, k=len(d))) / len(d) for _ in range(n))
    return {"diff": round(sum(d) / len(d), 4),
            "ci95": [round(means[int(0.025 * n)], 4), round(means[int(0.975 * n) - 1], 4)]}


def rag_differences(conditions: dict) -> dict:
    """Each fine-tuned condition against the base in the same setting (with or without passages),
    paired by question: accuracy and completeness differences with bootstrap intervals."""
    rows = []
    for name, found in conditions.items():
        if not name.startswith("ft-"):
            continue
        ref = "base+rag" if name.endswith("+rag") else "base"
        cols = found["rows"]["columns"]
        for metric in ("accuracy", "completeness"):
            j = cols.index(metric)
            d = paired_bootstrap([r[j] for r in conditions[ref]["rows"]["rows"]], [r[j] for r in found["rows"]["rows"]])
            rows.append([name, ref, metric, d["diff"], d["ci95"]])
    return {"columns": ["condition", "against", "metric", "difference", "ci95"], "rows": rows}


def machine() -> dict:
    import torch

    from tunelab.run.device import cpu_isa, resolve_precision
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.partition(":")[2].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        model = platform.processor() or "unknown"
    return {"cpu_model": model, "isa": cpu_isa(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "platform": platform.machine(), "precision_auto": resolve_precision("auto", torch.device("cpu")),
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

    out = WHERE["runs"] / name
    cfg = load_config(None, [], model=WHERE["model"], output=str(out), precision="auto", max_new_tokens=8,
                      eval_batch_size=32, template=BUDGET["edit_template"],
                      layer=BUDGET["edit_layer"], **options)
    t0 = time.perf_counter()
    edit(f"builtin:facts?n_entities={n}&seed=0", cfg)
    found = json.loads((out / "edit.json").read_text())
    return {"name": name, "num_edits": n, "options": options, "seconds": round(time.perf_counter() - t0, 1),
            "before": with_intervals(found["before"]), "after": with_intervals(found["after"]),
            "steps": found["train"]["steps"], "skipped_batches": found["train"]["skipped_batches"],
            "train_seconds": found["train"]["seconds"], "last_epoch_loss": found["train"]["log"][-1]["loss"],
            "schedule_log_length": len(found["train"]["log"]), "samples": found["samples"], "forgetting": forgetting(out)}


def part_editing() -> dict:
    n, e, b = BUDGET["edits"], BUDGET["edit_epochs"], BUDGET["edit_batch"]
    lr = BUDGET["edit_lr"]
    rows = [edit_run("locft-bf", n, epochs=e, batch_size=b, lr=lr),
            edit_run("locft-df", n, epochs=e, schedule="depth_first", lr=lr),
            edit_run("full-bf", n, epochs=e, batch_size=b, method="full", lr=BUDGET["full_lr"])]
    return {"compare": rows}


def part_scale() -> dict:
    """LocFT-BF on 10, 100 and 1,000 synthetic edits, the same number of steps for each (batches of
    edits / `scale_steps_per_epoch`), a seeded sample of at most `scale_scored` of them scored; general
    ability by the forgetting diagnostic."""
    per = BUDGET["scale_steps_per_epoch"]
    return {"scale": [edit_run(f"locft-bf-{k}", k, epochs=BUDGET["scale_epochs"], batch_size=max(1, k // per),
                               lr=BUDGET["edit_lr"], num_scored=min(k, BUDGET["scale_scored"]))
                      for k in BUDGET["scale"]]}


def part_mechanisms() -> dict:
    run = WHERE["runs"] / "arith_lora_cmap"
    if not (run / "final").is_dir():
        subprocess.run([sys.executable, "-m", "tunelab", "train", BUDGET["cmap_run"], "train.progress=false",
                        f"model.name={WHERE['model']}", f"output={run}"], check=True, cwd=ROOT)
    from tunelab.diagnostics import run_diagnostics
    result = run_diagnostics(run, only=["mechanisms"])["mechanisms"]
    s, n = result["summary"], result["summary"]["num_prompts"]
    for key in ("base_accuracy", "tuned_accuracy", "patched_accuracy", "back_accuracy"):
        s[f"{key}_ci"] = wilson(round(s[key] * n), n)
    return {"run": str(run), "train_eval": json.loads((run / "eval.json").read_text()), **result}


def part_rag() -> dict:
    from tunelab.rag.experiment import run_experiment
    found = run_experiment(WHERE["runs"] / "rag", model=WHERE["model"], sizes=BUDGET["rag_sizes"],
                           num_eval=BUDGET["rag_eval"], top_k=BUDGET["rag_top_k"], n_entities=BUDGET["rag_entities"],
                           interval=wilson)
    return found | {"differences": rag_differences(found["conditions"])}


PARTS = {"mechanisms": part_mechanisms, "editing": part_editing, "scale": part_scale, "rag": part_rag}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=list(PARTS), action="append")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--model", default=WHERE["model"])
    ap.add_argument("--results", type=Path, default=WHERE["results"])
    ap.add_argument("--runs", type=Path, default=WHERE["runs"])
    ap.add_argument("--layer", type=int, default=BUDGET["edit_layer"], help="the block LocFT edits")
    a = ap.parse_args()
    WHERE.update(model=a.model, results=a.results, runs=a.runs.resolve())
    BUDGET["edit_layer"] = a.layer
    a.results.mkdir(parents=True, exist_ok=True)
    for part in a.part or list(PARTS):
        path = a.results / f"editing-rag-{part}.json"
        if path.exists() and not a.force:
            print(f"{path} exists; --force to rerun")
            continue
        t0 = time.perf_counter()
        found = {"part": part, "model": a.model, "machine": machine(), "budget": BUDGET, "command": " ".join(sys.argv),
                 **PARTS[part]()}
        found["minutes"] = round((time.perf_counter() - t0) / 60, 1)
        path.write_text(json.dumps(found, indent=1))
        print(f"wrote {path} ({found['minutes']} min)")


if __name__ == "__main__":
    main()
