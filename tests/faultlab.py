"""Shared pieces of the fault tests (tests/test_faults.py): the run config, what a faulted run
must reproduce (`outcome`, `differences`), the timeline of pause points, checkpoint corruptions,
and small-filesystem mounts."""
from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.run.files import verify
from tunelab.training.checkpoint import list_checkpoints

PAUSE = "TUNELAB_TEST_PAUSE_AT"
STEPS, EVAL_EVERY, KEEP = 6, 2, 2
CFG = f"""model: {{name: MODEL}}
data: {{train: DATA, eval: DATA, max_length: 64}}
method: {{name: lora, r: 4, alpha: 8, dropout: 0.1}}
train: {{steps: {STEPS}, micro_batch_size: 2, grad_accum: 2, lr: 5.0e-3, warmup_steps: 2, save_every: 1,
        keep_checkpoints: {KEEP}, precision: fp32, device: cpu, progress: false}}
eval: {{every: {EVAL_EVERY}, num_examples: 4, max_new_tokens: 6, batch_size: 4}}
diagnostics: {{after_train: []}}
"""
# Post-training diagnostics are off here (they are not part of the training state under test);
# the secrets test turns them back on, so their files are scanned too.


def report(name: str, **counts) -> None:
    line = f"[reliability] {name}: " + ", ".join(f"{k}={v}" for k, v in counts.items())
    print(line)
    if os.environ.get("TUNELAB_RELIABILITY_LOG"):
        with open(os.environ["TUNELAB_RELIABILITY_LOG"], "a") as f:
            f.write(line + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def outcome(run: Path) -> dict:
    """What an interrupted run must reproduce: final weights, the loss curve, eval lines, eval.json
    (timings aside), and exactly one setup line."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run / "eval.json").read_text())
    return {
        "weights": load_file(str(run / "final" / "adapter_model.safetensors")),
        "curve": [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"], r["trained_tokens"])
                  for r in lines if r["kind"] == "train"],
        "evals": [(r["step"], r["eval_loss"], r["accuracy"]) for r in lines if r["kind"] == "eval"],
        "setup_lines": sum(r["kind"] == "setup" for r in lines),
        "eval_json": {k: {m: v for m, v in d.items() if m != "examples_per_s"} for k, d in results.items()},
    }


def differences(run: Path, expected: dict) -> list[str]:
    """Empty when `run` equals the reference bitwise and its directory holds no debris."""
    got, diffs = outcome(run), []
    if got["weights"].keys() != expected["weights"].keys() or not all(
            torch.equal(got["weights"][k], expected["weights"][k]) for k in expected["weights"]):
        diffs.append("final weights differ")
    diffs += [f"{k} differs: {got[k]} != {expected[k]}" for k in ("curve", "evals", "setup_lines", "eval_json")
              if got[k] != expected[k]]
    debris = [p.name for d in (run, run / "checkpoints") for p in d.iterdir() if p.name.startswith(".")
              and p.name != ".lock"]
    diffs += [f"left over: {debris}"] if debris else []
    diffs += [f"{c}: {verify(c)}" for c in list_checkpoints(run / "checkpoints") if verify(c)]
    return diffs


def argv_for(lab, run: Path, *extra: str) -> list[str]:
    """`train RUN` once the run directory exists, else the original command (a kill can land
    before config.yaml is written)."""
    return ["train", str(run), *extra] if (run / "config.yaml").exists() else \
        ["train", str(lab.cfg), f"output={run}", *extra]


def timeline() -> list[str]:
    """Every pause point of an uninterrupted run, in order (see tunelab/run/signals.py)."""
    points = ["eval:0"]
    for s in range(1, STEPS + 1):
        points.append(f"step:{s}")
        if s % EVAL_EVERY == 0 and s < STEPS:
            points.append(f"eval:{s}")
        points += [f"{p}:step-{s}" for p in ("fill", "write", "manifest", "renamed")]
        points += [f"prune:step-{s - KEEP}"] if s > KEEP else []
    return points + [f"{p}:final" for p in ("fill", "write", "manifest", "renamed")] + [f"eval:{STEPS}"]


FILES = ["trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "manifest.json"]


def corruptions(rnd: random.Random) -> list[tuple[str, str, object]]:
    """(file, kind, how) for every file kind: truncate, two byte flips, delete, empty; and for the
    manifest also garbage, an empty object, and a listing of nothing."""
    def flip(data: bytes) -> bytes:
        i = rnd.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << rnd.randrange(8))]) + data[i + 1:]
    kinds = [("truncate", lambda b: b[: len(b) // 2]), ("flip", flip), ("flip", flip),
             ("delete", None), ("empty", lambda b: b"")]
    out = [(f, k, how) for f in FILES for k, how in kinds]
    return out + [("manifest.json", "garbage", lambda b: bytes(rnd.randrange(256) for _ in range(200))),
                  ("manifest.json", "not a listing", lambda b: b"{}"),
                  ("manifest.json", "lists nothing", lambda b: b'{"files": {}}')]


def corrupt(path: Path, how) -> None:
    if how is None:
        path.unlink()
    else:
        path.write_bytes(how(path.read_bytes()))


def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {res.stderr.strip()}")


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], check=False)


def pages(path: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) for p in path.rglob("*") if p.is_file())
