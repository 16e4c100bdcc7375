"""Where a tunelab LoRA step's time goes (torch.profiler, self CPU time by op category).

    python bench/profile_step.py  -> one JSON line
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CATEGORIES = {  # first matching substring wins
    "matmul (linear/mm/addmm/bmm)": ("addmm", "mm", "linear", "matmul", "bmm"),
    "attention (sdpa)": ("attention", "sdpa", "_flash"),
    "cross-entropy / log-softmax": ("log_softmax", "nll_loss", "cross_entropy", "HeadCE", "logsumexp"),
    "optimizer (AdamW)": ("adam", "_foreach"),
    "elementwise / norms / rope": ("mul", "add", "silu", "pow", "mean", "rsqrt", "neg", "cat", "div", "sub",
                                   "RMSNorm"),
}


def category(op: str) -> str:
    return next((c for c, keys in CATEGORIES.items() if any(k in op for k in keys)), "other")


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from common import Settings, examples
    from tunelab.data import collate
    from tunelab.methods.lora import LoRA, LoRAConfig
    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig
    from tunelab.objectives.sft import SFT

    s = Settings()
    tok, exs = examples(s)
    model, _ = load_model(ModelConfig(name="smollm2-135m"))
    model = LoRA(LoRAConfig(r=s.lora_r, alpha=s.lora_alpha)).apply(model).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, foreach=True)

    def step(i):
        out = SFT().loss(model, collate(exs[i * 8:(i + 1) * 8], packing=True, pad_id=tok.pad_token_id))
        out.loss_sum.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(1)
    totals: dict[str, float] = {}
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    for key, us in rows:
        totals[category(key)] = totals.get(category(key), 0.0) + us
    whole = sum(totals.values())
    top = sorted(rows, key=lambda r: -r[1])[:10]
    print(json.dumps({"step_ms": whole / 1e3,
                      "by_category_pct": {k: round(100 * v / whole, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
                      "top_ops_pct": {k: round(100 * v / whole, 1) for k, v in top}}))


if __name__ == "__main__":
    main()
