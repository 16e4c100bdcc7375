"""Faults injected into real tiny training runs: SIGKILL anywhere, non-finite steps, Ctrl-C /
SIGTERM, two processes on one run, secrets in the environment (checkpoint damage and storage faults
are in tests/test_faults_storage.py; both use the `lab` of tests/conftest.py). Runs are real processes (tests/forkserver.py: forked from one interpreter that has
imported torch, so each costs ~1 s, not ~10 s); nothing that is tested is mocked. Each test
prints its figures as `[reliability] ...` lines (pytest -s), quoted in docs/reliability.md; set
TUNELAB_RELIABILITY_LOG=FILE to also collect them in a file."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from faultlab import PAUSE, STEPS, argv_for, differences, report, timeline, write_jsonl
from tiny import chat_rows
from tunelab.run.files import verify
from tunelab.training.checkpoint import list_checkpoints


# ----------------------------------------------------------------------------- 1. kill -9

def kill_at_point(lab, run: Path, point: str) -> bool:
    child = lab.fs.spawn(argv_for(lab, run), env={PAUSE: point})
    if not child.wait_paused(point):
        assert child.rc == 0, child.stderr()
        return False  # this resume no longer passes that point (e.g. its prune already happened)
    child.signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    return True


def kill_after(lab, run: Path, delay: float) -> bool:
    child = lab.fs.spawn(argv_for(lab, run))
    time.sleep(delay)
    if child.wait(timeout=0) is None:
        child.signal(signal.SIGKILL)
    rc = child.wait()
    assert rc in (0, -signal.SIGKILL), child.stderr()
    return rc == -signal.SIGKILL


def finish(lab, run: Path) -> None:
    done = lab.fs.run(argv_for(lab, run))
    assert done.rc == 0, done.stderr()


def timed_reference(lab) -> float:
    """Seconds one uninterrupted child takes on this machine, now (random kill times are fractions of
    it, so the test holds on a machine 3x faster or slower, or a loaded one)."""
    run = lab.root / "kill-timing"
    t0 = time.monotonic()
    finish(lab, run)
    elapsed = time.monotonic() - t0
    assert not differences(run, lab.outcome)
    return elapsed


def done_fraction(run: Path) -> float:
    """The share of the run's steps its newest valid checkpoint holds (0 when none)."""
    found = list_checkpoints(run / "checkpoints") if (run / "checkpoints").is_dir() else []
    return int(found[-1].name.split("-")[1]) / STEPS if found else 0.0


def random_kill_chains(lab, rnd: random.Random, kills: int, ref_s: float) -> tuple[int, int]:
    """SIGKILL children at random times until `kills` have landed: each child resumes its chain, is
    killed at a uniform fraction of the time the rest of the run should take, and a chain that
    finishes before its kill is checked against the reference and a new one begins. Returns (landed,
    chains checked identical)."""
    landed = chains = attempts = 0
    run = lab.root / "kill-random-0"
    while landed < kills:
        attempts += 1
        assert attempts <= 10 * kills, f"only {landed} of {kills} random kills landed in {attempts - 1} tries"
        remaining = ref_s * max(1.0 - done_fraction(run), 0.1)
        if kill_after(lab, run, rnd.uniform(0.02, 0.95) * remaining):
            landed += 1
            continue
        assert not differences(run, lab.outcome)  # the child finished first: its chain is complete
        chains += 1
        run = lab.root / f"kill-random-{chains}"
    finish(lab, run)
    assert not differences(run, lab.outcome)
    return landed, chains + 1


def test_kill9_anywhere_resumes_to_identical_result(lab):
    """SIGKILL at seeded points across the whole timeline (inside steps, evaluations, checkpoint
    writes, renames, prunes and the final save), reached by events (the child pauses there), and at
    seeded random times scaled to this machine's measured speed; each chain of kills and resumes
    ends with the reference's weights, loss curve and evaluations, bitwise."""
    rnd = random.Random(1234)
    points = timeline()
    named = 0
    plans = [sorted(rnd.sample(range(len(points)), 8)) for _ in range(2)]
    for i, plan in enumerate(plans):
        run = lab.root / f"kill-points-{i}"
        landed = sum(kill_at_point(lab, run, points[j]) for j in plan)
        finish(lab, run)
        diffs = differences(run, lab.outcome)
        assert not diffs, (plan, diffs)
        named += landed
    random_landed, chains = random_kill_chains(lab, rnd, kills=6, ref_s=timed_reference(lab))
    report("kill -9", kill_points_tried=named + random_landed, survived_identical=named + random_landed,
           named_points=len(points), chains=2 + chains)
    # event-driven kills are machine-independent (a point would be skipped only when a resumed run
    # no longer passes it, e.g. its prune already happened); these two seeded plans land all 16
    assert named == 16 and random_landed == 6


def test_kill9_of_the_console_script(lab):
    """The same, once, for `python -m tunelab train ...` started from scratch (no fork server):
    killed while its step-3 checkpoint is being renamed into place, then resumed."""
    run = lab.root / "kill-cli"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{PAUSE: "manifest:step-3"})
    err = lab.root / "kill-cli.err"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(lab.cfg), f"output={run}"],
                                env=env, stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.monotonic() + 240
        while "TUNELAB_PAUSED manifest:step-3" not in err.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step-1", "step-2"]
    finish(lab, run)
    assert not differences(run, lab.outcome)


# ----------------------------------------------------------------------------- 2. non-finite steps

@pytest.fixture(scope="module")
def poisoned(lab):
    """An untied tiny model whose embedding of '@' is inf, and data where exactly the rows seen at
    steps 3, 4 and 5 contain '@': those steps compute a NaN loss for real."""
    from tiny import tiny_model, tiny_tokenizer

    from tunelab.data.records import Example, Record
    from tunelab.data.render import encode_one
    from tunelab.training.batches import BatchStream

    root = lab.root / "nan"
    model, tok = tiny_model(tie_word_embeddings=False), tiny_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    clean, bad = chat_rows(12, seed=3), chat_rows(12, seed=3, poison=" @")
    def ids(rows):
        return {t for r in rows for t in encode_one(Record(messages=r["messages"]), tok).input_ids}
    poison_ids = sorted(ids(bad) - ids(clean))
    assert poison_ids, "the poison character must have a token of its own"
    weights = load_file(str(root / "model" / "model.safetensors"))
    weights["model.embed_tokens.weight"][poison_ids] = float("inf")
    save_file(weights, str(root / "model" / "model.safetensors"), metadata={"format": "pt"})
    stream = BatchStream([Example([i, i], [i, i]) for i in range(12)], 1, seed=0, packing=False, pad_id=0)
    order = [int(next(stream)["input_ids"][0, 0]) for _ in range(12)]  # the row trained at each step
    rows = [bad[i] if i in order[2:5] else clean[i] for i in range(12)]
    data = write_jsonl(root / "train.jsonl", rows)
    cfg = root / "nan.yaml"
    cfg.write_text(f"model: {{name: {root / 'model'}}}\ndata: {{train: {data}, eval: null, packing: false}}\n"
                   "method: {name: lora, r: 4}\ntrain: {steps: 8, micro_batch_size: 1, lr: 1.0e-2, save_every: 1,"
                   " keep_checkpoints: 3, max_bad_steps: 3, precision: fp32, device: cpu, progress: false}\n"
                   "diagnostics: {after_train: []}\n")
    return cfg


def test_non_finite_steps_are_skipped_then_stop_and_resume(lab, poisoned):
    run = lab.root / "nan-run"
    stopped = lab.fs.run(["train", str(poisoned), f"output={run}"])
    err = stopped.stderr()
    assert stopped.rc == 2 and "Traceback" not in err
    assert all(f"warning: step {s}: non-finite loss" in err for s in (3, 4, 5))
    assert "3 steps in a row had a non-finite loss or gradient (last at step 5)" in err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "skipped"] == [3, 4, 5]
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step-1", "step-2"]
    assert all(verify(c) is None for c in list_checkpoints(run / "checkpoints"))
    # the last good checkpoint resumes; with a higher limit the bad steps are skipped and the run
    # ends exactly where one that never stopped ends
    resumed = lab.fs.run(["train", str(run), "train.max_bad_steps=10"])
    assert resumed.rc == 0 and "resuming" in resumed.stdout() and "from step-2" in resumed.stdout()
    straight = lab.fs.run(["train", str(poisoned), f"output={lab.root / 'nan-straight'}", "train.max_bad_steps=10"])
    assert straight.rc == 0
    a, b = (load_file(str(r / "final" / "adapter_model.safetensors")) for r in (run, lab.root / "nan-straight"))
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all() for k in a)
    report("non-finite steps", injected_bad_steps=3, skipped_and_logged=3, stopped_at="step 5",
           resumed_identical=True)


# ----------------------------------------------------------------------------- 3. Ctrl-C / SIGTERM

@pytest.mark.parametrize("sig, point, code", [(signal.SIGINT, "step:3", 130), (signal.SIGTERM, "eval:2", 143)])
def test_signal_checkpoints_at_the_step_boundary_and_resumes(lab, sig, point, code):
    """With no checkpoint due (save_every=0), a signal mid-step (or mid-evaluation) still leaves a
    checkpoint of the finished step, exits 130/143 saying how to resume, and the resumed run ends
    identical to the reference (checkpoint timing never changes the numbers)."""
    run = lab.root / f"signal-{sig.name}"
    child = lab.fs.spawn(["train", str(lab.cfg), f"output={run}", "train.save_every=0"], env={PAUSE: point})
    assert child.wait_paused(point)
    child.signal(sig)
    assert child.wait() == code, child.stderr()
    step = int(point.split(":")[1])
    assert f"interrupted at step {step}" in child.stderr() and f"resume with: tunelab train {run}" in child.stderr()
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == [f"step-{step}"]
    assert verify(run / "checkpoints" / f"step-{step}") is None
    done = lab.fs.run(["train", str(run)])
    assert done.rc == 0 and f"from step-{step}" in done.stdout()
    assert not differences(run, lab.outcome)


def test_second_ctrl_c_aborts_the_checkpoint_write_without_damage(lab):
    run = lab.root / "double-ctrl-c"
    child = lab.fs.spawn(["train", str(lab.cfg), f"output={run}", "train.save_every=0"],
                         env={PAUSE: "step:2,fill:step-2"})
    assert child.wait_paused("step:2")
    child.signal(signal.SIGINT)
    assert child.wait_paused("fill:step-2")  # the first Ctrl-C's checkpoint is being written
    child.signal(signal.SIGINT)
    assert child.wait() == 130
    assert "aborted" in child.stderr() and "Traceback" not in child.stderr()
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    finish(lab, run)
    assert not differences(run, lab.outcome)
    report("signals", sigint_exit=130, sigterm_exit=143, double_ctrl_c="aborted, nothing corrupt",
           resumed_identical=True)


def test_ctrl_c_during_the_final_evaluation_stops_at_once(lab):
    """After the last step there is no step boundary to wait for: Ctrl-C during the final
    evaluation aborts at once (not silently ignored), and the next start finishes the run."""
    run = lab.root / "ctrl-c-final-eval"
    point = f"eval:{STEPS}"
    child = lab.fs.spawn(["train", str(lab.cfg), f"output={run}"], env={PAUSE: point})
    assert child.wait_paused(point)
    child.signal(signal.SIGINT)
    assert child.wait() == 130, child.stderr()
    assert "aborted" in child.stderr() and f"resume with: tunelab train {run}" in child.stderr()
    assert not (run / "eval.json").exists() or "after" not in json.loads((run / "eval.json").read_text())
    finish(lab, run)
    assert not differences(run, lab.outcome)


# ----------------------------------------------------------------------------- 4. concurrent runs

def test_second_process_on_a_run_directory_is_refused(lab):
    run = lab.root / "locked"
    first = lab.fs.spawn(["train", str(lab.cfg), f"output={run}"], env={PAUSE: "step:2"})
    assert first.wait_paused("step:2")
    before = (run / "metrics.jsonl").read_bytes()
    second = subprocess.run([sys.executable, "-m", "tunelab", "train", str(run)], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"another tunelab process (pid {first.pid}) is using this run directory" in second.stderr
    assert (run / "metrics.jsonl").read_bytes() == before  # the refused process wrote nothing
    first.signal(signal.SIGKILL)
    first.wait()
    finish(lab, run)
    assert not differences(run, lab.outcome)


# ----------------------------------------------------------------------------- secrets

def test_no_secret_from_the_environment_reaches_the_run_directory(lab):
    secrets = {"HF_TOKEN": "hf_" + "Zq7" * 12, "HUGGING_FACE_HUB_TOKEN": "hub-token-5c1e9a77d",
               "WANDB_API_KEY": "wandb-key-0f4b2d9c83", "MY_SERVICE_SECRET": "svc-secret-b81a60e2",
               "DB_PASSWORD": "pw-7e21c4aa90"}
    run = lab.root / "secrets"
    # model.revision is a free string a user could paste a token into; a local model ignores it
    done = lab.fs.run(["train", str(lab.cfg), f"output={run}", f"model.revision={secrets['WANDB_API_KEY']}",
                       "diagnostics.after_train=null"], env=secrets)
    assert done.rc == 0, done.stderr()
    leaks = [(p, name) for p in [*run.rglob("*"), done.out, done.err] if p.is_file()
             for name, value in secrets.items() if value.encode() in p.read_bytes()]
    assert leaks == []
    assert "<redacted $WANDB_API_KEY>" in (run / "config.yaml").read_text()
    report("secrets", env_secrets=len(secrets), files_scanned=sum(p.is_file() for p in run.rglob("*")) + 2,
           leaks=len(leaks))
