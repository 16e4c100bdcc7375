"""LocFT: fine-tuning of one module (Yang et al. 2025, "Fine-tuning done right in model editing",
arXiv 2509.22072; reference ICT-STAR/LocFT fine-tune.py).

Only the parameters of one module train: `{blocks}.{layer}.{module}`, by default one block's MLP
down-projection (`model.layers.L.mlp.down_proj`, LocFT's Llama-3 and Qwen2.5 configs; their Mistral
config trains the whole block, `module: ''`). Everything else is frozen and stays bit-identical.
The paper's location differs per model (Qwen2.5-7B layer 6, Llama-3-8B 22, Mistral-7B 23 of 28/32/32
blocks); our default, `layer: null`, is the block at 3/4 of the depth (a secondary summary's "late
MLP-down" reading); `tunelab edit --sweep` picks one by a small sweep instead.

Output: the trained module's tensors in tunelab's adapter file (a few MB), loaded back into the base;
`merge` is the edited model itself (the change is already in its weights); `disabled` swaps the
original tensors back in for the duration (they are kept when `apply` runs).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods import Method, register
from tunelab.methods._blocks import find_blocks
from tunelab.methods._shared import freeze_all, load_adapter, save_adapter
from tunelab.options import Options


@dataclass(kw_only=True)
class LocFTConfig(Options):
    layer: int | None = None
    """The block whose module trains (negative: from the top); null: the block at 3/4 of the depth."""
    module: str = "mlp.down_proj"
    """The module inside the block ('' for the whole block)."""
    blocks: str | None = None
    """Regex for the name of the list of transformer blocks; default: the largest one."""


def chosen_module(model: nn.Module, cfg: LocFTConfig) -> str:
    """The full name of the module LocFT trains; a layer or module that is not there is a ConfigError."""
    name, blocks = find_blocks(model, cfg.blocks)
    n = len(blocks)
    layer = round(0.75 * (n - 1)) if cfg.layer is None else cfg.layer
    if not -n <= layer < n:
        raise ConfigError(f"method.layer: {layer} is out of range; the model has {n} blocks (0..{n - 1})")
    full = f"{name}.{layer % n}" + (f".{cfg.module}" if cfg.module else "")
    names = dict(model.named_modules())
    if full not in names:
        inside = sorted({k.split(".", 1)[1] for k in dict(blocks[0].named_modules()) if "." in k} |
                        {k for k in dict(blocks[0].named_modules()) if k and "." not in k})
        raise ConfigError(f"method.module: no module '{cfg.module}' in block {layer % n}; a block has: "
                          f"{', '.join(inside)}")
    return full


@register("locft")
class LocFT(Method):
    """One module trains (LocFT's `rewrite_module`); all other weights are frozen."""

    Config = LocFTConfig
    parallel = ("ddp",)

    def apply(self, model):
        self.module_name = chosen_module(model, self.cfg)
        freeze_all(model)
        prefix = self.module_name + "."
        self._names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
        for n, p in model.named_parameters():
            if n in self._names:
                p.requires_grad_(True)
        self._original = {n: p.detach().clone() for n, p in model.named_parameters() if n in self._names}
        return model

    def trainable_state(self, model) -> dict:
        return {n: p.detach() for n, p in model.named_parameters() if n in self._names}

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        save_adapter(out_dir, self, self.trainable_state(model), base_name, module=self.module_name)

    def load(self, model, out_dir: Path) -> None:
        self.load_trainable_state(model, load_adapter(out_dir, self))

    @contextmanager
    def disabled(self, model) -> Iterator[None]:
        params = dict(model.named_parameters())
        edited = {n: params[n].detach().clone() for n in self._names}
        with torch.no_grad():
            for n, t in self._original.items():
                params[n].copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in edited.items():
                    params[n].copy_(t)
