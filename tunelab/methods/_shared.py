"""What several methods share, written once: choosing linear layers by pattern, swapping a module
for another, freezing a model, weight-decay groups, and tunelab's own adapter files
(`tunelab_adapter.safetensors` + `tunelab_adapter.json`) for methods PEFT has no format for."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import ConfigError

WEIGHTS_FILE, CONFIG_FILE = "tunelab_adapter.safetensors", "tunelab_adapter.json"


# ----------------------------------------------------------------------------- choosing layers

def matches(name: str, pattern: str) -> bool:
    """A module name matches a leaf name ('q_proj'), a dotted suffix ('self_attn.q_proj') or a
    regex matched against the full name."""
    leaf = name.rsplit(".", 1)[-1]
    return pattern == leaf or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a linear layer whose weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, Conv1D)


def features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) features of an nn.Linear or a Conv1D."""
    return tuple(layer.weight.shape) if is_conv1d(layer) else (layer.in_features, layer.out_features)


def select_linears(model: nn.Module, patterns: list[str], conv1d: bool = False) -> list[str]:
    """Names of the nn.Linear modules (and with `conv1d`, transformers' Conv1D ones) matched by
    `patterns` ('all-linear': every one), never the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [n for n, m in model.named_modules()
               if (isinstance(m, nn.Linear) or (conv1d and is_conv1d(m))) and m is not head]
    if "all-linear" in patterns:
        return linears
    _check_patterns(patterns, linears)
    return [n for n in linears if any(matches(n, p) for p in patterns)]


def _check_patterns(patterns: list[str], linears: list[str]) -> None:
    """An entry that matches no layer is an error naming it and the layers there are, unless
    another entry matches (a recipe meant for several architectures): then a warning on stderr."""
    counts = {p: sum(matches(n, p) for n in linears) for p in patterns}
    dead = [repr(p) for p, k in counts.items() if not k]
    if not dead:
        return
    verb = "matches" if len(dead) == 1 else "match"
    if len(dead) == len(patterns):
        leaves = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears}))
        raise ConfigError(f"method.target_modules: {', '.join(dead)} {verb} no linear layer; the model's linear "
                          f"layers are named: {leaves}")
    live = ", ".join(f"{p!r} matches {k}" for p, k in counts.items() if k)
    print(f"warning: method.target_modules: {', '.join(dead)} {verb} no linear layer of this model; {live}",
          file=sys.stderr, flush=True)


def target_linears(model: nn.Module, patterns: list[str]) -> list[str]:
    """`select_linears`, and a ConfigError when nothing matches."""
    names = select_linears(model, list(patterns))
    if not names:
        raise ConfigError(f"method.target_modules: {list(patterns)} matches no linear layer")
    return names


# ----------------------------------------------------------------------------- changing the model

def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` is."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def decay_groups(params, weight_decay: float, *, decay_vectors: bool = False) -> list[dict]:
    """Optimizer groups: weight decay on matrices, none on vectors (norms, biases); empty ones
    dropped. With `decay_vectors`, one group that decays everything (sparse deltas are 1-D but are
    weights: decay pulls them toward the pretrained W)."""
    params = list(params)
    if decay_vectors:
        return [{"params": params, "weight_decay": weight_decay}] if params else []
    groups = ({"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- adapter files

def save_adapter(out_dir: Path, method, state: dict[str, torch.Tensor], base_name: str, **extra) -> None:
    """Write `state` (names as in the model) and a JSON of the method, its options and base model."""
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in state.items()}, str(Path(out_dir) / WEIGHTS_FILE),
              metadata={"format": "pt"})
    meta = {"format": "tunelab-adapter", "method": method.name, "base_model": base_name,
            "options": dataclasses.asdict(method.cfg), **extra}
    (Path(out_dir) / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def load_adapter(out_dir: Path, method) -> dict[str, torch.Tensor]:
    """The tensors `save_adapter` wrote, after checking they were written by the same method."""
    from safetensors.torch import load_file

    meta = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    if meta.get("method") != method.name:
        raise ConfigError(f"{Path(out_dir) / CONFIG_FILE}: holds a '{meta.get('method')}' adapter, "
                          f"not '{method.name}'")
    return load_file(str(Path(out_dir) / WEIGHTS_FILE))
