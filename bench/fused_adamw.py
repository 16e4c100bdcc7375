"""One AdamW optimizer step over every parameter of the benchmark model (full fine-tuning, fp32 master
weights): torch's multi-tensor (foreach) path against its fused kernel, which tunelab's
build_optimizer picks wherever the parameters allow (tunelab/training/optim.py). The two variants
alternate step by step, so a neighbour's load falls on both alike.

    python bench/fused_adamw.py [--steps 20] [--out bench/results/fused-adamw-<date>.json]

The model is built from its config with random weights (the step's cost does not depend on the
values); gradients are random too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(steps: int, out: str | None) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from common import machine_note, model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path()), dtype=torch.float32)
    sets = {v: [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()] for v in ("foreach", "fused")}
    for i, p in enumerate(sets["foreach"]):  # the same gradients for both
        p.grad = torch.randn_like(p) * 1e-3
        sets["fused"][i].grad = p.grad.clone()
    opts = {"foreach": torch.optim.AdamW(sets["foreach"], lr=1e-4, weight_decay=0.01, foreach=True),
            "fused": torch.optim.AdamW(sets["fused"], lr=1e-4, weight_decay=0.01, fused=True)}
    times = {v: [] for v in opts}
    for i in range(steps + 2):  # the first two steps (state allocation) are not timed
        for v, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= 2:
                times[v].append(time.perf_counter() - t0)
    diff = max((a - b).abs().max().item() for a, b in zip(sets["foreach"], sets["fused"]))
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python bench/fused_adamw.py --steps %d" % steps,
           "machine": machine_note(),
           "params": sum(p.numel() for p in sets["fused"]), "tensors": len(sets["fused"]),
           "step_s_median": {v: statistics.median(t) for v, t in times.items()}, "step_s": times,
           "max_abs_weight_difference_after": diff}
    res["fused_speedup"] = res["step_s_median"]["foreach"] / res["step_s_median"]["fused"]
    print(json.dumps({k: res[k] for k in ("params", "step_s_median", "fused_speedup", "max_abs_weight_difference_after")}))
    if out:
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out")
    a = ap.parse_args()
    main(a.steps, a.out)
