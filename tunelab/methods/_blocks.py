"""Finding the transformer blocks of any nn.Module stack, and the sublayers inside a block.

Shared by the adapter methods (where to hook) and the layer recipes (which depth a parameter has).
Nothing here names a model family: blocks are the largest nn.ModuleList of same-typed modules
(Llama `model.layers`, GPT-2 `transformer.h`, BERT `encoder.layer`, AST/ViT `layers`), and
sublayers are found by their name *relative to a block*, from a short table of the names
transformers uses, first match wins; a config can name them explicitly instead.
"""
from __future__ import annotations

import re

from torch import nn

from tunelab.errors import ConfigError

# Sublayer roles -> candidate names relative to a block, first present wins.
#   attn_in / ffn_in:   the module whose *input* is the sublayer input x (after the pre-norm)
#   attn_out / ffn_out: the module whose *output* is the sublayer output, before the residual add
# Llama/Qwen/SmolLM: self_attn, mlp. AST/ViT (transformers 5): attention, mlp. GPT-2: attn, mlp.
# BERT (post-norm): the residual is added inside attention.output / output, so the outputs are
# their dense layers and the FFN input is the input of `intermediate`.
SUBLAYERS: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn", "attention", "attn"),
    "attn_out": ("self_attn", "attention.output.dense", "attention", "attn"),
    "ffn_in": ("mlp", "intermediate"),
    "ffn_out": ("mlp", "output.dense"),
}


def find_blocks(model: nn.Module, pattern: str | None = None, key: str = "method.blocks") -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's transformer blocks: the ModuleList whose name fully matches
    `pattern`, or by default the one holding the most parameters among lists of same-typed modules."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(c) for c in m}) == 1]
    if pattern is not None:
        lists = [(n, m) for n, m in lists if re.fullmatch(pattern, n)]
    if not lists:
        raise ConfigError(f"{key}: found no list of transformer blocks in {type(model).__name__}"
                          + (f" named like '{pattern}'" if pattern else ""))
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def sublayer_name(block: nn.Module, role: str, override: dict[str, str], key: str = "method.modules") -> str:
    """The name inside `block` of the sublayer playing `role` (see SUBLAYERS)."""
    names = dict(block.named_modules())
    if role in override:
        if override[role] not in names:
            raise ConfigError(f"{key}.{role}: no module '{override[role]}' in a {type(block).__name__}; "
                              f"it has: {', '.join(n for n in names if n)}")
        return override[role]
    for cand in SUBLAYERS[role]:
        if cand in names:
            return cand
    raise ConfigError(f"{key}.{role}: none of {list(SUBLAYERS[role])} is in a {type(block).__name__}; "
                      f"name the module (one of: {', '.join(n for n in names if n)})")


def check_roles(override: dict[str, str], key: str = "method.modules") -> None:
    unknown = sorted(set(override) - set(SUBLAYERS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown role; valid roles: {', '.join(SUBLAYERS)}")
