"""Per-example causal attention of a packed row under CPU bf16 autocast, forward and backward:
PyTorch's CPU flash kernel in autocast's bf16 against the same kernel in fp32, which
tunelab.models.attention.packed_sdpa runs on a CPU without AMX-BF16 (`cpu_attention_in_fp32`).
Both variants go through packed_sdpa itself (the flags it reads are set for each), alternating
call by call so a neighbour's load falls on both alike. Shapes: SmolLM2-135M's attention (9 query
heads, 3 key/value heads, head dim 64) on 8 examples of the benchmark's arithmetic data.

    python bench/attention_precision.py [--reps 30] [--out bench/results/attention-precision-<date>.json]
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


def main(reps: int, out: str | None) -> dict:
    from common import Settings, examples, machine_note
    from tunelab.models import attention
    from tunelab.run.device import cpu_flags

    _, exs = examples(Settings())
    sizes = [len(e.input_ids) for e in exs[:8]]
    n, cu = sum(sizes), torch.tensor([0, *sizes]).cumsum(0)
    torch.manual_seed(0)
    q, k = torch.randn(1, 9, n, 64, requires_grad=True), torch.randn(1, 3, n, 64, requires_grad=True)  # after RoPE: fp32
    v = torch.randn(1, 3, n, 64, dtype=torch.bfloat16, requires_grad=True)  # v_proj's bf16 output
    module = torch.nn.Module().train()
    real_flags = cpu_flags()
    flags = {"bf16": real_flags | {"amx_bf16"}, "fp32": real_flags - {"amx_bf16"}}  # what packed_sdpa reads

    def once(variant: str) -> tuple[float, torch.Tensor]:
        attention.cpu_flags = lambda: flags[variant]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, _ = attention.packed_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)
        o.float().square().sum().backward()
        return time.perf_counter() - t0, o

    times = {"bf16": [], "fp32": []}
    outs = {}
    try:
        for i in range(reps + 3):  # the first three of each are not timed
            for variant in times:
                dt, outs[variant] = once(variant)
                if i >= 3:
                    times[variant].append(dt)
    finally:
        attention.cpu_flags = cpu_flags
    exact = torch.nn.functional.scaled_dot_product_attention  # fp32 reference of the first example
    q, k, v = q.detach(), k.detach(), v.detach()
    outs = {variant: o.detach() for variant, o in outs.items()}
    ref = exact(q[:, :, :sizes[0]], k[:, :, :sizes[0]], v[:, :, :sizes[0]].float(), is_causal=True, enable_gqa=True)
    err = {variant: float((o[:, :sizes[0]].float().transpose(1, 2) - ref).abs().max()) for variant, o in outs.items()}
    med = {variant: statistics.median(t) for variant, t in times.items()}
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python bench/attention_precision.py --reps %d" % reps,
           "machine": machine_note(),
           "example_lengths": sizes, "heads": [9, 3, 64],
           "one_layer_fwd_bwd_s_median": med, "one_layer_fwd_bwd_s": times,
           "fp32_speedup": med["bf16"] / med["fp32"],
           "per_step_saving_s_30_layers": 30 * (med["bf16"] - med["fp32"]),
           "max_abs_error_vs_fp32_first_example": err}
    print(json.dumps({k: res[k] for k in ("example_lengths", "one_layer_fwd_bwd_s_median", "fp32_speedup",
                                          "per_step_saving_s_30_layers", "max_abs_error_vs_fp32_first_example")}))
    if out:
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out")
    a = ap.parse_args()
    main(a.reps, a.out)
