"""Load a model and tokenizer from a built-in name, a local HF directory, a .gguf file or a hub id.

Each kind of `model.name` is a `_Strategy` in `_STRATEGIES`, tried in order: the first whose
`matches` accepts the name resolves it to a `_Source` that says what to hand `from_pretrained`.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.models.builtin import BUILTIN_MODELS, pull
from tunelab.models.config import ModelConfig, looks_like_path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True)
class _Source:
    """What `from_pretrained` gets: a dir or hub id, and optionally a GGUF file inside the dir."""

    path: str
    gguf_file: str | None = None
    hub: bool = False
    offline: bool = False
    """A hub id while the hub is unreachable: the local HF cache only."""


@dataclass(frozen=True)
class _Strategy:
    kind: str
    matches: Callable[[str], bool]
    resolve: Callable[[str, ModelConfig], _Source]


def _builtin(name: str, cfg: ModelConfig) -> _Source:
    return _Source(str(pull(name)))


def _gguf(name: str, cfg: ModelConfig) -> _Source:
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise TunelabError(f"GGUF file not found: {name}")
    return _Source(str(path.parent), gguf_file=path.name)


def _local(name: str, cfg: ModelConfig) -> _Source:
    path = Path(name).expanduser().resolve()
    _check_local_dir(path, cfg)
    return _Source(str(path))


def _missing(name: str, cfg: ModelConfig) -> _Source:
    raise TunelabError(f"model.name {name}: no such file or directory (a path, so not looked up on the hub; "
                       f"relative paths in a YAML file resolve against its folder)")


@functools.lru_cache(maxsize=None)
def _hub_reachable() -> bool:
    """One quick connection to the hub's endpoint. When it fails, hub ids load from the local HF
    cache only (local_files_only), instead of huggingface_hub retrying for half a minute."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any(f and f.strip().lower() in ("1", "on", "yes", "true") for f in flags) or not _hub_reachable()


def _hub(name: str, cfg: ModelConfig) -> _Source:
    from transformers import PretrainedConfig

    src = _Source(name, hub=True, offline=_offline())
    # transformers would quietly swap a known model_type's auto_map for its own class; we refuse instead.
    config, _ = _call(PretrainedConfig.get_config_dict, src, {"revision": cfg.revision, **({"local_files_only": True} if src.offline else {})})
    _check_remote_code(config, name, cfg)
    return src


_STRATEGIES: tuple[_Strategy, ...] = (
    _Strategy("built-in", lambda n: n in BUILTIN_MODELS, _builtin),
    _Strategy("gguf", lambda n: n.lower().endswith(".gguf"), _gguf),
    _Strategy("local", lambda n: Path(n).expanduser().exists(), _local),
    _Strategy("missing path", looks_like_path, _missing),
    _Strategy("hub", lambda n: bool(_HUB_ID.match(n)), _hub),
)


def _resolve(cfg: ModelConfig) -> _Source:
    for strategy in _STRATEGIES:
        if strategy.matches(cfg.name):
            return strategy.resolve(cfg.name, cfg)
    raise TunelabError(f"model.name '{cfg.name}' is not a built-in name ({', '.join(sorted(BUILTIN_MODELS))}), "
                       "an existing local directory, a .gguf file or a hub id like org/name")


def resolve_model_path(name: str) -> str:
    """The directory, .gguf path or hub id that `name` loads from (pulls a built-in if needed)."""
    src = _resolve(ModelConfig(name=name, allow_pickle=True, trust_remote_code=True))
    return str(Path(src.path) / src.gguf_file) if src.gguf_file else src.path


def _check_local_dir(path: Path, cfg: ModelConfig) -> None:
    """Refuse, with a message naming `path`, what from_pretrained would fail on or run unsafely."""
    if not (path / "config.json").is_file():
        raise TunelabError(f"{path} is not a model directory: it has no config.json")
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    pickles = [p.name for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern)]
    if not has_safetensors and pickles and not cfg.allow_pickle:
        raise TunelabError(
            f"{path} has only pickle weights ({', '.join(sorted(pickles))}), which can run code when loaded. "
            "Convert them to safetensors, or set model.allow_pickle: true to load them with "
            "torch.load(weights_only=True).")
    _check_remote_code(json.loads((path / "config.json").read_text()), str(path), cfg)


def _check_remote_code(config: dict, where: str, cfg: ModelConfig) -> None:
    if config.get("auto_map") and not cfg.trust_remote_code:
        raise _remote_code_error(where)


def _remote_code_error(where: str) -> TunelabError:
    return TunelabError(f"{where} needs custom model code shipped with the checkpoint (auto_map). "
                        "Set model.trust_remote_code: true if you trust its source.")


def _common_kwargs(src: _Source, cfg: ModelConfig) -> dict:
    kw: dict = {"trust_remote_code": cfg.trust_remote_code}
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    if src.hub:
        kw["revision"] = cfg.revision
    if src.offline:
        kw["local_files_only"] = True
    return kw


def _model_kwargs(src: _Source, cfg: ModelConfig) -> dict:
    import torch

    kw = _common_kwargs(src, cfg)
    kw.update(dtype=getattr(torch, cfg.dtype), attn_implementation=cfg.attn_implementation.removesuffix("_masked"))
    if cfg.rope_scaling is not None:
        kw["config"] = _scaled_config(src, cfg)
    if src.gguf_file:
        pass  # the GGUF itself is the weights file; use_safetensors would look for another
    elif cfg.allow_pickle:
        kw["weights_only"] = True  # transformers' default in v5 too; explicit so it can never drift
    else:
        kw["use_safetensors"] = True
    return kw


def _scaled_config(src: _Source, cfg: ModelConfig):
    """The model's config with `cfg.rope_scaling` in its rope_parameters."""
    from transformers import AutoConfig

    from tunelab.models.context import scale_rope

    config = _call(AutoConfig.from_pretrained, src, _common_kwargs(src, cfg))
    scale_rope(config, cfg.rope_scaling)
    return config


def _call(loader: Callable, src: _Source, kwargs: dict):
    """Run `loader(src.path, **kwargs)`, turning known failures into one clear TunelabError."""
    try:
        return loader(src.path, **kwargs)
    except pickle.UnpicklingError as e:  # weights_only=True met a pickle that holds more than tensors
        refused = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln), str(e).splitlines()[0])
        raise TunelabError(f"{src.path}: refused to load its pickle weights: they hold more than plain tensors "
                           f"({refused.strip()}), and tunelab unpickles only with weights_only=True, never running "
                           "code from a checkpoint. Convert them to safetensors where you trust the source.") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise _remote_code_error(src.path) from e
        raise
    except OSError as e:
        if src.hub:
            raise TunelabError(
                f"could not load hub model '{src.path}' (revision {kwargs.get('revision') or 'main'}): "
                f"the Hugging Face hub is {'unreachable or offline' if src.offline else 'unreachable'} and it is not "
                "in the local HF cache. "
                f"Use a local model directory or a built-in name ({', '.join(sorted(BUILTIN_MODELS))}).") from e
        raise TunelabError(f"could not load model from {src.path}: {e}") from e


def _load_weights(loader: Callable, src: _Source, kwargs: dict):
    """`_call(loader, ...)`; a model that has no SDPA support (Gemma 2) falls back to eager
    attention, with a note on stderr, instead of a traceback."""
    try:
        return _call(loader, src, kwargs)
    except ValueError as e:
        if "does not support an attention implementation" not in str(e) or kwargs["attn_implementation"] == "eager":
            raise
        print(f"note: {str(e).split(' does not support')[0]} has no SDPA attention in transformers; using "
              "model.attn_implementation=eager", file=sys.stderr, flush=True)
        return _call(loader, src, kwargs | {"attn_implementation": "eager"})


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right"):
    """The tokenizer for `cfg.name`, with a pad token (eos if it has none) and `padding_side`."""
    return _load_tokenizer(_resolve(cfg), cfg, padding_side)


def _load_tokenizer(src: _Source, cfg: ModelConfig, padding_side: str):
    from transformers import AutoTokenizer

    tok = _call(AutoTokenizer.from_pretrained, src, _common_kwargs(src, cfg))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TunelabError(f"tokenizer of {cfg.name} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def _long_context(model, cfg: ModelConfig) -> None:
    """The training-time attention pattern of `cfg.attention` and its generation-time KV budget
    (both need tunelab's SDPA path)."""
    att = cfg.attention
    if att.pattern == "full" and att.kv_budget is None:
        return
    from tunelab.models.attention import NAME
    from tunelab.models.context import install_attention

    if model.config._attn_implementation != NAME:
        what = f"pattern {att.pattern}" if att.pattern != "full" else "kv_budget"
        raise TunelabError(f"model.attention: {what} needs SDPA attention, which "
                           f"{cfg.name} does not support in transformers")
    if att.kv_budget is not None:
        from tunelab.models.h2o import POLICY, KVPolicy
        model.__dict__[POLICY] = KVPolicy(att.kv_budget, att.recent_window(), att.num_sink_tokens)
    if att.pattern != "full":
        install_attention(model, att)


def load_model(cfg: ModelConfig, padding_side: str = "right"):
    """`(model, tokenizer)` for `cfg`; the model is in eval mode, its generation config knows pad/eos."""
    from transformers import AutoModelForCausalLM

    src = _resolve(cfg)
    model = _load_weights(AutoModelForCausalLM.from_pretrained, src, _model_kwargs(src, cfg))
    tok = _load_tokenizer(src, cfg, padding_side)
    if cfg.attn_implementation == "sdpa" and model.config._attn_implementation == "sdpa":
        # same function, but packed rows attend per example
        from tunelab.models.attention import register
        model.set_attn_implementation(register())
    _long_context(model, cfg)
    from tunelab.models.norms import fuse_rms_norms
    fuse_rms_norms(model)  # same values and gradients (checked per norm class), fewer passes
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tok.eos_token_id
    return model.eval(), tok
