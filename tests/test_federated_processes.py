"""Federated runs as real processes on localhost (a Flower SuperLink and two SuperNodes started by
`tunelab federate`, each bounded in time). In the default suite: a run in the paper's setting
(K = 4096 seeds, 200 local steps) whose measured messages stay under 18 KB per client per round and
whose parties agree bit for bit. Marked slow (they wait out a round timeout or start the
federation twice, about a minute or two each): a client killed mid-run leaves the round to the
other and nothing is lost; a server killed after a round resumes from its checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tiny import chat_rows

pytest.importorskip("flwr", reason="needs the federated extra: pip install 'tunelab[federated]'")
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 420


def _config(tmp_path, tiny_dir, **fed) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(24)))
    cfg = {"model": {"name": str(tiny_dir)}, "data": {"train": str(data), "eval": "holdout", "max_length": 64},
           "method": {"name": "full"}, "train": {"micro_batch_size": 2, "lr": 1e-4, "precision": "fp32"},
           "eval": {"num_examples": 2, "max_new_tokens": 2, "batch_size": 2}, "diagnostics": {"after_train": []},
           "federated": {"algorithm": "fedkseed", "num_clients": 2, "rounds": 3, "local_steps": 2, "num_seeds": 32,
                         "round_timeout": 40, **fed},
           "output": str(tmp_path / "run")}
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _federate(path: Path, pause_at: str = "") -> subprocess.Popen:
    """`tunelab federate path`; pause_at names the hook points (tunelab/run/signals.py) where a
    party waits to be killed, so a kill lands where the test says whatever the machine's speed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TUNELAB_TEST_PAUSE_AT=pause_at)
    return subprocess.Popen([sys.executable, "-m", "tunelab", "federate", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(cond, proc, timeout=TIMEOUT):
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.5)


def _finish(proc, timeout=TIMEOUT) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return out


def _rounds(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"round"' in x]


def _server_state(run: Path):
    from tunelab.federated.party import read_state
    from tunelab.federated.server import checkpoints
    return read_state(checkpoints(run)[-1])


def _replayed(run: Path, upto: int):
    from tunelab import config as C
    from tunelab.federated import kseed as K
    from tunelab.federated.party import build

    cfg = C.load(run / "config.yaml")
    arrays, _ = _server_state(run)
    built = build(cfg)
    for delta in arrays["deltas"][:upto]:
        K.replay_round(built.params(), arrays["seeds"], delta, cfg.train.lr)
    return built.named()


def _paused(log: Path, point: str):
    """A condition for _wait_for: the party whose output goes to `log` has stopped at `point`."""
    return lambda: log.exists() and f"TUNELAB_PAUSED {point}" in log.read_text(errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_run_in_the_papers_setting_measures_under_18_kilobytes_and_every_party_agrees(tmp_path, tiny_dir):
    """Two real clients, two rounds of K = 4096 seeds and tau = 200 ZO steps. Round 2 is the steady
    state (round 1 also carries the candidate seeds, once per node, counted apart): the bytes
    measured on the messages that travelled are the K fp32 scalars down and 200 (index, scalar)
    pairs up plus the scalars riding along, under 18 KB (the arrays alone under 18,000 B); Flower's
    own encoding is recorded next to it. Both clients' caches equal the server's replay bit for bit."""
    from tunelab.federated import kseed as K
    run = tmp_path / "run"
    proc = _federate(_config(tmp_path, tiny_dir, rounds=2, local_steps=200, num_seeds=4096, round_timeout=120))
    out = _finish(proc)
    assert proc.returncode == 0, out
    first, steady = _rounds(run)
    assert first["clients"] == steady["clients"] == 2 and first["seed_bytes"] == 2 * 4096 * 8 and steady["seed_bytes"] == 0
    arrays = K.message_bytes(4096, 200, pro=False)["total"]
    assert arrays < 18_000
    assert steady["bytes_per_client"] == arrays + 8 * (2 + 4) < 18 * 1024  # round, first_round / examples, synced, loss, partition
    assert arrays < steady["encoded_bytes_per_client"] < arrays + 4096  # Flower's headers: small, but there
    from safetensors.numpy import load_file
    server = _replayed(run, 1)
    for c in ("0", "1"):  # each client replayed round 1 before its round-2 steps: the server's weights
        assert json.loads((run / "clients" / c / "global" / "state.json").read_text())["round"] == 1
        cached = load_file(str(run / "clients" / c / "global" / "state.safetensors"))
        assert all(np.array_equal(cached[n], p.detach().numpy()) for n, p in server.items())
    from tunelab.training.final import load_trained
    _, model, _, _ = load_trained(run)
    final = dict(model.named_parameters())
    assert all(torch.equal(final[n], p) for n, p in _replayed(run, 2).items() if n in final)
    assert "after" in json.loads((run / "eval.json").read_text())
    from tunelab.report.run_page import write_report
    page = write_report(run).read_text()  # the report reads a federated run too
    assert 'data-key="federated_rounds">2 / 2<' in page and f'data-value="{steady["bytes_per_client"]}"' in page


@pytest.mark.slow
def test_a_client_killed_mid_round_leaves_the_round_to_the_other(tmp_path, tiny_dir):
    run = tmp_path / "run"
    proc = _federate(_config(tmp_path, tiny_dir), pause_at="client-1:round-2")
    # client 1 caches the global weights at the start of round 2's work, then waits there (the
    # pause point) without replying: it is mid-round when killed, however fast the machine
    _wait_for(_paused(run / "flower" / "supernode-1.log", "client-1:round-2"), proc)
    assert json.loads((run / "clients" / "1" / "global" / "state.json").read_text())["round"] == 1
    _kill_group(json.loads((run / "flower" / "pids.json").read_text())["supernodes"][1])
    out = _finish(proc)
    assert proc.returncode == 0, out
    rounds = _rounds(run)
    assert [r["step"] for r in rounds] == [1, 2, 3]  # every round completed, none twice
    assert rounds[0]["clients"] == 2 and rounds[-1]["clients"] == 1 and sum(r["missing"] for r in rounds) >= 1
    # nothing lost: the surviving client's cache (round 2) is the server's replay of rounds 1-2, bit for bit
    from safetensors.numpy import load_file
    cached = load_file(str(run / "clients" / "0" / "global" / "state.safetensors"))
    assert json.loads((run / "clients" / "0" / "global" / "state.json").read_text())["round"] == 2
    server = _replayed(run, 2)
    assert all(np.array_equal(cached[n], p.detach().numpy()) for n, p in server.items())
    assert (run / "final" / "tunelab.json").exists() and "after" in json.loads((run / "eval.json").read_text())


@pytest.mark.slow
def test_a_server_killed_after_a_round_resumes_from_its_checkpoint(tmp_path, tiny_dir):
    run, path = tmp_path / "run", _config(tmp_path, tiny_dir, rounds=2)
    proc = _federate(path, pause_at="server:round-1")  # the server waits after round 1's checkpoint
    _wait_for(_paused(run / "flower" / "run.log", "server:round-1"), proc)
    assert (run / "federated" / "round-1").is_dir() and not (run / "federated" / "round-2").exists()
    first = _server_state(run)[0]["deltas"].copy()
    _kill_group(json.loads((run / "flower" / "pids.json").read_text())["superlink"])  # the server side dies
    out = _finish(proc)
    assert proc.returncode != 0 and "run the same command again to resume" in out
    proc = _federate(path)
    out = _finish(proc)
    assert proc.returncode == 0, out
    flower_log = (run / "flower" / "run.log").read_text()  # what the ServerApp printed
    assert "resuming" in flower_log and "after round 1" in flower_log
    assert [r["step"] for r in _rounds(run)] == [1, 2]
    arrays, meta = _server_state(run)
    assert meta["round"] == 2 and np.array_equal(arrays["deltas"][0], first[0])  # round 1 kept as it was
    from tunelab.training.final import load_trained
    _, model, _, _ = load_trained(run)
    final = dict(model.named_parameters())
    assert all(torch.equal(final[n], p) for n, p in _replayed(run, 2).items() if n in final)
