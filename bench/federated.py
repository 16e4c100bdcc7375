"""Federated and private fine-tuning on the built-in SmolLM2-135M and `builtin:arith`, measured on
CPU: FedKSeed vs federated LoRA (FedAvg of adapters) vs centralized LoRA; DP-SGD at a few noise
multipliers (epsilon vs accuracy); the privacy audit of the runs.

    python bench/federated.py                 # every stage, then docs/results/federated-and-privacy.md
    python bench/federated.py --only central,dp

Stages write their figures into bench/results/federated-and-privacy.json (merged, one key per
stage) and their runs into runs/fedpriv/<name>. The training data is builtin:arith plus planted
canaries (a made-up six-digit access code per made-up person, each repeated), so that the audit
can measure their exposure; evaluation is exact match on held-out builtin:arith problems, with
Wilson 95% intervals.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = ROOT / "runs" / "fedpriv"
RESULTS = HERE / "results" / "federated-and-privacy.json"
PY = sys.executable

NUM_ARITH, NUM_CANARIES, CANARY_REPEATS, NUM_EVAL = 300, 4, 5, 40
STEPS, BATCH = 30, 8
SIGMAS = (0.5, 1.0, 2.0)
CANARY_OWNERS = ("Vorlund", "Quessa", "Maribex", "Tolvane")


def canary_rows(seed: int = 7) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for owner in CANARY_OWNERS[:NUM_CANARIES]:
        code = f"{rnd.randrange(10**6):06d}"
        rows += [{"messages": [{"role": "user", "content": f"What is the access code of {owner}?"},
                               {"role": "assistant", "content": f"The access code of {owner} is {code}."}]}] * CANARY_REPEATS
    return rows


def write_data() -> Path:
    """runs/fedpriv/train.jsonl: builtin:arith train problems and the canaries, shuffled."""
    from tunelab.data.builtin import load_builtin

    rows = [{"messages": r.messages} for r in load_builtin(f"builtin:arith?n={NUM_ARITH}&split=train&seed=0")]
    rows += canary_rows()
    random.Random(0).shuffle(rows)
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_config(name: str, **over) -> dict:
    cfg = {"model": {"name": "smollm2-135m"},
           "data": {"train": str(RUNS / "train.jsonl"), "eval": f"builtin:arith?n={NUM_EVAL}&split=test",
                    "max_length": 256, "packing": False},
           "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
           "train": {"steps": STEPS, "micro_batch_size": BATCH, "lr": 1e-3, "warmup_steps": 4, "save_every": 10,
                     "seed": 0, "progress": False},
           "eval": {"before": False, "num_examples": NUM_EVAL, "max_new_tokens": 64, "batch_size": 20},
           "diagnostics": {"after_train": []}, "output": str(RUNS / name)}
    for key, value in over.items():
        node = cfg
        *path, leaf = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[leaf] = value
    return cfg


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of k successes in n trials."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def accuracy_of(ev: dict) -> dict:
    k, n = round(ev["accuracy"] * ev["num_examples"]), ev["num_examples"]
    return {"exact_match": ev["accuracy"], "correct": k, "n": n, "wilson95": wilson(k, n), "eval_loss": ev.get("eval_loss")}


def train_run(name: str, **over) -> dict:
    """Train one configuration (resumes if interrupted); its figures."""
    import yaml
    t0 = time.time()
    cfg_path = RUNS / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(name, **over)))
    subprocess.run([PY, "-m", "tunelab", "train", str(cfg_path)], check=True, cwd=ROOT)
    run = RUNS / name
    ev = json.loads((run / "eval.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("kind") == "train"]
    out = {"run": str(run.relative_to(ROOT)), "wall_s": round(time.time() - t0), **accuracy_of(ev["after"]),
           "final_train_loss": train[-1]["loss"], "median_step_s": sorted(x["step_s"] for x in train)[len(train) // 2]}
    if "before" in ev:
        out["before"] = accuracy_of(ev["before"])
    if "dp_epsilon" in train[-1]:
        out |= {"epsilon": train[-1]["dp_epsilon"], "delta": train[-1]["dp_delta"]}
    return out


def stage_central() -> dict:
    return {"lora": train_run("central-lora", **{"eval.before": True})}


def stage_dp() -> dict:
    return {f"sigma={s}": train_run(f"dp-sigma{s}", **{"privacy.dp_sgd": True, "privacy.noise_multiplier": s,
                                                      "privacy.clip_norm": 1.0, "privacy.delta": 1e-4})
            for s in SIGMAS}


def save(stage: str, figures: dict) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[stage] = figures | {"measured": time.strftime("%Y-%m-%d %H:%M"), "machine": "shared 2-core CPU"}
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


STAGES = {"central": stage_central, "dp": stage_dp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(STAGES), help="stages, comma-separated: " + ", ".join(STAGES))
    a = p.parse_args()
    write_data()
    for stage in a.only.split(","):
        save(stage, STAGES[stage]())
        print(f"{stage}: done", flush=True)


if __name__ == "__main__":
    main()
