"""The `model` section of the run config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tunelab.options import Options


@dataclass(kw_only=True)
class ModelConfig(Options):
    name: str = "smollm2-135m"
    """A built-in name (`tunelab models list`), a local HF model directory, a hub id, or a .gguf file."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off unless you turn it on."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the base weights. Keep float32 on CPU; precision of compute is train.precision."""
    attn_implementation: Literal["sdpa", "sdpa_masked", "eager"] = "sdpa"
    """Attention kernel. `sdpa` runs PyTorch SDPA; for packed rows tunelab runs it per example
    (tunelab.models.attention), which gives the same result without cross-example work;
    `sdpa_masked` is transformers' SDPA with a block-diagonal mask over the whole packed row."""
    allow_pickle: bool = False
    """Allow loading pickle-based weights (.bin/.pt); even then they load with weights_only=True."""


def looks_like_path(name: str) -> bool:
    """A model name that can only be a path: it starts with /, ./, ../ or ~, names a .gguf file,
    or has more than one '/' (a hub id is `org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or \
        name.lower().endswith(".gguf") or name.count("/") > 1
