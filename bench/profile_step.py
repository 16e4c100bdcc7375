"""Where one step of the bench's tunelab contender spends its time: torch.profiler over the real
training step (`tunelab.training.step.train_step`, called by the loop), so the precision, the split
and every fused path are the ones the tunelab row ran. Self CPU time by op category, the costliest
ops by input shape, and the page faults of each step (a fresh large tensor on the CPU is mapped and
faulted in page by page; see tunelab/run/casts.py).

    python bench/profile_step.py [lora|full] [--step N] [--out FILE.json]  -> one JSON line
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CATEGORIES = {  # first matching substring wins
    "matmul (linear/mm/addmm/bmm)": ("addmm", "mm", "linear", "matmul", "bmm"),
    "attention (sdpa)": ("attention", "sdpa", "_flash"),
    "cross-entropy / log-softmax": ("log_softmax", "nll_loss", "cross_entropy", "HeadCE", "logsumexp"),
    "optimizer (AdamW)": ("adam", "_foreach"),
    "type conversions / copies / fills": ("copy_", "_to_copy", "fill_", "zero_"),
    "elementwise / norms / rope": ("mul", "add", "silu", "pow", "mean", "rsqrt", "neg", "cat", "div", "sub",
                                   "RMSNorm"),
}


def category(op: str) -> str:
    return next((c for c, keys in CATEGORIES.items() if any(k in op for k in keys)), "other")


def profile(mode: str = "lora", step: int = 3) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import contenders
    import tunelab.training.loop as loop
    from common import Settings, machine_note

    real, faults, found = loop.train_step, [], {}

    def wrapped(*args, **kw):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if len(faults) + 1 != step:
            out = real(*args, **kw)
        else:
            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                t0 = time.perf_counter()
                out = real(*args, **kw)
                found["wall_s"] = time.perf_counter() - t0
            found["prof"], found["tokens"] = prof, out.tokens
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out

    loop.train_step = wrapped
    report = io.StringIO()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(report):
        contenders.run_tunelab(Settings(mode=mode, steps=step + 1, warmup=1), out + "/run")
    ran = json.loads([ln for ln in report.getvalue().splitlines() if ln.startswith("{")][-1])
    events = found["prof"].key_averages(group_by_input_shape=True)
    totals: dict[str, float] = {}
    for e in events:
        totals[category(e.key)] = totals.get(category(e.key), 0.0) + e.self_cpu_time_total
    whole = sum(totals.values())
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {"mode": mode, "precision": ran["precision"], "profiled_step": step, "tokens": found["tokens"],
            "wall_s": round(found["wall_s"], 3), "step_ms": whole / 1e3,
            "by_category_pct": {k: round(100 * v / whole, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": e.key, "shapes": str(e.input_shapes), "calls": e.count,
                         "ms": round(e.self_cpu_time_total / 1e3, 1)} for e in top],
            "page_faults_per_step": faults, "machine": machine_note()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="lora", choices=["lora", "full"])
    ap.add_argument("--step", type=int, default=3, help="which step to profile (the earlier ones warm up)")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()
    res = profile(a.mode, a.step)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
