"""The command line, in-process: every command on a tiny run; user errors are one clear line."""
import json

import pytest

from tunelab.cli import main


@pytest.fixture
def run(tiny_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"#### {i + 1}"}]} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {tiny_dir}\ndata:\n  train: {data}\n  eval: {data}\n"
                   "method:\n  name: lora\n  r: 2\ntrain:\n  steps: 2\n  micro_batch_size: 4\n  progress: false\n"
                   "eval:\n  num_examples: 3\n  max_new_tokens: 4\n"
                   "diagnostics:\n  after_train: [tuco]\n  options:\n    tuco:\n      num_prompts: 2\n")
    out = tmp_path / "run"
    assert main(["train", str(cfg), f"output={out}"]) == 0
    return out


def test_eval_generate_export(run, tmp_path, capsys):
    assert main(["eval", str(run)]) == 0
    res = json.loads(capsys.readouterr().out)
    after = json.loads((run / "eval.json").read_text())["after"]  # the run's own final evaluation
    assert res["num_examples"] == after["num_examples"] == 3 and res["accuracy"] == after["accuracy"]
    assert abs(res["eval_loss"] - after["eval_loss"]) < 1e-4 * after["eval_loss"]
    assert main(["generate", str(run), "--prompt", "What is 2 plus 1?", "--max-new-tokens", "4"]) == 0
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged/config.json").exists() and list((tmp_path / "merged").glob("*.safetensors"))


def test_data_check(run, tmp_path, capsys, monkeypatch):
    data = next(run.parent.glob("d.jsonl"))
    import tunelab.models
    from tiny import tiny_tokenizer
    monkeypatch.setattr(tunelab.models, "load_tokenizer", lambda cfg: tiny_tokenizer())
    assert main(["data", "check", str(data), "--model", "x"]) == 0
    out = capsys.readouterr().out
    assert "12" in out and "messages" in out and "[[" in out


@pytest.mark.parametrize("argv, needle", [
    (["train", "nope.yaml"], "neither a config file nor a run directory"),
    (["eval", "/nonexistent-run"], "not a run directory"),
])
def test_user_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bad_config_value_stops_before_loading(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: /does/not/exist\ntrain:\n  lr: -1\n")
    assert main(["train", str(cfg)]) == 2
    assert f"{cfg}:4: train.lr" in capsys.readouterr().err


def test_help_is_fast_and_light():
    import subprocess
    import sys
    code = "import sys, tunelab.cli; tunelab.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # --help never imports torch
