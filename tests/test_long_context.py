"""Long-context training end to end: each attention pattern composes with full fine-tuning, LoRA,
LongLoRA and the prompt family; packing, resume, export and PEFT loading keep working; RoPE
scaling from the config; clear errors before training."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunelab
from tiny import chat_rows, tiny_model
from tunelab import config as C
from tunelab.data import collate
from tunelab.data.records import Example
from tunelab.errors import ConfigError, TunelabError
from tunelab.models.attention import register
from tunelab.models.config import AttentionConfig
from tunelab.models.context import install_attention
from tunelab.objectives import OBJECTIVES, model_inputs
from tunelab.options import from_dict
from tunelab.registry import METHODS

PATTERNS = {
    "s2": {"pattern": "s2", "group_size": 8},
    "s2-wrap": {"pattern": "s2", "group_size": 8, "wrap": True},
    "sf": {"pattern": "sf", "group_size": 8, "num_sink_tokens": 2},
    "lemo": {"pattern": "lemo", "keep_ratio": 0.5, "block_size": 4, "num_dense_first": 0},
}
METHOD_OPTIONS = {"full": {}, "lora": {"r": 4, "alpha": 8}, "longlora": {"r": 4, "alpha": 8},
                  "prompt_tuning": {"num_virtual_tokens": 3, "init": "random"},
                  "prefix_tuning": {"num_virtual_tokens": 3}}


def batch(lengths=(14, 23, 9), seed=0, packing=True):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for n in lengths:
        ids = torch.randint(3, 320, (n,), generator=g).tolist()
        exs.append(Example(ids, [-100] * 3 + ids[3:]))
    return collate(exs, packing=packing, pad_id=0)


def patterned(pattern: str | None, method: str, seed=0):
    model = tiny_model(seed)
    model.set_attn_implementation(register())
    if pattern:
        install_attention(model, AttentionConfig(**PATTERNS[pattern]))
    cls = METHODS.get(method)
    torch.manual_seed(1)
    m = cls(from_dict(cls.Config, METHOD_OPTIONS[method], "method"))
    return m.apply(model), m


def loss(model, b):
    return OBJECTIVES.get("sft")().loss(model, b)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_composes_with_method(pattern, method):
    """Training steps under the pattern: finite loss, the method's parameters move; the pattern is
    really active in training (the loss differs from full attention on the same weights), and in
    eval mode the model computes full attention."""
    model, m = patterned(pattern, method)
    full, _ = patterned(None, method)
    full.load_state_dict(model.state_dict())
    model.train(), full.train()
    b = batch()
    with torch.no_grad():
        assert not torch.allclose(loss(model, b).loss_sum, loss(full, b).loss_sum)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(m.param_groups(model, 0.0), lr=1e-2)
    for s in range(2):
        out = loss(model, batch(seed=s))
        assert torch.isfinite(out.loss_sum)
        out.loss_sum.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    full.load_state_dict(model.state_dict())
    model.eval(), full.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**model_inputs(b)).logits, full(**model_inputs(b)).logits)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_packed_loss_equals_padded_loss(pattern):
    model, _ = patterned(pattern, "lora")
    model.train()
    lengths = (14, 23, 9)
    with torch.no_grad():
        a, b = loss(model, batch(lengths)), loss(model, batch(lengths, packing=False))
    assert a.num_tokens == b.num_tokens
    torch.testing.assert_close(a.loss_sum, b.loss_sum, atol=1e-5, rtol=1e-5)


# -- through the training loop ------------------------------------------------------------------
@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(24)))
    return p


def run_cfg(tiny_dir, data_file, out, attention, method=None, **model):
    return {"model": {"name": str(tiny_dir), "attention": attention, **model},
            "data": {"train": str(data_file), "eval": str(data_file), "max_length": 64},
            "method": method or {"name": "lora", "r": 4, "alpha": 8},
            "train": {"steps": 4, "micro_batch_size": 4, "lr": 5e-3, "save_every": 2, "keep_checkpoints": 5,
                      "progress": False, "precision": "fp32"},
            "eval": {"num_examples": 2, "max_new_tokens": 4, "batch_size": 2},
            "diagnostics": {"after_train": []}, "output": str(out)}


@pytest.mark.parametrize("pattern", ["s2", "sf", "lemo"])
def test_resume_export_and_peft_loading_under_each_pattern(pattern, tiny_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    attention = PATTERNS[pattern]
    rope = {"type": "linear", "factor": 2.0}
    run = tunelab.train(run_cfg(tiny_dir, data_file, tmp_path / "a", attention, rope_scaling=rope))
    crashed = tmp_path / "b"
    shutil.copytree(run, crashed)
    for p in ("final", "eval.json", "checkpoints/step-4"):
        shutil.rmtree(crashed / p) if (crashed / p).is_dir() else (crashed / p).unlink()
    tunelab.train(str(crashed))  # resumes from step 2
    a, b = (load_file(str(r / "final/adapter_model.safetensors")) for r in (run, crashed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    cfg, tuned, tok, _ = tunelab.load_run(run)
    ids = torch.randint(3, 300, (2, 40))
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32,
                                                rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": tuned.config.rope_parameters["rope_theta"]})
    peft = PeftModel.from_pretrained(base, run / "final").eval()
    from tunelab.export import export
    merged_dir = export(run, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config.rope_parameters["rope_type"] == "linear" and merged.config.rope_parameters["factor"] == 2.0
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_longlora_recipe_trains_embeddings_and_norms_with_s2(tiny_dir, data_file, tmp_path):
    run = tunelab.train(run_cfg(tiny_dir, data_file, tmp_path / "r", PATTERNS["s2"], method={"name": "longlora"}))
    saved = load_file(str(run / "final/adapter_model.safetensors"))
    assert any("embed_tokens" in k for k in saved) and any(k.endswith("norm.weight") for k in saved)
    assert json.loads((run / "final/adapter_config.json").read_text())["modules_to_save"] == ["embed_tokens", "norm"]


# -- RoPE scaling ----------------------------------------------------------------------------------
ROPE_TYPES = [{"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
              {"type": "yarn", "factor": 4.0, "beta_fast": 16.0}, {"type": "llama3", "factor": 8.0},
              {"type": "longrope", "factor": 2.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}]


@pytest.mark.parametrize("rope", ROPE_TYPES, ids=[r["type"] for r in ROPE_TYPES])
def test_rope_scaling_from_the_config(rope, tiny_dir):
    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig
    from tunelab.models.context import positions

    plain, _ = load_model(ModelConfig(name=str(tiny_dir)))
    scaled, _ = load_model(from_dict(ModelConfig, {"name": str(tiny_dir), "rope_scaling": rope}, "model"))
    params = scaled.config.rope_parameters
    assert params["rope_type"] == rope["type"] and params["factor"] == rope["factor"]
    assert params["rope_theta"] == plain.config.rope_parameters["rope_theta"]
    assert positions(scaled.config)[0] == int(512 * rope["factor"])
    ids = torch.randint(3, 300, (1, 600))  # beyond the 512 trained positions, where dynamic NTK starts to act
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, scaled(input_ids=ids).logits)


def test_rope_option_of_another_type_is_an_error():
    from tunelab.models.config import RopeScaling
    with pytest.raises(ConfigError, match="beta_fast: only used by rope_scaling type yarn"):
        RopeScaling(type="linear", beta_fast=32.0)
    with pytest.raises(ConfigError, match="factor: must be >= 1"):
        RopeScaling(factor=0.5)


# -- clear errors before training -------------------------------------------------------------------
def test_longer_than_the_models_positions_without_scaling_fails_before_training(tiny_dir, tmp_path):
    long_rows = [{"text": " ".join(["word"] * 700)} for _ in range(4)]  # > the tiny model's 512 positions
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    cfg = run_cfg(tiny_dir, data, tmp_path / "run", {"pattern": "full"})
    cfg["data"] |= {"max_length": 1024, "eval": None}
    with pytest.raises(TunelabError, match=r"data.train: examples up to \d+ tokens \(the longest: \S*long.jsonl:\d+\) "
                                           r"are longer than the 512 positions.*model.rope_scaling"):
        tunelab.train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "train" not in (tmp_path / "run" / "metrics.jsonl").read_text()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    cfg["model"]["rope_scaling"] = {"type": "linear", "factor": 4.0}
    cfg["train"]["steps"] = 1
    tunelab.train(cfg)  # with scaling it trains


def test_group_size_that_does_not_divide_the_length_names_the_yaml_line(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  attention:\n    pattern: s2\n    group_size: 300\ndata:\n  max_length: 1024\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4: model.attention.group_size: 300 does not divide data.max_length=1024"):
        C.load(y)
    cfg = C.load(None, ["model.attention.pattern=s2", "data.max_length=2048"])
    assert cfg.model.attention.group_size == 512  # unset: a quarter of data.max_length
    with pytest.raises(ConfigError, match="data.max_length"):
        C.load(None, ["model.attention.pattern=sf", "data.max_length=1026"])


def test_keep_ratio_outside_zero_one_names_the_yaml_line(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  attention:\n    pattern: lemo\n    keep_ratio: 1.5\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4: model.attention.keep_ratio: must be in \(0, 1\], got 1.5"):
        C.load(y)


def test_patterns_need_tunelabs_sdpa_path():
    with pytest.raises(ConfigError, match="attn_implementation"):
        C.load(None, ["model.attention.pattern=s2", "model.attn_implementation=eager"])


def test_deepcopy_keeps_the_pattern():
    model, _ = patterned("sf", "lora")
    clone = copy.deepcopy(model).train()
    model.train()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(loss(clone, b).loss_sum, loss(model, b).loss_sum)


@pytest.mark.parametrize("pattern", ["s2", "sf", "lemo"])
def test_load_model_installs_the_configured_pattern(pattern, tiny_dir):
    from tunelab.models import load_model
    from tunelab.models.attention import PATTERN
    from tunelab.models.config import ModelConfig

    model, _ = load_model(from_dict(ModelConfig, {"name": str(tiny_dir), "attention": PATTERNS[pattern]}, "model"))
    attns = [layer.self_attn for layer in model.model.layers]
    if pattern == "lemo":
        assert [len(a._forward_pre_hooks) for a in attns] == [1, 0]  # the last layer stays dense
    else:
        assert all(a.__dict__[PATTERN].group_size == 8 for a in attns)
        assert all((a.__dict__[PATTERN].num_sinks == 2) == (pattern == "sf") for a in attns)


# -- the recipes -------------------------------------------------------------------------------------
EXAMPLES = Path(__file__).parent.parent / "examples"
RECIPES = sorted((EXAMPLES / "long_context").glob("*.yaml")) + [EXAMPLES / "methods" / "longlora.yaml"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_on_the_models_device_and_scores_by_length(recipe, tiny_dir, tmp_path):
    """Each long-context recipe as written (attention pattern, rope scaling, method, eval), with the
    model swapped for the tiny one and shorter retrieval rows: it trains, every tensor tunelab
    makes names its device (tests/devicetrap.py), and eval.json has accuracy per length bucket."""
    from devicetrap import DeviceTrap

    raw = yaml.safe_load(recipe.read_text())
    cfg = C.load(None, [f"model.name={tiny_dir}", "data.train=builtin:longctx?n=6&length=128&max_length=256",
                        "data.eval=builtin:longctx?n=4&length=128&max_length=256&split=test", "data.max_length=512",
                        "train.steps=2", "train.save_every=0", "train.progress=false", "train.precision=fp32",
                        "eval.before=false", "eval.num_examples=4", "diagnostics.after_train=[]",
                        f"output={tmp_path / 'run'}"]
                + (["model.attention.num_dense_first=0"] if raw["model"]["attention"]["pattern"] == "lemo" else []),
                base=raw)  # lemo: the tiny model's 2 layers are its default dense half and dense last layer
    att = cfg.model.attention
    assert att.pattern == raw["model"]["attention"]["pattern"]
    assert att.group_size == (128 if att.pattern in ("s2", "sf") else None)  # unset: a quarter of data.max_length
    with DeviceTrap() as trap:
        run = tunelab.train(cfg)
    assert not trap.found, "tensors created without a device:\n  " + "\n  ".join(sorted(trap.found))
    after = json.loads((run / "eval.json").read_text())["after"]
    assert set(after["by_length"]) == {"128", "256"} and sum(b["num_examples"] for b in after["by_length"].values()) == 4


def test_lemo_without_a_sparse_layer_warns(tiny_dir):
    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig

    with pytest.warns(UserWarning, match="eliminates tokens in no layer of this 2-layer model"):
        load_model(from_dict(ModelConfig, {"name": str(tiny_dir), "attention": {"pattern": "lemo"}}, "model"))
