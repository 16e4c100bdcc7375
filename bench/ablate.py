"""What each tunelab optimisation buys: the tunelab LoRA contender with one optimisation turned
off (or an opt-in one on) at a time, same settings as `bench/run.py`.

    python bench/ablate.py [steps] [warmup]   -> bench/results/ablation-<machine>-<date>.json
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import child, machine  # noqa: E402

VARIANTS = {  # label -> (tunelab overrides, environment)
    "tunelab default": ([], {}),
    "with train.compact_host_memory (fixed 1 MiB malloc mmap threshold)": (["train.compact_host_memory=true"], {}),
    "without per-example attention (transformers' masked SDPA over the packed row)":
        (["model.attn_implementation=sdpa_masked"], {}),
    "without packing (right-padded batches)": (["data.packing=false"], {}),
}


def main(steps: int = 5, warmup: int = 2) -> None:
    rows = {}
    for label, (overrides, env) in VARIANTS.items():
        print(f"ablate: {label}", flush=True)
        rows[label] = child(["bench/contenders.py", "tunelab", "lora", str(steps), str(warmup), *overrides], **env)
    m = machine()
    out = HERE / "results" / f"ablation-{m['name']}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({"machine": m, "rows": rows}, indent=1))
    base = rows["tunelab default"]
    print("| variant | real tokens/s | default's speed vs this | peak memory MB |\n|---|---|---|---|")
    for label, r in rows.items():
        if "error" in r:
            print(f"| {label} | failed | | |")
            continue
        print(f"| {label} | {r['tokens_per_s']:.0f} | {base['tokens_per_s'] / r['tokens_per_s']:.2f}x "
              f"| {r['peak_memory_mb']:.0f} |")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
