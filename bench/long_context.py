"""Long-context fine-tuning on the built-in SmolLM2-135M: full attention, S2-Attn, SF-Attn and LeMo
on the same footing (LongLoRA's parameterization for every row: LoRA r=8 on q, k, v, o plus the
embeddings and norms; the rows differ only in the training-time attention).

    python bench/long_context.py                 # the curve, then the accuracy runs (hours on 2 CPU cores)
    python bench/long_context.py --only curve    # step time, saved activations, peak RSS vs length
    python bench/long_context.py --only accuracy # fine-tune at --train-length, accuracy per length bucket
    python bench/long_context.py --lengths 512 1024 2048 --train-length 1024 --train-steps 6 --eval-rows 12 \
        --eval-max-length 2048                   # a smaller budget (each flag's default: BUDGET)
    python bench/long_context.py --docs-from bench/results/long-context-*<date>.json   (tables only)

Each measurement runs in its own process. Results go to bench/results/long-context-<machine>-
<date>.json as they come (a rerun with the same file skips what it holds), the tables and charts
into docs/results/long-context.md (between the bench markers) and docs/results/long-context-*.svg.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROWS = {"full": {"pattern": "full"}, "s2": {"pattern": "s2"}, "sf": {"pattern": "sf", "num_sink_tokens": 4},
        "lemo": {"pattern": "lemo", "keep_ratio": 0.5}}
"""Row -> model.attention (s2/sf: groups of a quarter of the length; lemo: Jenga's layout, oracle scorer)."""
METHOD = {"name": "longlora"}
BUDGET = {"lengths": [1024, 2048, 4096, 8192], "train_length": 2048, "train_steps": 12, "eval_rows": 24,
          "eval_max_length": 4096}
"""The default budget (each a command-line flag: --lengths, --train-length, ...): the curve's
lengths; fine-tuning steps at train_length tokens; eval_rows test rows spread evenly over the
buckets 512, 1024, ... eval_max_length (a third of each bucket per kind)."""
TRAIN_LR = 3e-4


def eval_spec(budget: dict) -> str:
    return f"builtin:longctx?n={budget['eval_rows']}&length=512&max_length={budget['eval_max_length']}&split=test"


# ----------------------------------------------------------------------------- the curve
def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _batch(tok, length: int):
    """One real longctx row cut to exactly `length` tokens, loss on its last 16 (packed layout)."""
    from tunelab.data import collate, encode, load_records
    from tunelab.data.config import DataConfig
    from tunelab.data.records import Example

    rec = load_records(f"builtin:longctx?n=1&length={2 * length}&kind=kv", DataConfig())
    ids = encode(rec, tok, DataConfig(max_length=10**6))[0].input_ids[:length]
    return collate([Example(ids, [-100] * (length - 16) + ids[-16:])], packing=True, pad_id=0)


def curve_point(row: str, length: int) -> dict:
    """One optimizer step at `length` tokens after a warm-up step at 256: wall and CPU time (all
    threads; steadier than wall time on a shared machine), bytes saved for backward, and the peak
    RSS of the step over the RSS before it (VmHWM reset)."""
    import torch

    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig
    from tunelab.objectives import OBJECTIVES
    from tunelab.options import from_dict
    from tunelab.registry import METHODS
    from tunelab.run.device import autocast, resolve_precision

    att = ROWS[row] | ({"group_size": length // 4} if row in ("s2", "sf") else {})
    model, tok = load_model(from_dict(ModelConfig, {"attention": att}, "model"))
    method = METHODS.get(METHOD["name"])()
    model = method.apply(model).train()
    opt = torch.optim.AdamW(method.param_groups(model, 0.0), lr=1e-5)
    loss_fn, saved = OBJECTIVES.get("sft")(), [0]

    def count(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def step(batch, hook=lambda t: t) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast("auto"), torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
            out = loss_fn.loss(model, batch)
        out.loss_sum.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0
    step(_batch(tok, 256))
    batch = _batch(tok, length)
    before = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
    seconds, cpu = step(batch, count)
    return {"row": row, "length": length, "step_s": seconds, "step_cpu_s": cpu, "saved_activations_mib": saved[0] / 2**20,
            "step_peak_rss_mib": _rss_mib("VmHWM") - before, "rss_before_mib": before,
            "precision": resolve_precision("auto", torch.device("cpu"))}


# ----------------------------------------------------------------------------- accuracy
def scores(model, tok, budget: dict) -> dict:
    """Accuracy per length bucket on the eval rows, and each row's hit and answer CE (for paired intervals)."""
    from tunelab.data import load_records
    from tunelab.data.config import DataConfig
    from tunelab.eval.long_context import answer_scores, by_bucket

    records = load_records(eval_spec(budget), DataConfig())
    got = answer_scores(model, tok, records, precision="auto")
    return {"buckets": {str(k): v for k, v in by_bucket(records, got).items()},
            "examples": [{"source": r.source, "length": r.meta["length"], "kind": r.meta["kind"], **g}
                         for r, g in zip(records, got)]}


def accuracy_row(row: str, budget: dict) -> dict:
    """`before`: the base model; else fine-tune with `row`'s attention at the budget's train_length, then score."""
    import statistics

    import tunelab
    if row == "before":
        from tunelab.models import load_model
        from tunelab.models.config import ModelConfig
        return {"row": row, **scores(*load_model(ModelConfig()), budget)}
    out, length = ROOT / "runs" / "long-context" / row, budget["train_length"]
    run = tunelab.train({
        "model": {"name": "smollm2-135m", "attention": ROWS[row]},
        "data": {"train": f"builtin:longctx?n=64&length={length}&split=train", "eval": None,
                 "max_length": length, "packing": True},
        "method": METHOD,
        "train": {"steps": budget["train_steps"], "micro_batch_size": 1, "lr": TRAIN_LR, "warmup_steps": 2,
                  "schedule": "constant", "seed": 0, "save_every": 4, "progress": False},
        "diagnostics": {"after_train": []}, "output": str(out)})
    _, model, tok, _ = tunelab.load_run(run)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    return {"row": row, **scores(model, tok, budget), "step_s_median": statistics.median(x["step_s"] for x in train),
            "final_loss": statistics.mean(x["loss"] for x in train[-4:]),
            "trainable_params": next(x for x in lines if x["kind"] == "setup")["trainable_params"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------- orchestration
def child(args: list[str], budget: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args, "--budget", json.dumps(budget)], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, TQDM_DISABLE="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300] if (proc.stderr or proc.stdout)
                else f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def machine() -> str:
    return os.environ.get("BENCH_MACHINE", f"cpu{os.cpu_count()}")


def host() -> dict:
    """What the results file must name: CPU model and ISA, GPU, torch, and the threads asked for."""
    from run import machine as bench_machine
    return bench_machine() | {"omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def run_all(only: str, path: Path, budget: dict, command: str) -> dict:
    """Measure what `only` names under `budget` into `path`, skipping what it already holds (a
    later call may add lengths; each call's command and budget are recorded)."""
    res = json.loads(path.read_text()) if path.exists() else {
        "machine": machine(), "date": datetime.date.today().isoformat(), "curve": [], "accuracy": [],
        "settings": {"rows": ROWS, "method": METHOD, "train_lr": TRAIN_LR}, "calls": [], "host": host()}
    res["calls"].append({"command": command, "budget": budget, "eval": eval_spec(budget)})
    t0 = time.time()
    todo = ([("curve", r, n) for n in budget["lengths"] for r in ROWS] if only in ("", "curve") else []) + \
           ([("accuracy", r, None) for r in ["before", *ROWS]] if only in ("", "accuracy") else [])
    for kind, row, n in todo:
        if any(x.get("row") == row and x.get("length") == n and "error" not in x for x in res[kind]):
            continue
        print(f"{kind} {row} {n or ''} ...", flush=True)
        got = child([kind, row] + ([str(n)] if n else []), budget)
        res[kind] = [x for x in res[kind] if not (x.get("row") == row and x.get("length") == n)]
        res[kind].append({"row": row, **({"length": n} if n else {}), **got})
        res["minutes"] = res.get("minutes", 0) + (time.time() - t0) / 60
        t0 = time.time()
        path.write_text(json.dumps(res, indent=1))
        print(json.dumps(res[kind][-1]), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["curve", "accuracy"], default="")
    ap.add_argument("--out", help="results JSON (default bench/results/long-context-<machine>-<date>.json)")
    ap.add_argument("--docs-from", metavar="JSON", nargs="+", help="only rewrite the docs from results files")
    ap.add_argument("--lengths", type=int, nargs="+", default=BUDGET["lengths"], help="the curve's sequence lengths")
    for key in ("train_length", "train_steps", "eval_rows", "eval_max_length"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=BUDGET[key])
    ap.add_argument("--budget", help=argparse.SUPPRESS)  # a child's: the parent's budget as JSON
    a, rest = ap.parse_known_args()
    if rest:  # a child: curve ROW LENGTH | accuracy ROW
        if rest[0] == "curve":
            print(json.dumps(curve_point(rest[1], int(rest[2]))))
        else:
            print(json.dumps(accuracy_row(rest[1], json.loads(a.budget))))
        return
    from long_context_docs import write
    if a.docs_from:
        write(merged([json.loads(Path(p).read_text()) for p in a.docs_from]), [Path(p) for p in a.docs_from])
        return
    part = f"{a.only}-" if a.only else ""
    path = Path(a.out or HERE / "results" / f"long-context-{part}{machine()}-{datetime.date.today().isoformat()}.json")
    budget = {k: getattr(a, k) for k in BUDGET}
    write(run_all(a.only, path, budget, " ".join(["python bench/long_context.py", *sys.argv[1:]])), [path])


def merged(results: list[dict]) -> dict:
    """One result from the files of separate runs (--only curve, --only accuracy)."""
    out = dict(results[0])
    for r in results[1:]:
        out["curve"], out["accuracy"] = out["curve"] + r["curve"], out["accuracy"] + r["accuracy"]
        out["minutes"] = out.get("minutes", 0) + r.get("minutes", 0)
        out["calls"] = out["calls"] + r["calls"]
    return out


if __name__ == "__main__":
    main()
