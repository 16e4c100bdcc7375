"""Config: YAML + overrides into typed dataclasses; bad input names the key path (and line)."""
from pathlib import Path

import pytest
import yaml

from tunelab import config as C
from tunelab.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, "method:\n  name: lora\n  r: 8\ntrain:\n  steps: 10\n")
    cfg = C.load(p, ["train.steps=50", "output=runs/x", "method.rslora=true", "train.lr=1e-3"])
    assert cfg.train.steps == 50 and cfg.output == str(tmp_path / "runs/x") and cfg.train.lr == 1e-3
    assert cfg.method.name == "lora" and cfg.method.options.r == 8 and cfg.method.options.rslora
    assert cfg.objective.name == "sft"


def test_round_trip(tmp_path):
    cfg = C.load(write(tmp_path, "train:\n  steps: 7\nmethod: full\n"))
    C.dump(cfg, tmp_path / "out.yaml")
    assert C.to_dict(C.load(tmp_path / "out.yaml")) == C.to_dict(cfg)


@pytest.mark.parametrize("text, key", [
    ("train:\n  stepz: 3\n", "train.stepz"),
    ("train:\n  steps: -1\n", "train.steps"),
    ("train:\n  steps: ten\n", "train.steps"),
    ("train:\n  lr: 0\n", "train.lr"),
    ("train:\n  precision: fp8\n", "train.precision"),
    ("method:\n  name: lorax\n", "method.name"),
    ("method:\n  name: lora\n  r: 0\n", "method.r"),
    ("method:\n  name: lora\n  rank: 4\n", "method.rank"),
    ("data:\n  packing: maybe\n", "data.packing"),
    ("bogus: 1\n", "bogus"),
    ("method:\n  name: lora\n  alpha: -3\n", "method.alpha"),
    ("train:\n  steps: 3\n  7: 2\n", "train.7"),
])
def test_bad_values_name_key_and_line(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        C.load(p)
    msg = str(e.value)
    assert key in msg and str(p) in msg
    line = next(i + 1 for i, ln in enumerate(text.splitlines()) if key.split(".")[-1] + ":" in ln)
    assert f"{p}:{line}:" in msg


def test_bad_override_names_key():
    with pytest.raises(ConfigError, match="train.steps"):
        C.load(None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        C.load(None, ["train.steps"])


def test_choices_are_listed():
    with pytest.raises(ConfigError, match="fp32, bf16"):
        C.load(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="full.*lora"):
        C.load(None, ["method.name=nope"])


def test_split_bound_defaults_by_device_and_an_explicit_value_wins():
    """train.max_tokens_per_forward unset: 512 on CPU, 16384 on CUDA; a set value (0 too) is kept."""
    import torch

    from tunelab.training.config import TrainConfig, max_tokens_per_forward_for

    unset = TrainConfig()
    assert unset.max_tokens_per_forward is None
    assert max_tokens_per_forward_for(unset, torch.device("cpu")) == 512
    assert max_tokens_per_forward_for(unset, torch.device("cuda")) == 16384
    for value in (0, 64):
        assert max_tokens_per_forward_for(TrainConfig(max_tokens_per_forward=value), torch.device("cuda")) == value
    with pytest.raises(ConfigError, match="max_tokens_per_forward"):
        TrainConfig(max_tokens_per_forward=-1)
    cfg = C.from_dict(C.RunConfig, {"train": {"max_tokens_per_forward": None}}, "x.yaml")
    assert cfg.train.max_tokens_per_forward is None


def test_an_override_error_is_blamed_on_the_command_line_not_the_yaml(tmp_path):
    p = write(tmp_path, "model:\n  name: smollm2-135m\ntrain:\n  steps: 10\n  lr: 0.001\n")
    with pytest.raises(ConfigError) as e:
        C.load(p, ["output=runs/x", "train.steps=abc"])
    msg = str(e.value)
    assert msg.startswith("command line: train.steps=abc: train.steps: expected int") and f"{p}" not in msg
    with pytest.raises(ConfigError, match=r"^command line: method.name=lorax: method.name: "):
        C.load(p, ["method.name=lorax"])
    with pytest.raises(ConfigError, match=rf"^{p}:4: train.steps"):  # a YAML error still names its line
        C.load(write(tmp_path, "model:\n  name: smollm2-135m\ntrain:\n  steps: ten\n"), ["output=runs/x"])


@pytest.mark.parametrize("name, valid", [("full", "which takes no options"),
                                         ("hft", "its options: ")])
def test_options_of_another_method_say_which_method_they_were_checked_against(tmp_path, name, valid):
    p = write(tmp_path, "method:\n  name: lora\n  r: 8\n  alpha: 16\n")
    with pytest.raises(ConfigError) as e:
        C.load(p, [f"method.name={name}"])
    msg = str(e.value)
    assert f"method.alpha: not an option of method '{name}', {valid}" in msg and "left from another method" in msg


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


def test_the_edit_recipes_load_as_edit_configs():
    """examples/editing holds `tunelab edit` recipes (their own schema), not training runs."""
    from tunelab.editing.edit import load_config

    edits = [p for p in EXAMPLES if p.parent.name == "editing"]
    assert edits
    for path in edits:
        raw = yaml.safe_load(path.read_text())
        cfg = load_config(str(path))
        assert cfg.method == raw["method"] and cfg.lr == raw["lr"], path


@pytest.mark.parametrize("path", [p for p in EXAMPLES if "stages" not in yaml.safe_load(p.read_text())
                                  and p.parent.name != "editing"],
                         ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_example_config_loads_as_written(path):
    """Each single-run example under examples/ validates, keeps the method, objective and options
    it names, and writes under the repository's runs/ folder (paths resolve against the YAML)."""
    raw = yaml.safe_load(path.read_text())
    cfg = C.load(path)
    assert cfg.method.name == raw["method"]["name"]
    assert cfg.objective.name == raw.get("objective", {}).get("name", "sft")
    for section in ("method", "objective"):
        for key, value in {k: v for k, v in raw.get(section, {}).items() if k != "name"}.items():
            got = getattr(getattr(cfg, section).options, key)
            got = list(got) if isinstance(got, tuple) else got
            assert got == ([value] if isinstance(got, list) and isinstance(value, str) else value), f"{section}.{key}"
    assert Path(cfg.output).is_absolute() and Path(cfg.output).is_relative_to(REPO / "runs")
