"""What every contender shares: the model, the data (tokenized once, identically), the
hyper-parameters, and how a contender reports its figures (one JSON line on stdout)."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

MODEL = os.environ.get("BENCH_MODEL", "smollm2-135m")
"""The built-in name, or a model directory (bench/run.py sets it for the random-weight GPU shapes)."""
DATA = "builtin:arith?n=4000&split=train"


def machine_note() -> dict:
    """The machine a one-off benchmark ran on, for its results file: CPU model and ISA levels, cores,
    torch's threads and version, and the load when it started (a busy neighbour shows there)."""
    import torch

    from tunelab.run.device import cpu_isa, cpu_model
    return {"cpu": cpu_model(), "isa": cpu_isa(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg_at_start": os.getloadavg()[0]}


def model_path():
    """The model's HF directory: the built-in's cache, or MODEL itself."""
    from pathlib import Path

    from tunelab.models.builtin import BUILTIN_MODELS, pull
    return pull(MODEL) if MODEL in BUILTIN_MODELS else Path(MODEL)


@dataclass
class Settings:
    mode: str = "lora"            # lora | full
    steps: int = 8                # optimizer steps, warm-up included
    warmup: int = 2               # steps excluded from the timing
    batch_size: int = int(os.environ.get("BENCH_BATCH", 8))  # examples per optimizer step
    lr: float = 2e-4
    max_length: int = 256
    seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 32


def precision_of(contender: str) -> str:
    """The compute precision a contender runs in: the HF ones bf16 mixed precision where the
    hardware computes bf16 natively (TrainingArguments.bf16), tunelab its `auto` (the same rule)."""
    import torch

    from tunelab.run.device import resolve_precision
    return resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def native_bf16() -> bool:
    import torch

    from tunelab.run.device import resolve_precision
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_precision("auto", dev) == "bf16"


def examples(s: Settings):
    """The same tokenized examples for every contender: ids + labels (-100 off the assistant turn)."""
    from tunelab.data import encode, load_records
    from tunelab.data.config import DataConfig
    from tunelab.models import load_tokenizer
    from tunelab.models.config import ModelConfig

    tok = load_tokenizer(ModelConfig(name=MODEL))
    cfg = DataConfig(max_length=s.max_length)
    return tok, encode(load_records(DATA, cfg), tok, cfg)


def peak_memory_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def report(name: str, s: Settings, *, step_s: list[float], tokens: list[int], losses: list[float],
           launched: float, first_step_end: float, extra: dict | None = None) -> None:
    """Print the contender's figures as one JSON line (the orchestrator reads the last line)."""
    import statistics
    timed = list(zip(step_s, tokens))[s.warmup:]
    rates = [t / dt for dt, t in timed]
    out = {"contender": name, "settings": asdict(s), "precision": precision_of(name),
           "tokens_per_s": statistics.median(rates),
           "tokens_per_step": statistics.mean(t for _, t in timed), "step_s": [round(x, 3) for x in step_s],
           "step_tokens": list(tokens),
           "peak_memory_mb": peak_memory_mb(), "startup_s": first_step_end - launched,
           "final_loss": statistics.mean(losses[-3:]), "losses": [round(x, 4) for x in losses],
           **(extra or {})}
    print(json.dumps(out))
    sys.stdout.flush()


_IMPORTED = time.time()


def launched_at() -> float:
    """Process launch as bench/run.py recorded it; run by hand, the time this module was imported
    (so start-up is never measured from the end of the first step)."""
    return float(os.environ.get("BENCH_LAUNCHED", _IMPORTED))
