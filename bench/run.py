"""`make bench`: tunelab against transformers+PEFT (Trainer) and TRL (SFTTrainer, packed), same
model, data, optimizer, hyper-parameters, steps and seed; plus the machine's matmul ceiling, a
profile of a tunelab step, evaluation speed and start-up times.

    python bench/run.py [quick|full]     (or BENCH=quick make bench)
    python bench/run.py gpu|gpu-1b       (on a CUDA GPU: random-weight SmolLM2-135M / ~1B Llama shapes)

Writes bench/results/<machine>-<date>.json and .md, and the table into docs/results/performance.md.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PLANS = {  # (steps, warm-up steps excluded from timing), per mode
    "quick": {"lora": (5, 2), "full": (4, 1)},
    "full": {"lora": (8, 2), "full": (6, 2)},
    "gpu": {"lora": (12, 4), "full": (10, 4)},
    "gpu-1b": {"lora": (10, 4), "full": (8, 3)},
}
GPU_SHAPES = {"gpu": ("smollm2-135m", 64), "gpu-1b": ("llama-1b", 128)}
"""GPU plans: (random-weight shape from bench/shapes.py, examples per optimizer step). A GPU needs far
more than 8 short examples per step to be busy, and random weights need no checkpoint on the
machine (speed does not depend on the weights; the contenders still share them, so losses compare)."""
ROUNDS = {"quick": 1, "full": 2, "gpu": 1, "gpu-1b": 1}
"""Each contender runs this many times per mode, in the order hf, trl, tunelab and then reversed
(A B C C B A): the shared machine's speed drifts by 10-20% over minutes, and one pass in a fixed
order would hand that drift to whoever runs last. Figures pool all rounds' timed steps."""
CONTENDERS = ("hf", "trl", "tunelab")
VARIANTS = {  # plan -> extra tunelab rows: (row name, mode, config overrides)
    "quick": [],
    "full": [("tunelab+compile", "lora", ["train.compile=true"])],
    "gpu": [], "gpu-1b": [],
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}
"""Nominal dense bf16 peaks (vendor datasheets), by device-name fragment, first match wins: MFU's
denominator. Unknown devices get no MFU (the measured matmul ceiling is reported for all)."""


def peak_tflops(device_name: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if device_name and k in device_name), None)


def kit_dir() -> Path:
    """Config and tokenizer for the random-weight shapes: $BENCH_KIT, .gpu/kit (`make gpu-kit`, for a
    machine without the built-in model: bench/GPU.md), or the built-in's cache."""
    from tunelab.models import pull
    kit = Path(os.environ.get("BENCH_KIT") or HERE.parent / ".gpu" / "kit")
    if (kit / "config.json").exists():
        return kit
    if os.environ.get("BENCH_KIT"):
        raise SystemExit(f"BENCH_KIT={kit}: no config.json there (make it with `make gpu-kit`)")
    return pull("smollm2-135m")


def child(args: list[str], **env_extra: str) -> dict:
    """Run a script in its own process (its own peak memory) and parse its last JSON line."""
    env = dict(os.environ, BENCH_LAUNCHED=repr(time.time()), PYTHONUNBUFFERED="1", TQDM_DISABLE="1", **env_extra)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=HERE.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1])


def pool(runs: list[dict]) -> dict:
    """One contender's rounds -> one row: median tokens/s over all timed steps of all rounds, the
    highest peak memory, the median start-up, the first round's loss; each round's own figures are
    kept under "rounds" (the losses must agree: same seed, same data)."""
    import statistics

    if any("error" in r for r in runs) or len(runs) == 1:
        return next((r for r in runs if "error" in r), runs[0])
    rates = [t / dt for r in runs for dt, t in list(zip(r["step_s"], r["step_tokens"]))[r["settings"]["warmup"]:]]
    keys = ("tokens_per_s", "peak_memory_mb", "startup_s", "final_loss")
    return runs[0] | {"tokens_per_s": statistics.median(rates),
                      "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
                      "startup_s": statistics.median(r["startup_s"] for r in runs),
                      "rounds": [{k: r[k] for k in keys} for r in runs]}


def machine() -> dict:
    import torch

    from common import native_bf16
    from tunelab.run.device import AUTO_PRECISION_ENV, cpu_isa, cpu_model
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    isa = cpu_isa()
    kind = "gpu" if gpu else ("amx" if "AMX-BF16" in isa else "bf16" if "AVX512-BF16" in isa else "fp32")
    return {"name": (gpu or f"cpu{os.cpu_count()}").replace(" ", "-"), "gpu": gpu, "cpus": os.cpu_count(),
            "cpu_model": cpu_model(), "isa": isa, "machine_class": kind,
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "native_bf16": native_bf16(),
            # `precision: auto` forced for every contender (tunelab's switch, read by bench/common.py): the
            # run is not its machine class's default, so it replaces no docs table
            "auto_precision_forced": os.environ.get(AUTO_PRECISION_ENV, "").strip() or None,
            # the ISA the libraries were limited to (an AVX2-only CPU emulated on a newer one): likewise
            "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)} or None}


ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def not_its_class(res: dict) -> bool:
    """Run with a forced precision or limited ISA: not the default of its machine class."""
    return bool(res["machine"].get("auto_precision_forced") or res["machine"].get("isa_limits"))


def failures(res: dict) -> list[str]:
    """'contender mode: reason' for every contender that failed (any failure fails the bench)."""
    return [f"{r['contender']} {r['mode']}: {r['error'].strip().splitlines()[-1] if r['error'].strip() else 'no output'}"
            for r in res["contenders"] if "error" in r]


def ceiling(model_dir: Path, tokens: int) -> dict:
    import torch
    from transformers import AutoConfig

    from ceiling import gemm_gflops
    cfg = AutoConfig.from_pretrained(model_dir)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return {"fp32_gflops": gemm_gflops(cfg, tokens, torch.float32, dev),
            "bf16_gflops": gemm_gflops(cfg, tokens, torch.bfloat16, dev)}


def add_flops(res: dict, model_dir: Path, ceil: dict, bf16: bool) -> None:
    """Each row's achieved GFLOP/s, its fraction of the measured ceiling and, on a GPU of known
    peak, its MFU."""
    from transformers import AutoConfig

    from ceiling import flops_per_token
    from shapes import count_params
    cfg = AutoConfig.from_pretrained(model_dir)
    n_params = count_params(cfg)  # tied embeddings counted once (SmolLM2-135M: 134,515,008)
    peak = peak_tflops(res["machine"]["gpu"])
    res["model_params"], res["peak_bf16_tflops"] = n_params, peak
    for r in res["contenders"]:
        if "error" in r:
            continue
        seq = r["tokens_per_step"] / r["settings"]["batch_size"]
        fpt = flops_per_token(cfg, n_params, r["settings"]["mode"], seq)
        r["achieved_gflops"] = r["tokens_per_s"] * fpt / 1e9
        r["ceiling_fraction"] = r["achieved_gflops"] / ceil["bf16_gflops" if bf16 else "fp32_gflops"]
        if peak:
            r["mfu"] = r["achieved_gflops"] / (peak * 1e3)


def startup(model: str = "smollm2-135m") -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunelab", "--help"], capture_output=True, check=True)
    help_s = time.perf_counter() - t0
    code = ("import time; t=time.perf_counter(); from tunelab.models import load_model; "
            f"from tunelab.models.config import ModelConfig; load_model(ModelConfig(name={model!r})); "
            "print(time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"tunelab_help_s": help_s, "builtin_model_load_s": float(out.stdout.strip().splitlines()[-1])}


def result_stem(res: dict) -> Path:
    """bench/results/<machine>-<date>[-<plan>], with the time appended when that run exists already:
    a second run on the same day never overwrites the first."""
    stem = f"{res['machine']['name']}-{res['date']}" + ("" if res["plan"] == "full" else f"-{res['plan']}")
    out = HERE / "results" / stem
    if out.with_suffix(".json").exists():
        out = out.with_name(stem + time.strftime("-%H%M"))
    return out


def main(plan_name: str) -> Path:
    import torch

    from report import markdown, write_docs
    from shapes import build
    from tunelab.models import pull

    started = time.perf_counter()
    env: dict[str, str] = {}
    if plan_name in GPU_SHAPES:
        if not torch.cuda.is_available():
            raise SystemExit(f"plan {plan_name!r} needs a CUDA GPU; on CPU run `make bench` (full) or BENCH=quick")
        shape, batch = GPU_SHAPES[plan_name]
        model_dir = build(shape, HERE / ".models" / shape, kit_dir())  # not part of anyone's start-up time
        env = {"BENCH_MODEL": str(model_dir), "BENCH_BATCH": str(batch)}
        model = f"{shape}-shaped, random weights, {batch} examples per step"
    else:
        model_dir = pull("smollm2-135m")  # not part of anyone's start-up time
        model = "smollm2-135m (built-in weights), 8 examples per step"
    res = {"plan": plan_name, "date": datetime.date.today().isoformat(), "machine": machine(), "model": model,
           "command": f"make bench BENCH={plan_name}", "contenders": []}
    rounds = ROUNDS[plan_name]
    for mode, (steps, warmup) in PLANS[plan_name].items():
        runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
        for rnd in range(rounds):
            for name in (CONTENDERS if rnd % 2 == 0 else CONTENDERS[::-1]):
                print(f"bench: {name} {mode} ({steps} steps, round {rnd + 1} of {rounds})", flush=True)
                runs[name].append(child(["bench/contenders.py", name, mode, str(steps), str(warmup)], **env))
        res["contenders"] += [pool(runs[name]) | {"contender": name, "mode": mode} for name in CONTENDERS]
    for name, mode, overrides in VARIANTS[plan_name]:  # opt-in settings; start-up includes compile time
        steps, warmup = PLANS[plan_name][mode]
        print(f"bench: {name} {mode} ({steps} steps)", flush=True)
        r = child(["bench/contenders.py", "tunelab", mode, str(steps), str(warmup + 1), *overrides], **env)
        res["contenders"].append(r | {"contender": name, "mode": mode})
    tokens = 860 if not env else round(next((r["tokens_per_step"] for r in res["contenders"]
                                             if r.get("contender") == "tunelab" and "error" not in r), 4096))
    res["ceiling"] = ceiling(model_dir, tokens=tokens)
    add_flops(res, model_dir, res["ceiling"], res["machine"]["native_bf16"])
    print("bench: profile, eval speed, start-up", flush=True)
    if not env:  # the profile and eval-speed scripts time the built-in model on CPU
        res["profile"] = child(["bench/profile_step.py"])
        res["eval_speed"] = child(["-c", "import sys, json; sys.path.insert(0, 'bench'); "
                                         "from evalspeed import eval_speed; print(json.dumps(eval_speed()))"])
    res["startup"] = startup(str(model_dir) if env else "smollm2-135m")
    res["bench_seconds"] = time.perf_counter() - started
    out = result_stem(res)
    out.parent.mkdir(exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    if failed := failures(res):  # the results file keeps the failure; the docs table is not replaced
        print(md)
        raise SystemExit("bench: failed contenders (results in " + str(out.with_suffix(".json")) + "):\n  " +
                         "\n  ".join(failed))
    if not_its_class(res):
        print(f"bench: precision forced or ISA limited: results in {out.with_suffix('.json')} only, "
              "no docs table replaced", flush=True)
    else:
        write_docs(md, HERE.parent / "docs" / "results" / "performance.md", section_for(res))
    print(md)
    return out


def section_for(res: dict) -> str:
    """The docs section of a run's machine class: one table per class (fp32-only CPU, bf16 CPU
    without AMX, AMX CPU, GPU), each from one run."""
    return {"gpu": "bench-gpu", "amx": "bench-amx", "bf16": "bench-bf16"}.get(res["machine"]["machine_class"], "bench")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("BENCH", "quick"))
