"""Generation-based evaluation: batched with a KV cache (what `tunelab eval` does) against a
one-by-one `generate` loop, on the same prompts."""
from __future__ import annotations

import time


def eval_speed(num: int = 16, max_new_tokens: int = 48, batch_size: int = 16) -> dict:
    from tunelab.data import encode_prompt, load_records
    from tunelab.data.config import DataConfig
    from tunelab.eval.task import generate
    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig

    model, tok = load_model(ModelConfig(name="smollm2-135m"))
    prompts = [encode_prompt(r, tok) for r in load_records(f"builtin:arith?n={num}&split=test", DataConfig())]
    out = {}
    for name, bs in (("batched_kv_cache", batch_size), ("one_by_one", 1)):
        t0 = time.perf_counter()
        generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=bs)
        out[name + "_examples_per_s"] = num / (time.perf_counter() - t0)
    out["speedup"] = out["batched_kv_cache_examples_per_s"] / out["one_by_one_examples_per_s"]
    return out
