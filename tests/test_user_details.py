"""The smaller defects a new user met (issue 16, point 11), one test each."""
from __future__ import annotations

import json

import pytest

import tunelab
from tiny import chat_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(tiny_dir, tmp_path, name="run", **train) -> dict:
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(12))
    return {"model": {"name": str(tiny_dir)}, "data": {"train": str(data), "max_length": 64, "eval_fraction": 0},
            "method": {"name": "lora", "r": 2}, "diagnostics": {"after_train": []},
            "train": {"steps": 2, "micro_batch_size": 4, "progress": False, "precision": "fp32", **train},
            "output": str(tmp_path / name)}


# ---- a. warmup longer than the run

def test_warmup_not_below_steps_is_warned(tiny_dir, tmp_path, capsys):
    tunelab.train(cfg_for(tiny_dir, tmp_path, warmup_steps=10))
    err = capsys.readouterr().err
    assert "warning: train.warmup_steps=10 is not below train.steps=2" in err
    assert "peaks at 2/11 of train.lr" in err  # step i of the warm-up uses (i + 1) / 11
    tunelab.train(cfg_for(tiny_dir, tmp_path, "quiet", warmup_steps=1))
    assert "warmup_steps" not in capsys.readouterr().err
