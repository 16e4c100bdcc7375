"""More than one process on this machine: what a step costs on 2 ranks against 1, and what each
rank holds in memory with FSDP2 full fine-tuning against one process. Built-in SmolLM2-135M.

    python bench/distributed.py            # every case; bench/results/distributed-<cpu>-<date>.json + a table
    python bench/distributed.py --only full-fsdp-2,full-1x8
    python bench/distributed.py --rounds 2 --note "what else ran on the machine"

Each case is one fresh process group (torchrun for 2 ranks, a plain process for 1) that builds the
run with tunelab's own loop (`training.loop.build`) and times `train_step`, the function the loop
calls, for `--steps` steps (the first `--warmup` not counted; `--rounds` repeats every case, the order
reversed every other round). Memory is each rank's resident-set high-water mark over the steps only
(Linux: /proc/self/clear_refs resets it after the build, so loading the model, which every rank does
in full before sharding, is not counted), its resident size at the end, and what it holds of the
weights, gradients and optimizer state (a sharded tensor: its own shard).
Same global batch everywhere unless the case says otherwise: 8 examples of <= 256 tokens per step.
The machine's cores may be shared with other work: the JSON records the load average before and
after each case.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8
# name -> (processes, train.parallel, method, micro-batch per process, threads per process); threads
# None: the cores shared out among the processes, as `tunelab train --nproc` does. The -1t cases run
# one process on one thread: with 2 processes on 2 cores each has one, so these tell the cost of the
# distributed path from the effect of splitting the cores between processes instead of threads.
CASES = {
    "full-1x8": (1, "auto", "full", 8, None),
    "full-1x8-1t": (1, "auto", "full", 8, 1),
    "full-1x4": (1, "auto", "full", 4, None),
    "full-fsdp-2": (2, "fsdp", "full", 4, None),
    "full-ddp-2": (2, "ddp", "full", 4, None),
    "lora-1x8": (1, "auto", "lora", 8, None),
    "lora-1x8-1t": (1, "auto", "lora", 8, 1),
    "lora-ddp-2": (2, "ddp", "lora", 4, None),
}


def run_config(method: str, micro: int, nproc: int, parallel: str, out: str, steps: int, model: str) -> dict:
    return {"model": {"name": model},
            "data": {"train": "builtin:arith?n=2000&split=train", "eval": None, "max_length": 256},
            "method": {"name": method} if method == "full" else {"name": "lora", "r": 16, "alpha": 32},
            "train": {"steps": steps, "micro_batch_size": micro, "grad_accum": BATCH // (micro * nproc), "lr": 1e-4,
                      "precision": "auto", "parallel": parallel, "progress": False, "save_every": 0},
            "eval": {"before": False}, "diagnostics": {"after_train": []}, "output": out}


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def local_bytes(t) -> int:
    """Bytes this process holds of a tensor (its shard of a DTensor)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_mb(model, optimizer) -> dict:
    """What this process holds, in MB: parameters (trained or not), gradients (one per trained
    parameter while a step runs: the loop frees them after each step, so they are counted from the
    trained parameters) and optimizer state."""
    params = list(model.parameters())
    moments = [v for st in optimizer.state.values() for v in st.values() if hasattr(v, "numel") and v.ndim]
    parts = {"weights_mb": params, "grads_mb": [p for p in params if p.requires_grad], "optimizer_mb": moments}
    out = {k: sum(local_bytes(t) for t in ts) / 2**20 for k, ts in parts.items()}
    return out | {"state_mb": sum(out.values())}


def worker(spec: dict) -> None:
    """One case, in this process (one rank of it under torchrun)."""
    import ctypes
    import gc
    import time

    import torch

    from tunelab import config as C
    from tunelab.run.context import StepContext
    from tunelab.run.device import resolve_precision
    from tunelab.run.dist import join
    from tunelab.training.loop import build
    from tunelab.training.step import train_step

    cfg = C.load(None, [], base=spec["config"])
    dist = join(cfg.train.device)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    run = build(cfg, Path(cfg.output), dist)
    run.state.model.train()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return what loading freed (every case alike), then
    Path("/proc/self/clear_refs").write_text("5")  # count the high-water mark from here on
    times, losses = [], []
    for step in range(1, cfg.train.steps + 1):
        ctx = StepContext(step=step, total_steps=cfg.train.steps, num_micro_batches=run.state.grad_accum,
                          rank=dist.rank, world_size=dist.world_size)
        t0 = time.perf_counter()
        res = train_step(run.state, run.parallel, cfg.train, run.device, ctx)
        dist.barrier()
        times.append(time.perf_counter() - t0)
        losses.append(res.loss)
    mine = {"rank": dist.rank, "peak_rss_mb": status_kb("VmHWM") / 1024, "rss_mb": status_kb("VmRSS") / 1024,
            **state_mb(run.state.model, run.state.optimizer), "threads": torch.get_num_threads()}
    ranks = dist.gather(mine)
    if dist.is_main:
        precision = str(resolve_precision(cfg.train.precision, run.device))
        Path(spec["result"]).write_text(json.dumps({"step_s": times, "losses": losses, "ranks": ranks,
                                                    "parallel": run.parallel.name, "precision": precision}))


def measure(name: str, steps: int, tmp: Path, model: str) -> dict:
    """One round of case `name`: its own process group, fresh processes."""
    nproc, parallel, method, micro, threads = CASES[name]
    spec = {"config": run_config(method, micro, nproc, parallel, str(tmp / name), steps, model),
            "result": str(tmp / f"{name}.json")}
    (tmp / f"{name}.spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__)), "--worker", str(tmp / f"{name}.spec.json")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    load_before = os.getloadavg()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or threads_for(nproc)), PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-6000:]}")
    out = json.loads((tmp / f"{name}.json").read_text())
    return out | {"loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def threads_for(nproc: int) -> int:
    """Each process's share of the cores (as `tunelab train --nproc` gives it)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def summary(name: str, rounds: list[dict], warmup: int) -> dict:
    """A case over its rounds: the median of every timed step of every round; memory per rank
    from the round with the highest peak."""
    nproc, _, method, micro, threads = CASES[name]
    timed = sorted(t for r in rounds for t in r["step_s"][warmup:])
    worst = max(rounds, key=lambda r: max(x["peak_rss_mb"] for x in r["ranks"]))
    return {"case": name, "processes": nproc, "parallel": rounds[0]["parallel"], "method": method,
            "precision": rounds[0]["precision"], "micro_batch_per_process": micro, "examples_per_step": BATCH,
            "omp_threads_per_process": threads or threads_for(nproc), "median_step_s": timed[len(timed) // 2],
            "ranks": worst["ranks"],
            "rounds": [{"step_s": [round(x, 3) for x in r["step_s"]], "losses": [round(x, 5) for x in r["losses"]],
                        "ranks": r["ranks"], "loadavg_before": r["loadavg_before"], "loadavg_after": r["loadavg_after"]}
                       for r in rounds]}


def run_rounds(names: list[str], num_rounds: int, steps: int, tmp: Path, model: str) -> dict[str, list[dict]]:
    """Every case `num_rounds` times, the order reversed every other round, so that a shared
    machine's drifting load favours no case."""
    out = {n: [] for n in names}
    for i in range(num_rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            where = tmp / f"round-{i}"
            where.mkdir(exist_ok=True)
            out[name].append(measure(name, steps, where, model))
            print(f"round {i + 1}: {name} done", flush=True)
    return out


def overheads(results: list[dict]) -> list[dict]:
    """2 processes against 1 on the same examples per step: step time and memory per rank."""
    by = {r["case"]: r for r in results}
    pairs = [("full-fsdp-2", "full-1x8"), ("full-ddp-2", "full-1x8"), ("lora-ddp-2", "lora-1x8"),
             ("full-fsdp-2", "full-1x8-1t"), ("full-ddp-2", "full-1x8-1t"), ("lora-ddp-2", "lora-1x8-1t")]
    out = []
    for many, one in pairs:
        if many in by and one in by:
            a, b = by[many], by[one]
            worst = {k: max(x[k] for x in a["ranks"]) / b["ranks"][0][k] for k in ("state_mb", "peak_rss_mb")}
            out.append({"cases": [many, one], "step_time_ratio": a["median_step_s"] / b["median_step_s"],
                        "state_mb_per_rank_ratio": worst["state_mb"], "peak_rss_per_rank_ratio": worst["peak_rss_mb"]})
    return out


def cpu() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {"model": fields.get("Model name", "?").strip(), "cpus": os.cpu_count(),
            "flags": fields.get("Flags", "").split(), "lscpu": text}


def table(results: list[dict]) -> str:
    rows = ["| case | processes | parallel | micro-batch / process | median step (s) | peak RSS per rank (MB) "
            "| weights + grads + optimizer per rank (MB) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        peaks = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
        state = ", ".join(f"{x['state_mb']:.0f}" for x in r["ranks"])
        rows.append(f"| {r['case']} | {r['processes']} | {r['parallel']} | {r['micro_batch_per_process']} | "
                    f"{r['median_step_s']:.2f} | {peaks} | {state} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each case, the order reversed every other round")
    ap.add_argument("--model", default="smollm2-135m", help="model.name (a small local directory for a quick try)")
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran on the machine)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(Path(a.worker).read_text()))
    import torch

    names = a.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        rounds = run_rounds(names, a.rounds, a.steps, Path(tmp), a.model)
    results = [summary(n, rounds[n], a.warmup) for n in names]
    info = cpu()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = ROOT / "bench" / "results" / f"distributed-cpu{info['cpus']}-{stamp}.json"
    out.write_text(json.dumps({"what": __doc__.strip().splitlines()[0], "command": " ".join(sys.argv),
                               "cpu": info, "torch": torch.__version__, "shared_machine": True, "note": a.note,
                               "model": a.model, "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds,
                               "overheads": overheads(results), "results": results}, indent=1))
    print(table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
