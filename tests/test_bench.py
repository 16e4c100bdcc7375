"""bench/ bookkeeping (not timings): how rounds are pooled and shown."""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from report import markdown  # noqa: E402
from run import pool  # noqa: E402


def _round(step_s, tokens, mem, startup, loss, warmup=1):
    rates = [t / s for s, t in list(zip(step_s, tokens))[warmup:]]
    return {"settings": {"warmup": warmup, "batch_size": 8, "mode": "lora"}, "step_s": step_s, "step_tokens": tokens,
            "tokens_per_s": statistics.median(rates), "tokens_per_step": statistics.mean(tokens[warmup:]),
            "peak_memory_mb": mem, "startup_s": startup, "final_loss": loss}


def test_rounds_pool_every_timed_step_and_keep_each_round():
    a = _round([9.0, 1.0, 2.0], [100, 100, 100], 2000, 10.0, 0.5)   # timed rates 100, 50
    b = _round([9.0, 4.0, 5.0], [100, 100, 100], 2100, 14.0, 0.5)   # timed rates 25, 20
    row = pool([a, b])
    assert row["tokens_per_s"] == statistics.median([100, 50, 25, 20])  # not the mean of round medians
    assert row["peak_memory_mb"] == 2100 and row["startup_s"] == 12.0
    assert [r["tokens_per_s"] for r in row["rounds"]] == [75.0, 22.5]
    assert pool([a]) is a and pool([a, {"error": "boom"}]) == {"error": "boom"}


def test_markdown_shows_each_round():
    rows = [pool([_round([9, 1, 1], [100] * 3, 1000, 5, 0.5), _round([9, 2, 2], [100] * 3, 1000, 5, 0.5)])
            | {"contender": c, "mode": "lora", "ceiling_fraction": 0.5} for c in ("hf", "trl", "tunelab")]
    res = {"machine": {"name": "m", "cpus": 2, "processor": "x", "torch": "t", "native_bf16": False},
           "plan": "full", "date": "d", "command": "c", "bench_seconds": 60, "contenders": rows,
           "ceiling": {"fp32_gflops": 1, "bf16_gflops": 1}, "startup": {"tunelab_help_s": 0.1, "builtin_model_load_s": 1}}
    md = markdown(res)
    assert "| lora | tunelab | 75 | 100 / 50 | 1.00x |" in md and "ran 2 times per mode" in md
