"""Bad model inputs and the safety defaults, through a whole `tunelab train` (in-process CLI): each
mistake ends as one `tunelab: error:` line that names what is wrong, never a traceback; pickles
never run code; remote code stays off; a saved state that does not fit the model says so."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

import tunelab
from tunelab.cli import main
from tunelab.errors import TunelabError


def rows(n: int = 8) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"#### {i + 1}"}]} for i in range(n)]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return path


def cfg(model, data, out, **train) -> dict:
    return {"model": {"name": str(model)}, "data": {"train": str(data), "eval": None, "max_length": 48},
            "method": {"name": "lora", "r": 2},
            "train": {"steps": 2, "micro_batch_size": 4, "save_every": 1, "progress": False, "precision": "fp32",
                      **train},
            "output": str(out)}


def train_cli(tmp_path, config: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    rc = main(["train", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_a_path_that_is_not_a_model(tmp_path, data, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    rc, err = train_cli(tmp_path, cfg(tmp_path / "notes", data, tmp_path / "run"), capsys)
    assert rc == 2 and f"tunelab: error: {tmp_path / 'notes'} is not a model directory: it has no config.json" in err


def test_chat_data_with_a_tokenizer_without_chat_template(tmp_path, data, capsys):
    from tiny import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "plain"
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer(chat_template=None).save_pretrained(model_dir)
    rc, err = train_cli(tmp_path, cfg(model_dir, data, tmp_path / "run"), capsys)
    assert rc == 2
    assert f"model.name={model_dir}: its tokenizer has no chat template, but {data} holds chat rows" in err


def test_remote_code_stays_off_and_a_model_needing_it_says_so(tmp_path, tiny_dir, data, capsys):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (tiny_dir / "config.json").write_text(json.dumps(config))
    (tiny_dir / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    rc, err = train_cli(tmp_path, cfg(tiny_dir, data, tmp_path / "run"), capsys)
    assert rc == 2 and "needs custom model code" in err and "model.trust_remote_code: true" in err
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["trust_remote_code"] is False


def test_a_pickle_that_would_run_code_is_refused_even_when_pickles_are_allowed(tmp_path, tiny_dir, data, capsys):
    """allow_pickle loads with weights_only=True: a pickle whose payload calls os.system is refused
    with a clear message and the payload never runs."""
    from safetensors.torch import load_file

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = dict(load_file(str(tiny_dir / "model.safetensors")), payload=Payload())
    torch.save(state, tiny_dir / "pytorch_model.bin")
    (tiny_dir / "model.safetensors").unlink()
    rc, err = train_cli(tmp_path, cfg(tiny_dir, data, tmp_path / "refused"), capsys)
    assert rc == 2 and "only pickle weights" in err and "allow_pickle" in err  # off by default
    config = cfg(tiny_dir, data, tmp_path / "allowed")
    config["model"]["allow_pickle"] = True
    rc, err = train_cli(tmp_path, config, capsys)
    assert rc == 2 and "refused to load its pickle weights" in err and "weights_only=True" in err
    assert not marker.exists()


@pytest.fixture
def trained(tmp_path, tiny_dir, data) -> Path:
    return tunelab.train(cfg(tiny_dir, data, tmp_path / "run"))


def test_resuming_with_a_changed_adapter_shape_is_explained(trained, capsys):
    rc = main(["train", str(trained), "method.r=8"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{trained / 'checkpoints' / 'step-2'}: does not fit model.name=" in err and "method option changed" in err


def test_an_adapter_on_a_base_of_other_shapes_is_explained(trained, tmp_path):
    """The run's saved adapter, loaded onto a base model of another width: a clear error naming
    final/, not a size-mismatch traceback."""
    from tiny import tiny_model, tiny_tokenizer

    other = tmp_path / "narrow"
    tiny_model(hidden_size=32, intermediate_size=64).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    config = yaml.safe_load((trained / "config.yaml").read_text())
    config["model"]["name"] = str(other)
    (trained / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(TunelabError, match=f"{trained / 'final'}: does not fit model.name={other}"):
        tunelab.load_run(trained)
    assert main(["export", str(trained), "--merge", "--out", str(tmp_path / "merged")]) == 2


def test_skipped_rows_are_counted_in_the_run_log_and_warned_about(tmp_path, tiny_dir, capsys):
    """data.on_bad_rows=skip: the setup line of metrics.jsonl counts them, and a warning names the
    first three by file:line."""
    good = [json.dumps(r) for r in rows(6)]
    bad = ['{"messages": [', json.dumps({"messages": []}), "[1, 2]", json.dumps({"messages": [{"role": "bot"}]})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(good[:2] + bad[:2] + good[2:4] + bad[2:] + good[4:]) + "\n")
    config = cfg(tiny_dir, path, tmp_path / "run", steps=1)
    config["data"]["on_bad_rows"] = "skip"
    config["diagnostics"] = {"after_train": []}
    run = tunelab.train(config)
    setup = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["kind"] == "setup" and setup["bad_rows_skipped"] == 4 and setup["train_examples"] == 6
    err = capsys.readouterr().err
    assert f"{path}: skipped 4 malformed rows (data.on_bad_rows=skip); first: {path}:3: invalid JSON" in err
    assert f"{path}:4: field 'messages': is an empty list; {path}:7: expected an object" in err
