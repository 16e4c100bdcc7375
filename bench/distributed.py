"""More than one process on this machine: what a step costs on 2 ranks against 1, and what each
rank holds in memory with FSDP2 full fine-tuning against one process. Built-in SmolLM2-135M.

    python bench/distributed.py            # every case; bench/results/distributed-<cpu>-<date>.json + a table
    python bench/distributed.py --only full-fsdp-2,full-1x8

Each case is one fresh process group (torchrun for 2 ranks, a plain process for 1) that builds the
run with tunelab's own loop (`training.loop.build`) and times `train_step`, the function the loop
calls, for `--steps` steps after `--warmup`. Memory is each rank's resident-set high-water mark over
the timed steps only (Linux: /proc/self/clear_refs resets it after the build, so loading the model,
which every rank does in full before sharding, is not counted), and its resident size at the end.
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
# name -> (processes, train.parallel, method, micro-batch per process)
CASES = {
    "full-1x8": (1, "auto", "full", 8),
    "full-1x4": (1, "auto", "full", 4),
    "full-fsdp-2": (2, "fsdp", "full", 4),
    "full-ddp-2": (2, "ddp", "full", 4),
    "lora-1x8": (1, "auto", "lora", 8),
    "lora-ddp-2": (2, "ddp", "lora", 4),
}


def run_config(method: str, micro: int, nproc: int, parallel: str, out: str, steps: int) -> dict:
    return {"model": {"name": "smollm2-135m"},
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


def state_bytes(model, optimizer) -> int:
    """Parameters (trained or not, with their gradients) and optimizer state held by this process."""
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    moments = [v for st in optimizer.state.values() for v in st.values() if hasattr(v, "numel") and v.ndim]
    return sum(local_bytes(t) for t in params + grads + moments)


def worker(spec: dict) -> None:
    """One case, in this process (one rank of it under torchrun)."""
    import ctypes
    import gc
    import time

    import torch

    from tunelab import config as C
    from tunelab.run.context import StepContext
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
            "state_mb": state_bytes(run.state.model, run.state.optimizer) / 2**20, "threads": torch.get_num_threads()}
    ranks = dist.gather(mine)
    if dist.is_main:
        Path(spec["result"]).write_text(json.dumps({"step_s": times, "losses": losses, "ranks": ranks,
                                                    "parallel": run.parallel.name}))


def measure(name: str, steps: int, warmup: int, tmp: Path) -> dict:
    nproc, parallel, method, micro = CASES[name]
    spec = {"config": run_config(method, micro, nproc, parallel, str(tmp / name), steps),
            "result": str(tmp / f"{name}.json")}
    (tmp / f"{name}.spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__)), "--worker", str(tmp / f"{name}.spec.json")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    load_before = os.getloadavg()
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-6000:]}")
    out = json.loads((tmp / f"{name}.json").read_text())
    timed = sorted(out["step_s"][warmup:])
    return {"case": name, "processes": nproc, "parallel": out["parallel"], "method": method,
            "micro_batch_per_process": micro, "examples_per_step": BATCH, "omp_threads_per_process": int(threads),
            "median_step_s": timed[len(timed) // 2], "step_s": [round(x, 3) for x in out["step_s"]],
            "losses": [round(x, 5) for x in out["losses"]], "ranks": out["ranks"],
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


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
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(Path(a.worker).read_text()))
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(name, a.steps, a.warmup, Path(tmp)) for name in a.only.split(",")]
    info = cpu()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = ROOT / "bench" / "results" / f"distributed-cpu{info['cpus']}-{stamp}.json"
    out.write_text(json.dumps({"what": __doc__.strip().splitlines()[0], "cpu": info, "torch": torch.__version__,
                               "shared_machine": True, "steps": a.steps, "warmup": a.warmup,
                               "results": results}, indent=1))
    print(table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
