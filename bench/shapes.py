"""Models with random weights, built from a config: training speed does not depend on the weights,
so a GPU benchmark needs no checkpoint download. Each shape keeps the built-in model's tokenizer
(the data is tokenized by it) and its vocabulary size.

    python bench/shapes.py llama-1b OUT_DIR [KIT_DIR]

KIT_DIR holds a config.json and the tokenizer files (the built-in model's cache directory by
default; on a machine without it, a copy made with `make gpu-kit`).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SHAPES: dict[str, dict] = {
    "smollm2-135m": {},  # the built-in's own config
    # TinyLlama-1.1B's shape (22 layers, width 2048, GQA 32/4) with the built-in's vocabulary: 1.2B parameters
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=64, tie_word_embeddings=False, max_position_embeddings=4096),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16),  # for tests
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def shape_config(shape: str, kit: Path):
    """The LlamaConfig of `shape`: the kit's config with the shape's overrides."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    base = json.loads((kit / "config.json").read_text())
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        base.pop(key, None)
    return LlamaConfig(**(base | SHAPES[shape]))


def count_params(cfg) -> int:
    """Parameters of the model `cfg` describes (tied embeddings once), without allocating it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def build(shape: str, out: Path, kit: Path, seed: int = 0) -> Path:
    """Write a random-weight model of `shape` (fp32 safetensors) and the kit's tokenizer into `out`
    (once: an existing complete directory is reused)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    cfg = shape_config(shape, kit)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (kit / name).exists():
            shutil.copy2(kit / name, tmp / name)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    from tunelab.models import pull

    kit_dir = Path(sys.argv[3]) if len(sys.argv) > 3 else pull("smollm2-135m")
    print(build(sys.argv[1], Path(sys.argv[2]), kit_dir))
