"""A user's own data, model and folders (issue 16): what is evaluated when data.eval is unset,
how paths resolve, a retried start, truncation warnings, AutoPeft loading, `tunelab eval`
(tool calls and per-message weights: test_tool_data.py)."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tunelab
from tiny import chat_rows
from tunelab.data import DataConfig
from tunelab.data.split import HOLDOUT_SEED, holdout_indices, train_eval_records


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_cfg(tiny_dir, train, out, **data) -> dict:
    return {"model": {"name": str(tiny_dir)}, "data": {"train": str(train), "max_length": 64, **data},
            "method": {"name": "lora", "r": 2},
            "train": {"steps": 2, "micro_batch_size": 4, "progress": False, "precision": "fp32"},
            "eval": {"num_examples": 8, "max_new_tokens": 4, "batch_size": 8},
            "diagnostics": {"after_train": []}, "output": str(out)}


def setup_line(run) -> dict:
    return next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "setup")


# ---- 1. with a user file and no data.eval, a held-out slice of that file is evaluated

def test_user_file_without_eval_is_scored_on_a_held_out_slice_of_itself(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mine.jsonl", chat_rows(40))
    run = tunelab.train(user_cfg(tiny_dir, data, tmp_path / "run"))
    out = capsys.readouterr().out
    assert "eval: 2 of 40 rows of" in out and "data.eval_fraction=0.05" in out and "not trained on" in out
    res = json.loads((run / "eval.json").read_text())
    for when in ("before", "after"):
        assert res[when]["num_examples"] == 2
        assert all(s["source"].startswith(f"{data}:") for s in res[when]["samples"])  # never builtin:arith
    assert setup_line(run)["train_examples"] == 38 and setup_line(run)["eval_examples"] == 2
    held = {s["source"] for s in res["after"]["samples"]}
    train, held_out, _ = train_eval_records(DataConfig(train=str(data), max_length=64))
    assert held == {r.source for r in held_out} and not held & {r.source for r in train}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), fraction=st.floats(0, 0.99), cap=st.integers(1, 500))
def test_holdout_is_deterministic_disjoint_and_bounded(n, fraction, cap):
    idx = holdout_indices(n, fraction, cap)
    assert idx == holdout_indices(n, fraction, cap) and idx == sorted(set(idx))
    assert all(0 <= i < n for i in idx)
    expected = 0 if n < 2 or fraction == 0 else min(math.ceil(fraction * n), cap, n - 1)
    assert len(idx) == expected
    assert isinstance(HOLDOUT_SEED, str)


def test_eval_fraction_zero_evaluates_nothing_and_says_so(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mine.jsonl", chat_rows(12))
    run = tunelab.train(user_cfg(tiny_dir, data, tmp_path / "run", eval_fraction=0))
    assert "eval: none (data.eval: holdout, data.eval_fraction=0)" in capsys.readouterr().out
    assert not (run / "eval.json").exists() and setup_line(run)["train_examples"] == 12


def test_eval_null_evaluates_nothing_and_says_so(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mine.jsonl", chat_rows(12))
    run = tunelab.train(user_cfg(tiny_dir, data, tmp_path / "run", eval=None))
    assert "eval: none (data.eval is null)" in capsys.readouterr().out
    assert not (run / "eval.json").exists() and setup_line(run)["train_examples"] == 12


def test_named_eval_data_is_used_as_given(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mine.jsonl", chat_rows(12))
    other = write_jsonl(tmp_path / "other.jsonl", chat_rows(5, seed=3))
    run = tunelab.train(user_cfg(tiny_dir, data, tmp_path / "run", eval=str(other)))
    assert f"eval: {other} (data.eval), 5 rows" in capsys.readouterr().out
    assert setup_line(run)["train_examples"] == 12
    assert json.loads((run / "eval.json").read_text())["after"]["num_examples"] == 5


def test_eval_data_without_gold_answers_is_scored_by_loss_and_perplexity(tiny_dir, tmp_path, capsys):
    rows = [{"instruction": f"Write a line about the number {i}.", "output": f"The number {i} is a fine number."}
            for i in range(40)]
    data = write_jsonl(tmp_path / "free.jsonl", rows)
    run = tunelab.train(user_cfg(tiny_dir, data, tmp_path / "run"))
    out = capsys.readouterr().out
    res = json.loads((run / "eval.json").read_text())
    for when in ("before", "after"):
        assert "accuracy" not in res[when]
        assert res[when]["perplexity"] == pytest.approx(math.exp(res[when]["eval_loss"]))
        assert res[when]["loss_examples"] == 2
    assert "eval after: loss" in out and "perplexity" in out and "no gold final answers" in out
    html = (run / "report.html").read_text()
    assert 'data-key="perplexity_after"' in html and 'data-key="accuracy_after"' not in html
    assert "no gold final answer" in html


# ---- 2. relative paths: a YAML's against its folder, overrides against the working directory

def _project(tmp_path, tiny_dir):
    """proj/ with a YAML naming its data, model and output relatively, as a user would."""
    import shutil

    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    shutil.copytree(tiny_dir, proj / "models" / "tiny")
    write_jsonl(proj / "data" / "mine.jsonl", chat_rows(12))
    (proj / "exp.yaml").write_text(
        "model:\n  name: models/tiny\ndata:\n  train: data/mine.jsonl\n  max_length: 64\n"
        "method:\n  name: lora\n  r: 2\ntrain:\n  steps: 2\n  micro_batch_size: 4\n  progress: false\n"
        "eval:\n  num_examples: 2\n  max_new_tokens: 2\ndiagnostics:\n  after_train: []\noutput: runs/exp\n")
    return proj


def test_yaml_paths_resolve_against_its_folder_and_the_run_stores_absolute_paths(tiny_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    import yaml

    from tunelab.cli import main

    proj = _project(tmp_path, tiny_dir)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", str(proj / "exp.yaml")]) == 0
    run = proj / "runs" / "exp"
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["model"]["name"] == str(proj / "models" / "tiny")
    assert stored["data"]["train"] == str(proj / "data" / "mine.jsonl") and stored["output"] == str(run)
    (tmp_path / "third").mkdir()
    monkeypatch.chdir(tmp_path / "third")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] > 0


def test_overrides_resolve_against_the_working_directory(tiny_dir, tmp_path, monkeypatch):
    from tunelab import config as C

    proj = _project(tmp_path, tiny_dir)
    write_jsonl(tmp_path / "cwd.jsonl", chat_rows(4))
    monkeypatch.chdir(tmp_path)
    cfg = C.load(proj / "exp.yaml", ["data.train=cwd.jsonl", "output=out/x"])
    assert cfg.data.train == str(tmp_path / "cwd.jsonl") and cfg.output == str(tmp_path / "out" / "x")
    assert cfg.model.name == str(proj / "models" / "tiny")
    assert C.load(None, ["model.name=smollm2-135m"]).model.name == "smollm2-135m"  # built-in names stay
    assert C.load(None, ["model.name=org/name"]).model.name == "org/name"  # so do hub ids
    assert C.load(None, ["data.eval=builtin:arith?n=4"]).data.eval == "builtin:arith?n=4"


@pytest.mark.parametrize("name", ["./models/nope", "../nope", "/abs/models/nope", "a/b/c"])
def test_a_missing_path_is_never_sent_to_the_hub(name, tmp_path, monkeypatch):
    from tunelab.errors import TunelabError
    from tunelab.models import ModelConfig, load_model
    from tunelab.models import load as L

    monkeypatch.setattr(L, "_hub", lambda *a: pytest.fail("sent to the hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunelabError, match="no such file or directory"):
        load_model(ModelConfig(name=name))


def test_an_unreachable_hub_is_asked_once_not_retried(monkeypatch):
    """Offline without HF_HUB_OFFLINE set: one quick connection attempt, then the local HF cache
    only, instead of huggingface_hub's five retries with back-off."""
    import socket

    from tunelab.errors import TunelabError
    from tunelab.models import ModelConfig, load_tokenizer
    from tunelab.models import load as L

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    L._hub_reachable.cache_clear()
    with pytest.raises(TunelabError, match="unreachable.*not in the local HF cache"):
        load_tokenizer(ModelConfig(name="someorg/somemodel"))
    assert len(attempts) == 1


# ---- 3. a start that failed before any step does not block the corrected command

def test_a_failed_start_does_not_block_the_corrected_retry(tiny_dir, tmp_path, capsys):
    import yaml

    from tunelab.cli import main

    data = write_jsonl(tmp_path / "mine.jsonl", chat_rows(8))
    cfg = user_cfg(tiny_dir, tmp_path / "typo.jsonl", tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "typo.jsonl: no such file or directory" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "c.yaml"), f"data.train={data}"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["train"] == str(data)


def test_a_run_with_steps_done_is_still_protected(tiny_dir, tmp_path, capsys):
    from tunelab.errors import ConfigError

    data = write_jsonl(tmp_path / "mine.jsonl", chat_rows(8))
    tunelab.train(user_cfg(tiny_dir, data, tmp_path / "run"))
    with pytest.raises(ConfigError, match="already holds a different run"):
        tunelab.train(user_cfg(tiny_dir, data, tmp_path / "run"), "train.lr=0.5")


# ---- 6. truncation and dropped examples are said at setup, in `data check` and in the report

def long_rows() -> list[dict]:
    """10 short rows, 2 with a long answer (truncated, still trained), 1 with a long prompt (dropped)."""
    rows = chat_rows(10)
    rows += [{"messages": [{"role": "user", "content": "Count."},
                           {"role": "assistant", "content": " ".join(map(str, range(n)))}]} for n in (40, 60)]
    rows.append({"messages": [{"role": "user", "content": "Hello world! " * 30}, {"role": "assistant", "content": "Hi"}]})
    return rows


def _longest(tok, path) -> int:
    from tunelab.data import encode, load_records
    return max(map(len, encode(load_records(str(path), DataConfig()), tok, DataConfig(max_length=100_000))))


def test_truncation_and_drops_are_warned_at_setup_and_shown_in_the_report(tiny_dir, tmp_path, tok, capsys):
    data = write_jsonl(tmp_path / "long.jsonl", long_rows())
    run = tunelab.train(user_cfg(tiny_dir, data, tmp_path / "run", eval_fraction=0))
    err = capsys.readouterr().err
    longest = _longest(tok, data)
    assert longest > 64
    assert (f"warning: data.train: 2 of 13 examples truncated at data.max_length=64 (longest: {longest} tokens); "
            "1 dropped (no trained token left after truncation)") in err
    setup = setup_line(run)
    assert (setup["truncated"], setup["dropped"], setup["longest_example"]) == (2, 1, longest)
    html = (run / "report.html").read_text()
    assert "2 truncated at data.max_length=64" in html and f"longest {longest} tokens" in html
    assert "1 dropped" in html


def test_data_check_says_truncation_with_the_longest_length(tok, tmp_path):
    from tunelab.data import check_data

    data = write_jsonl(tmp_path / "long.jsonl", long_rows())
    report = check_data(str(data), tok, DataConfig(max_length=64), color=False)
    assert f"truncated at max_length=64: 2 (longest before truncation: {_longest(tok, data)} tokens)" in report
    assert "examples: 12 (1 dropped: no trained token after truncation)" in report


def test_a_file_whose_every_example_is_dropped_is_a_clear_error(tiny_dir, tmp_path):
    from tunelab.errors import TunelabError

    data = write_jsonl(tmp_path / "long.jsonl", long_rows()[-1:] * 3)
    with pytest.raises(TunelabError, match=r"data.train: no example left to train: all 3 were dropped .*max_length=64"):
        tunelab.train(user_cfg(tiny_dir, data, tmp_path / "run", eval_fraction=0))


# ---- 7. a run's adapter loads with AutoPeftModelForCausalLM

@pytest.mark.parametrize("model", ["builtin", "local"])
def test_auto_peft_model_loads_a_runs_adapter(model, tiny_dir, tmp_path, monkeypatch):
    import shutil

    import torch
    from peft import AutoPeftModelForCausalLM

    from tunelab.models import builtin

    home = tmp_path / "home"
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    shutil.copytree(tiny_dir, home / "models" / "smollm2-135m")  # the built-in's cache, faked tiny
    (home / "models" / "smollm2-135m" / builtin.MARKER).write_text("{}")
    name = "smollm2-135m" if model == "builtin" else str(tiny_dir)
    cfg = user_cfg(name, write_jsonl(tmp_path / "d.jsonl", chat_rows(8)), tmp_path / "run", eval_fraction=0)
    cfg["train"]["lr"] = 0.05
    run = tunelab.train(cfg)
    stored = json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert stored == str(home / "models" / "smollm2-135m" if model == "builtin" else tiny_dir)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(run / "final").eval()
    _, ours, _, _ = tunelab.load_run(run)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, ours(ids).logits, atol=1e-5)


# ---- 9. `tunelab eval`: another file, no eval data, --num-examples out of range

@pytest.fixture
def small_run(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", chat_rows(12))
    return tunelab.train(user_cfg(tiny_dir, data, tmp_path / "run", eval_fraction=0))


def test_eval_on_another_file(small_run, tmp_path, capsys):
    from tunelab.cli import main

    other = write_jsonl(tmp_path / "other.jsonl", chat_rows(5, seed=7))
    capsys.readouterr()
    assert main(["eval", str(small_run), "--data", str(other), "--num-examples", "3"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["num_examples"] == 3 and res["loss_examples"] == 3 and f"eval: {other} (data.eval)" in captured.err


def test_eval_of_a_run_without_eval_data_says_how_to_give_some(small_run, capsys):
    from tunelab.cli import main

    assert main(["eval", str(small_run)]) == 2
    err = capsys.readouterr().err
    assert "has no eval data" in err and "--data FILE" in err


@pytest.mark.parametrize("n", ["-3", "0"])
def test_eval_num_examples_below_one_is_an_error(n, small_run, tmp_path, capsys):
    from tunelab.cli import main

    other = write_jsonl(tmp_path / "other.jsonl", chat_rows(5, seed=7))
    assert main(["eval", str(small_run), "--data", str(other), "--num-examples", n]) == 2
    assert f"--num-examples: must be >= 1, got {n}" in capsys.readouterr().err
