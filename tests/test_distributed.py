"""Training on several processes (torch.distributed, gloo, CPU): 2 processes with micro-batch m
train exactly as 1 process with micro-batch 2m, for every parallel mode and kind of method, and
for objectives besides SFT; checkpoints resume on another number of processes and after a
kill -9 of one rank; final/ is written once and loads as a one-process run's does.

Tolerance: the two runs sum the same per-token losses and gradients in another order (two
half-batches and an all-reduce instead of one batch), so fp32 rounding differs: losses and final
weights agree to 1e-5 absolute (observed: a few 1e-7).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tiny import chat_rows, save_tiny_model_dir

TOL = 1e-5
NPROC, MICRO = 2, 2
ROOT = Path(__file__).resolve().parent.parent

# (id, method, objective): one row per kind the issue names; train.parallel is the method's own choice
CASES = [
    ("full-fsdp", {"name": "full"}, {"name": "sft"}),
    ("full-ddp", {"name": "full"}, {"name": "sft"}),
    ("lora", {"name": "lora", "r": 4, "alpha": 8}, {"name": "sft"}),
    ("dsee", {"name": "dsee", "r": 2, "alpha": 4, "num_sparse": 16, "sparse_method": "random"}, {"name": "sft"}),
    ("prompt_tuning", {"name": "prompt_tuning", "num_virtual_tokens": 4}, {"name": "sft"}),
    ("adapter", {"name": "adapter", "bottleneck": 8}, {"name": "sft"}),
    ("caft", {"name": "lora", "r": 4, "alpha": 8}, {"name": "caft", "num_heads": 2, "coef": 0.5}),
    ("tl_weighting", {"name": "lora", "r": 4, "alpha": 8}, {"name": "tl_weighting", "key_patterns": [r"\d+"]}),
]
PARALLEL = {"full-ddp": "ddp"}
WITH_EVAL = {"full-fsdp"}  # evaluation and a diagnostic on rank 0 need the sharded model gathered
STEPS = 4


def env() -> dict:
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def torchrun(*args, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}", *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, **kw)


def config(lab: Path, case: str, method: dict, objective: dict, out: Path, micro: int, **train) -> dict:
    return {"model": {"name": str(lab / "model")},
            "data": {"train": str(lab / "train.jsonl"), "max_length": 64,
                     "eval": str(lab / "train.jsonl") if case in WITH_EVAL else None},
            "method": method, "objective": objective,
            "train": {"steps": STEPS, "micro_batch_size": micro, "grad_accum": 2, "lr": 5e-3, "warmup_steps": 1,
                      "save_every": 1, "keep_checkpoints": 10, "precision": "fp32", "device": "cpu",
                      "progress": False, "parallel": PARALLEL.get(case, "auto"), **train},
            "eval": {"before": True, "num_examples": 2, "max_new_tokens": 4, "batch_size": 2} if case in WITH_EVAL
            else {"before": False}, "diagnostics": {"after_train": ["intruder"] if case in WITH_EVAL else []},
            "output": str(out)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process runs use one thread, as each torchrun rank does (OMP_NUM_THREADS=1): a tiny
    model gains nothing from a second one, and on a busy machine a team of two waits at every op
    for whichever of them is not scheduled."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """Every case trained on 2 processes (one torchrun launch) and on 1 with twice the micro-batch."""
    lab = tmp_path_factory.mktemp("dist")
    save_tiny_model_dir(lab / "model")
    (lab / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(24)))
    many = [config(lab, c, m, o, lab / "many" / c, MICRO) for c, m, o in CASES]
    (lab / "cases.json").write_text(json.dumps(many))
    done = torchrun(str(ROOT / "tests" / "dist_driver.py"), str(lab / "cases.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    (lab / "torchrun.out").write_text(done.stdout)
    for c, m, o in CASES:
        tunelab.train(config(lab, c, m, o, lab / "one" / c, MICRO * NPROC))
    return lab


def losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"]


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "final").glob("*.safetensors")):
        out |= {f"{f.name}:{k}": v for k, v in load_file(str(f)).items()}
    return out


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == STEPS and max(abs(x - y) for x, y in zip(la, lb)) < TOL, (la, lb)
    wa, wb = final_tensors(a), final_tensors(b)
    assert wa.keys() == wb.keys() and wa
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst < TOL, worst


@pytest.mark.parametrize("case", [c for c, _, _ in CASES])
def test_two_processes_train_as_one_with_twice_the_micro_batch(lab, case):
    many, one = lab / "many" / case, lab / "one" / case
    assert_same_run(many, one)
    assert sorted(p.name for p in (many / "final").iterdir()) == sorted(p.name for p in (one / "final").iterdir())
    lines = [json.loads(x) for x in (many / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(STEPS + 1))  # one writer: no line twice
    expected = PARALLEL.get(case, "fsdp" if case.startswith("full") else "ddp")
    assert (lines[0]["processes"], lines[0]["parallel"]) == (NPROC, expected)


def test_the_comparison_can_fail(lab):
    """Runs that differ (another method) are told apart: the check is not vacuous."""
    with pytest.raises(AssertionError):
        assert_same_run(lab / "many" / "lora", lab / "one" / "dsee")


def test_evaluation_and_diagnostics_run_once_on_the_gathered_model(lab):
    """A sharded run evaluates and diagnoses once (rank 0, on the gathered weights): both ranks'
    output holds each line once, and eval.json and the diagnostic match one process's."""
    printed = (lab / "torchrun.out").read_text()
    assert [printed.count(x) for x in ("eval before:", "eval after:", "diagnostics: intruder")] == [1, 1, 1]
    assert printed.count("report: ") == len(CASES)
    many, one = (json.loads((lab / d / "full-fsdp" / "eval.json").read_text()) for d in ("many", "one"))
    assert many.keys() == one.keys() == {"before", "after"}
    for when in many:
        assert abs(many[when]["eval_loss"] - one[when]["eval_loss"]) < TOL
        assert many[when]["accuracy"] == one[when]["accuracy"]
    many, one = (json.loads((lab / d / "full-fsdp" / "diagnostics" / "intruder.json").read_text())["summary"]
                 for d in ("many", "one"))
    assert many == one and many["matrices_changed"] > 0


def test_what_cannot_run_on_several_processes_says_so_before_training(tiny_dir):
    from tunelab.errors import ConfigError
    from tunelab.registry import METHODS, OBJECTIVES
    from tunelab.run.dist import Dist
    from tunelab.training.parallel import choose

    two, cpu = Dist(rank=0, world_size=2, active=True), torch.device("cpu")
    sft, caft = OBJECTIVES.get("sft")(), OBJECTIVES.get("caft")()
    caft.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2)])  # as after setup
    for name in ("spiel", "lt_sft", "hft", "greentrainer"):
        with pytest.raises(ConfigError, match=f"'{name}' cannot train on several processes"):
            choose(two, cpu, "auto", METHODS.get(name)(), sft)
    with pytest.raises(ConfigError, match="supports ddp, not fsdp"):
        choose(two, cpu, "fsdp", METHODS.get("lora")(), sft)
    with pytest.raises(ConfigError, match="fsdp does not shard the modules objective 'caft'"):
        choose(two, cpu, "fsdp", METHODS.get("full")(), caft)
    assert choose(two, cpu, "auto", METHODS.get("full")(), caft).name == "ddp"
    assert choose(two, cpu, "auto", METHODS.get("full")(), sft).name == "fsdp"
    assert choose(Dist(), cpu, "fsdp", METHODS.get("spiel")(), sft).name == "none"  # one process: no choice


def test_checkpoints_of_many_processes_are_sharded_and_verified(lab):
    from tunelab.run.files import verify

    ckpt = lab / "many" / "full-fsdp" / "checkpoints" / "step-2"
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) == NPROC and verify(ckpt) is None
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-0.safetensors", "rank-1.safetensors"]
    assert json.loads((ckpt / "state.json").read_text())["global_batch"] == MICRO * 2 * NPROC


def test_final_output_loads_like_a_one_process_run(lab):
    """LoRA's final/ is a PEFT adapter and full's an HF model directory, as on one process."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(lab / "model")
    PeftModel.from_pretrained(base, lab / "many" / "lora" / "final")
    AutoModelForCausalLM.from_pretrained(lab / "many" / "full-fsdp" / "final")
    cfg, model, tok, method = tunelab.load_run(lab / "many" / "adapter")
    assert method.name == "adapter"


def cut(run: Path, to: Path, step: int) -> Path:
    """`run` as a crash after its step-`step` checkpoint leaves it."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "final")
    for c in (to / "checkpoints").iterdir():
        if int(c.name.split("-")[1]) > step:
            shutil.rmtree(c)
    lines = (to / "metrics.jsonl").read_text().splitlines()
    (to / "metrics.jsonl").write_text("\n".join(lines[:step + 1]) + "\n")
    return to


@pytest.mark.parametrize("case", ["full-fsdp", "lora"])
def test_resume_on_one_process_continues_a_run_of_two(lab, tmp_path, case):
    run = cut(lab / "many" / case, tmp_path / "run", step=2)
    tunelab.train(str(run))
    assert_same_run(run, lab / "many" / case)


def test_resume_on_two_processes_continues_a_run_of_one(lab, tmp_path):
    runs = [cut(lab / "one" / c, tmp_path / c, step=2) for c in ("full-fsdp", "lora")]
    done = torchrun(str(ROOT / "tests" / "dist_driver.py"), str(_as_list(tmp_path, runs)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming on 2 processes (was 1)" in done.stdout
    for run, c in zip(runs, ("full-fsdp", "lora")):
        assert_same_run(run, lab / "one" / c)


def _as_list(tmp_path: Path, runs: list[Path]) -> Path:
    path = tmp_path / "resume.json"
    path.write_text(json.dumps([str(r) for r in runs]))
    return path


def test_kill9_of_one_rank_then_resume_gives_the_same_run(lab, tmp_path):
    """SIGKILL one rank while both wait inside step 3 (before its update); torchrun ends the other;
    `tunelab train RUN --nproc 2` resumes from the step-2 checkpoint to the uninterrupted result."""
    case, method, objective = CASES[2]
    cfg = tmp_path / "run.yaml"
    run = tmp_path / "run"
    cfg.write_text(json.dumps(config(lab, case, method, objective, run, MICRO)))
    cmd = [sys.executable, "-m", "tunelab", "train", str(cfg), "--nproc", str(NPROC)]
    proc = subprocess.Popen(cmd, env=env() | {"TUNELAB_TEST_PAUSE_AT": "step:3"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    victim = _paused_rank(run, deadline=time.monotonic() + 120)
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (run / "final").exists()
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", str(run), "--nproc", str(NPROC)],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run, lab / "many" / case)


def _paused_rank(run: Path, deadline: float) -> int:
    """The pid of rank 1 once step-2's checkpoint exists and both ranks are paused in step 3."""
    while time.monotonic() < deadline:
        if (run / "checkpoints" / "step-2").exists():
            pids = subprocess.run(["pgrep", "-f", f"tunelab train {run.parent / 'run.yaml'}"],
                                  capture_output=True, text=True).stdout.split()
            ranks = {int(open(f"/proc/{p}/environ", "rb").read().split(b"RANK=")[1].split(b"\0")[0]): int(p)
                     for p in pids if b"\0RANK=" in open(f"/proc/{p}/environ", "rb").read()}
            if 1 in ranks:
                return ranks[1]
        time.sleep(0.2)
    raise AssertionError("rank 1 never reached step 3")


@pytest.mark.parametrize("world, packing", [(2, True), (3, False)])
def test_each_rank_takes_its_share_of_what_one_process_would_take(world, packing):
    """Rank r's micro-batch is the r-th slice of the one-process micro-batch of world * m examples,
    packed on its own; positions stay equal, so any world size resumes from them."""
    from tiny import random_examples
    from tunelab.training.batches import BatchStream

    exs, m = random_examples(7), 2
    one = BatchStream(exs, m * world, seed=3, packing=packing, pad_id=0)
    ranks = [BatchStream(exs, m, seed=3, packing=packing, pad_id=0, rank=r, world_size=world) for r in range(world)]
    for _ in range(5):  # crosses epoch boundaries
        whole = next(one)
        parts = [next(s) for s in ranks]
        rows = [row[row != -100].tolist() for row in whole["targets"]]
        shares = [row[row != -100].tolist() for p in parts for row in p["targets"]]
        if packing:  # rows hold several examples: the same tokens, each rank packing its own
            assert sorted(sum(rows, [])) == sorted(sum(shares, []))
        else:  # one example per row: rank r holds rows r*m .. r*m+m-1, in order
            assert rows == shares
        assert all(s.state() == one.state() for s in ranks)


def test_train_takes_overrides_on_either_side_of_nproc():
    from tunelab.cli import parse

    a = parse(["train", "x.yaml", "a.b=1", "--nproc", "2", "train.steps=5"])
    assert (a.config, a.overrides, a.nproc) == ("x.yaml", ["a.b=1", "train.steps=5"], 2)
    with pytest.raises(SystemExit):
        parse(["train", "x.yaml", "--nproc", "2", "--bogus"])
