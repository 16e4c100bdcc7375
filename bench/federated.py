"""Federated and private fine-tuning on the built-in SmolLM2-135M and `builtin:arith`, measured on
CPU: FedKSeed vs federated LoRA (FedAvg of adapters) vs centralized LoRA; DP-SGD at a few noise
multipliers (epsilon vs accuracy); the privacy audit of the runs.

    python bench/federated.py                 # every stage: central, fedavg, fedkseed, dp, audit
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
import os
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
CLIENTS, ROUNDS, FEDAVG_STEPS = 2, 3, 5  # FedAvg: 2 x 3 x 5 steps of 8 = the central run's 240 examples
KSEED_STEPS, KSEED_LR = 20, 1e-6  # FedKSeed: 2 x 3 x 20 ZO steps of 8 (two forward passes each)
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


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _write_config(name: str, **over) -> Path:
    import yaml
    cfg_path = RUNS / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(name, **over)))
    return cfg_path


def train_run(name: str, **over) -> dict:
    """Train one configuration (resumes if interrupted); its figures."""
    t0 = time.time()
    subprocess.run([PY, "-m", "tunelab", "train", str(_write_config(name, **over))], check=True, cwd=ROOT)
    run = RUNS / name
    ev = json.loads((run / "eval.json").read_text())
    train = [x for x in _lines(run) if x.get("kind") == "train"]
    out = {"run": str(run.relative_to(ROOT)), "wall_s": round(time.time() - t0), **accuracy_of(ev["after"]),
           "steps": len(train), "examples_seen": len(train) * BATCH, "final_train_loss": train[-1]["loss"],
           "median_step_s": sorted(x["step_s"] for x in train)[len(train) // 2]}
    if "before" in ev:
        out["before"] = accuracy_of(ev["before"])
    if "dp_epsilon" in train[-1]:
        out |= {"epsilon": train[-1]["dp_epsilon"], "delta": train[-1]["dp_delta"],
                "clipped_fraction_last": train[-1]["dp_clipped_fraction"]}
    return out


def federate_run(name: str, **over) -> dict:
    """`tunelab federate` one configuration (a SuperLink and the SuperNodes as processes); its figures."""
    t0 = time.time()
    subprocess.run([PY, "-m", "tunelab", "federate", str(_write_config(name, **over))], check=True, cwd=ROOT)
    run = RUNS / name
    rounds = [x for x in _lines(run) if x.get("kind") == "round"]
    ev = json.loads((run / "eval.json").read_text())
    steady = rounds[1:] or rounds  # round 1 also carries FedKSeed's one-time candidate seeds (seed_bytes)
    fc = base_config(name, **over)["federated"]
    return {"run": str(run.relative_to(ROOT)), "wall_s": round(time.time() - t0), **accuracy_of(ev["after"]),
            "rounds": len(rounds), "clients": fc["num_clients"], "local_steps": fc["local_steps"],
            "examples_seen": len(rounds) * fc["num_clients"] * fc["local_steps"] * BATCH,
            "round_losses": [r["loss"] for r in rounds], "missing_replies": sum(r["missing"] for r in rounds),
            "bytes_per_client_per_round": max(r["bytes_per_client"] for r in steady),
            "download_bytes_per_client": max(r["download_bytes_per_client"] for r in steady),
            "upload_bytes_per_client": max(r["upload_bytes_per_client"] for r in steady),
            "encoded_bytes_per_client_per_round": max(r.get("encoded_bytes_per_client", 0) for r in steady),
            "seed_bytes_once": sum(r["seed_bytes"] for r in rounds),
            "median_round_s": sorted(r["round_s"] for r in rounds)[len(rounds) // 2]}


FED = {"federated.num_clients": CLIENTS, "federated.rounds": ROUNDS, "federated.split": "iid",
       "federated.round_timeout": 3600, "federated.seed": 0}


def stage_central() -> dict:
    return {"lora": train_run("central-lora", **{"eval.before": True})}


def stage_fedavg() -> dict:
    """Federated averaging of the LoRA adapters: CLIENTS x ROUNDS x FEDAVG_STEPS steps of BATCH, the
    central run's examples in all."""
    return {"lora": federate_run("fedavg-lora", **FED, **{"federated.algorithm": "fedavg",
                                                         "federated.local_steps": FEDAVG_STEPS})}


def stage_fedkseed() -> dict:
    """FedKSeed, full-parameter as in the paper (fp32: bf16 cannot resolve an eps-sized perturbation)."""
    return {"full": federate_run("fedkseed-full", **FED, **{
        "method": {"name": "full"}, "train.precision": "fp32", "train.lr": KSEED_LR, "train.warmup_steps": 0,
        "federated.algorithm": "fedkseed", "federated.local_steps": KSEED_STEPS, "federated.num_seeds": 4096,
        "federated.zo_eps": 5e-4})}


def stage_dp() -> dict:
    return {f"sigma={s}": train_run(f"dp-sigma{s}", **{"privacy.dp_sgd": True, "privacy.noise_multiplier": s,
                                                      "privacy.clip_norm": 1.0, "privacy.delta": 1e-4})
            for s in SIGMAS}


def stage_messages() -> dict:
    """FedKSeed's messages in the paper's setting (tau = 200; K = 1024 and 4096; uniform and Pro),
    built by the server and client code the runs use, after one round of tau random pairs per
    client, and encoded by Flower: bytes per client in a steady-state round (no model involved:
    the sizes depend on K and tau only)."""
    import numpy as np
    from tunelab import config as C
    from tunelab.federated.flower.apps import GridTransport
    from tunelab.federated.protocol import kseed_upload
    from tunelab.federated.server import KSeedServer, traffic

    out, rng = {}, np.random.default_rng(0)
    for k, pro in ((1024, False), (4096, False), (1024, True), (4096, True)):
        cfg = C.build(base_config("messages", **{"method": {"name": "full"}, "federated.num_seeds": k,
                                                 "federated.local_steps": 200,
                                                 "federated.seed_sampling": "pro" if pro else "uniform"}))
        server = KSeedServer(cfg)
        replies = {}
        for r in (1, 2):
            sent = {n: server.message(n, r) for n in (0, 1)}
            replies = {n: kseed_upload(rng.integers(0, k, 200), rng.normal(size=200), num_examples=160,
                                       synced_round=r - 1, loss=1.0, partition=n) for n in (0, 1)}
            server.aggregate(r, replies)
        out[f"K={k}, tau=200, {'pro' if pro else 'uniform'}"] = traffic(sent, replies, GridTransport(None))
    return out


AUDIT = {"batch_sizes": [1, 4, 16], "sigmas": [0.5, 1.0, 2.0], "clip_norm": 1.0, "kseed_steps": 200,
         "num_candidates": 100}


def stage_audit() -> dict:
    """`tunelab diagnose RUN --only privacy` on the runs that exist (options: AUDIT)."""
    import yaml
    out = {}
    for run in [RUNS / n for n in ("central-lora", "dp-sigma1.0", "fedavg-lora")]:
        if not (run / "final").is_dir():
            continue
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["diagnostics"]["options"] = {"privacy": AUDIT}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.time()
        subprocess.run([PY, "-m", "tunelab", "diagnose", str(run), "--only", "privacy"], check=True, cwd=ROOT)
        res = json.loads((run / "diagnostics" / "privacy.json").read_text())
        out[run.name] = {"wall_s": round(time.time() - t0), "summary": res["summary"], **res["details"]}
    return out


def save(stage: str, figures: dict) -> None:
    from tunelab.run.device import cpu_isa, cpu_model
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[stage] = figures | {"measured": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{cpu_model()}, shared",
                             "isa": cpu_isa(), "cores": os.cpu_count()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


STAGES = {"messages": stage_messages, "central": stage_central, "fedavg": stage_fedavg, "fedkseed": stage_fedkseed, "dp": stage_dp,
          "audit": stage_audit}


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
