"""SinkLoRA's inference-time half: how much of the model's answer survives an H2O-compressed KV cache
(tunelab.models.h2o), on the built-in long-context task, for the base SmolLM2 and after SF-Attn
fine-tuning (the long-context bench's SF row: LongLoRA parameterization, 24 steps at 1,024 tokens).

    python bench/h2o_kv.py                       # results JSON + the markdown table on stdout
    python bench/h2o_kv.py --table bench/results/h2o-kv-<machine>-<date>.json   (table only)

For each held-out row the prompt is prefilled into the cache (full, or compressed to a fraction of
its length: half the budget the recent window, 4 sinks, the rest heavy hitters) and the answer is
then fed token by token through that cache, as generation would: `hit` = the greedy choice at every
answer token is that token (what greedy decoding returns), `nll` = the answer tokens' mean
cross-entropy, `kv_mib` = the cache's size after the prompt.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
FRACTIONS = [None, 0.5, 0.25, 0.125]
"""Cache budget as a share of the prompt's length (None: the full cache)."""
EVAL = "builtin:longctx?n={n}&length=1024&max_length=2048&split=test"


@torch.no_grad()
def answer_through_cache(model, prompt: list[int], answer: list[int], fraction) -> dict:
    from transformers import DynamicCache

    from tunelab.models.h2o import KVPolicy, compressed_cache
    from tunelab.run.device import autocast

    policy = None
    if fraction is not None:
        budget = max(16, int(len(prompt) * fraction))
        policy = KVPolicy(budget, budget // 2, 4)
    with autocast("auto", torch.device("cpu")), compressed_cache(model, policy) as cache:
        cache = cache if cache is not None else DynamicCache()
        out = model(torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1)
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        logits = [out.logits[0, -1].float()]
        for t in answer[:-1]:
            logits.append(model(torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1].float())
    logits, target = torch.stack(logits), torch.tensor(answer)
    return {"hit": bool((logits.argmax(-1) == target).all()), "nll": float(F.cross_entropy(logits, target)),
            "kv_mib": kv / 2**20, "budget": None if policy is None else policy.budget}


def sf_model(steps: int):
    import tunelab
    from long_context import METHOD, ROWS, TRAIN_LR

    run = tunelab.train({
        "model": {"name": "smollm2-135m", "attention": ROWS["sf"]},
        "data": {"train": "builtin:longctx?n=64&length=1024&split=train", "eval": None, "max_length": 1024,
                 "packing": True},
        "method": METHOD,
        "train": {"steps": steps, "micro_batch_size": 1, "lr": TRAIN_LR, "warmup_steps": 2, "schedule": "constant",
                  "seed": 0, "save_every": 4, "progress": False},
        "diagnostics": {"after_train": []}, "output": str(ROOT / "runs" / "h2o-kv" / "sf")})
    _, model, tok, _ = tunelab.load_run(run)
    return model, tok


def measure(rows: int, steps: int, models: list[str]) -> dict:
    from tunelab.data import encode, load_records
    from tunelab.data.config import DataConfig
    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig

    out = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "eval": EVAL.format(n=rows),
           "train_steps": steps, "fractions": FRACTIONS, "models": {}}
    try:
        from long_context import host
        out["host"] = host()
    except Exception as e:  # noqa: BLE001 - the host line is informative only
        out["host"] = {"error": str(e)}
    for name in models:
        model, tok = load_model(ModelConfig()) if name == "base" else sf_model(steps)
        model.eval()
        records = load_records(out["eval"], DataConfig())
        examples = encode(records, tok, DataConfig(max_length=10**9))
        res = []
        for r, ex in zip(records, examples):
            first = next(i for i, lab in enumerate(ex.labels) if lab != -100)
            prompt, answer = list(ex.input_ids[:first]), list(ex.input_ids[first:])
            for f in FRACTIONS:
                res.append({"length": r.meta["length"], "kind": r.meta["kind"], "tokens": len(prompt), "fraction": f,
                            **answer_through_cache(model, prompt, answer, f)})
                print(json.dumps({"model": name, **res[-1]}), file=sys.stderr)
        out["models"][name] = res
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, mid - half), min(1.0, mid + half))


def table(res: dict) -> str:
    lines = ["| model | cache | answered (hits/rows, 95% Wilson) | answer CE | "
             "KV cache after the prompt, MiB (mean) |", "|---|---|---|---|---|"]
    for name, rows in res["models"].items():
        for f in res["fractions"]:
            sel = [r for r in rows if r["fraction"] == f]
            k, n = sum(r["hit"] for r in sel), len(sel)
            lo, hi = wilson(k, n)
            label = "full" if f is None else f"H2O {f:g} of the prompt"
            lines.append(f"| {name} | {label} | {k}/{n} [{lo:.0%}, {hi:.0%}] | {sum(r['nll'] for r in sel) / n:.3f} | "
                         f"{sum(r['kv_mib'] for r in sel) / n:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=24, help="held-out rows (half at 1,024, half at 2,048 tokens)")
    ap.add_argument("--train-steps", type=int, default=24)
    ap.add_argument("--models", nargs="+", choices=["base", "sf"], default=["base", "sf"],
                    help="the base model, and/or it after SF-Attn fine-tuning")
    ap.add_argument("--out", help="results JSON (default bench/results/h2o-kv-cpu<n>-<date>.json)")
    ap.add_argument("--table", metavar="JSON", help="only print the table of a results file")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return
    import os
    res = measure(a.rows, a.train_steps, a.models)
    path = Path(a.out or HERE / "results" / f"h2o-kv-cpu{os.cpu_count()}-{res['date']}.json")
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}\n\n{table(res)}")


if __name__ == "__main__":
    main()
