"""A long comparison is resumable row by row: killed (SIGKILL) inside a row or between rows and run
again, `tunelab compare` continues where it stopped, never retrains a finished row, and writes the
table an uninterrupted comparison writes."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TIMING = re.compile(r"_s$|per_s|startup")


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    from tiny import save_tiny_model_dir

    root = tmp_path_factory.mktemp("cmpresume")
    tiny = save_tiny_model_dir(root / "tiny")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"#### {i + 1}"}]} for i in range(12)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = []
    for name, method in (("a", {"name": "lora", "r": 2}), ("b", {"name": "full"})):
        cfg = {"model": {"name": str(tiny)}, "data": {"train": str(root / "d.jsonl"), "eval": str(root / "d.jsonl"),
                                                      "max_length": 64},
               "method": method, "train": {"steps": 3, "micro_batch_size": 4, "lr": 5e-3, "save_every": 1,
                                           "precision": "fp32", "device": "cpu", "progress": False},
               "eval": {"num_examples": 2, "max_new_tokens": 3}, "diagnostics": {"after_train": ["intruder"]},
               "output": str(root / "unused")}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        out.append(root / f"{name}.yaml")
    return out


def compare(recipes, out: Path, pause: str | None = None) -> int:
    """Run `tunelab compare`; with `pause`, SIGKILL it at that pause point (and say it landed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if pause:
        env["TUNELAB_TEST_PAUSE_AT"] = pause
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "compare", *map(str, recipes), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("TUNELAB_PAUSED"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=600)
    return proc.returncode


def table(out: Path) -> dict:
    """compare.json without timings and directories: what must not depend on interruptions."""
    data = json.loads((out / "compare.json").read_text())
    return {"rows": [r for r in data["rows"] if not TIMING.search(r["figure"])], "curves": data["loss_curves"],
            "runs": [{k: v for k, v in r.items() if k != "dir" and not TIMING.search(k)} for r in data["runs"]]}


def test_a_killed_comparison_continues_row_by_row_to_the_same_table(recipes, tmp_path):
    assert compare(recipes, tmp_path / "whole") == 0
    out = tmp_path / "killed"
    assert compare(recipes, out, "step:2") == -signal.SIGKILL  # inside row a
    assert not (out / "runs/a/final").exists() and (out / "runs/a/checkpoints").is_dir()
    assert compare(recipes, out, "compare:b") == -signal.SIGKILL  # between rows: a finished, b not begun
    finished_a = (out / "runs/a/metrics.jsonl").read_bytes()
    assert (out / "runs/a/final").is_dir() and not (out / "runs/b").exists()
    assert compare(recipes, out, "step:2") == -signal.SIGKILL  # inside row b (a is not trained again)
    assert (out / "runs/b/checkpoints").is_dir() and not (out / "runs/b/final").exists()
    assert compare(recipes, out) == 0
    assert (out / "runs/a/metrics.jsonl").read_bytes() == finished_a, "a finished row was trained again"
    assert table(out) == table(tmp_path / "whole")


def test_a_table_over_kept_runs_without_weights_is_the_same_table(recipes, tmp_path):
    """bench/keep_runs.py keeps what compare reads of each finished run (no weights), so a table made
    over several sessions is a compare of kept run directories: the same table as the original."""
    sys.path.insert(0, str(ROOT / "bench"))
    from keep_runs import keep

    whole = tmp_path / "whole"
    assert compare(recipes, whole) == 0
    assert keep(whole, tmp_path / "kept") == ["a", "b"] and keep(whole, tmp_path / "kept") == []
    assert not list((tmp_path / "kept").rglob("*.safetensors"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "tunelab", "compare", str(tmp_path / "kept/a"), str(tmp_path / "kept/b"),
                    "--out", str(tmp_path / "again")], env=env, check=True, capture_output=True)
    assert table(tmp_path / "again") == table(whole)
    # the next session's way (bench/methods_table.sh): a kept run as the reference, the next recipe trained
    subprocess.run([sys.executable, "-m", "tunelab", "compare", str(tmp_path / "kept/a"), str(recipes[1]),
                    "--set", "train.steps=3", "--set", "eval.num_examples=2", "--out", str(tmp_path / "next")],
                   env=env, check=True, capture_output=True)
    assert table(tmp_path / "next") == table(whole)
    assert any(r["section"] == "intruder" for r in table(whole)["rows"])  # the diagnostics were kept too
