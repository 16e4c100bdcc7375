"""Layer recipes: full-weight fine-tuning that treats layers differently by depth.

One method, `layers`, whose options compose (they are four views of one idea, "what trains, and
how fast, depends on the layer", so one depth map serves all of them):

- `freeze_below: k` (Tinn et al. 2023, "Fine-tuning large neural language models for biomedical
  NLP"): the embeddings and blocks 0..k-1 are frozen.
- `lr_decay: ξ` (layer-wise learning-rate decay, same paper): block l of L trains at lr·ξ^(L-1-l);
  the top block, the final norm and the head at lr; the embeddings, one level below block 0, at
  lr·ξ^L (the paper allows ξ^L or ξ^(L+1); we take ξ^L).
- `reinit_top: k` (same paper): the top k blocks are re-initialised with the model's own
  initializer (transformers' `_init_weights`: N(0, initializer_range) linears, norms at 1).
- `only: embeddings_head` (Zlotchevski et al. 2022, "lightweight fine-tuning", L-EO): only the
  token embeddings and the output layer train. Their other variant (the last decoder block) is
  `freeze_below: L-1`, which also trains the final norm and head.

Depth is found on any nn.Module stack: blocks are the largest list of same-typed modules (see
`_blocks`); parameters registered before the first block are the embeddings (depth -1), after the
last one the final norm and head (depth L).

Tied embeddings (SmolLM2 and the tiny test model tie lm_head to embed_tokens): the one matrix is
both the lowest and the top layer. We read it as the head (it is the output layer the recipes
keep training): it trains at lr even when `freeze_below` freezes the embeddings, and a warning
says so. Untie the model to freeze it.

Learning rates: each optimizer group carries `lr_scale` = ξ^(L-1-depth) (1 for the head), which the
optimizer turns into train.lr·lr_scale; the loop's schedule then scales every group alike.

Output: a complete HF model directory (as `full`), which `from_pretrained` loads; there is nothing
to merge, and no in-process base to fall back to (`disabled` is not supported).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods import register
from tunelab.methods._blocks import find_blocks
from tunelab.methods.full import FullFineTuning
from tunelab.options import Options, require

EMBEDDINGS = -1


@dataclass(kw_only=True)
class LayersConfig(Options):
    ranges: ClassVar = {"freeze_below": ">= 0", "reinit_top": ">= 0", "lr_decay": "(0, 1]"}
    only: Literal["all", "embeddings_head"] = "all"
    """What may train: 'all' parameters, or 'embeddings_head' (token embeddings + output layer)."""
    freeze_below: int = 0
    """Freeze the embeddings and the lowest k transformer blocks (0: freeze nothing)."""
    lr_decay: float = 1.0
    """Layer-wise lr decay ξ in (0, 1]: block l trains at lr·ξ^(L-1-l), embeddings at lr·ξ^L."""
    reinit_top: int = 0
    """Re-initialise the top k transformer blocks with the model's initializer before training."""
    blocks: str | None = None
    """Regex for the name of the nn.ModuleList of transformer blocks; default: the largest one."""

    def validate(self) -> None:
        require(self.only != "embeddings_head" or not (self.freeze_below or self.reinit_top), "only",
                "'embeddings_head' trains no transformer block; drop freeze_below and reinit_top")


def _tied(model: nn.Module) -> nn.Parameter | None:
    """The embedding matrix shared with the output head, if the model ties them."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is not None and out is not None and out.weight is inp.weight:
        return inp.weight
    return None


def parameter_depths(model: nn.Module, blocks_name: str, num_blocks: int) -> dict[str, int]:
    """Parameter name -> depth: -1 below the blocks, l in block l, L above (tied embeddings: L)."""
    tied = _tied(model)
    depths, seen_block = {}, False
    for n, p in model.named_parameters():
        if n.startswith(blocks_name + "."):
            depths[n], seen_block = int(n[len(blocks_name) + 1:].split(".")[0]), True
        else:
            depths[n] = num_blocks if (seen_block or p is tied) else EMBEDDINGS
    return depths


def reinit_(model: nn.Module, module: nn.Module) -> None:
    """Re-run the model's initializer on every submodule of `module`. transformers marks loaded
    weights `_is_hf_initialized` so that `_init_weights` skips them; lift the mark meanwhile."""
    init = getattr(model, "_init_weights", None)
    for sub in module.modules():
        params = list(sub.parameters(recurse=False))
        for p in params:
            p._is_hf_initialized = False
        if init is not None:
            init(sub)
        elif hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
        for p in params:
            p._is_hf_initialized = True


@register("layers")
class LayerRecipes(FullFineTuning):
    """Freeze lower layers / layer-wise lr decay / re-initialise top layers (Tinn et al.) and
    lightweight embeddings + head fine-tuning (Zlotchevski et al.); see the module docstring."""

    Config = LayersConfig

    def apply(self, model):
        cfg = self.cfg
        blocks_name, blocks = find_blocks(model, cfg.blocks)
        L = len(blocks)
        for name in ("freeze_below", "reinit_top"):
            if getattr(cfg, name) > L:
                raise ConfigError(f"method.{name}: {getattr(cfg, name)} exceeds the model's {L} blocks")
        if L - cfg.reinit_top < cfg.freeze_below:
            raise ConfigError(f"method.reinit_top: re-initialised blocks {L - cfg.reinit_top}..{L - 1} "
                              f"would be frozen by freeze_below={cfg.freeze_below}")
        with torch.no_grad():
            for block in list(blocks)[L - cfg.reinit_top:]:
                reinit_(model, block)
        self.depths = parameter_depths(model, blocks_name, L)
        self.num_blocks = L
        trainable = self._trainable(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        return model

    def _trainable(self, model) -> set[str]:
        cfg = self.cfg
        if cfg.only == "embeddings_head":
            keep = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                    if m is not None for p in m.parameters()}
            return {n for n, p in model.named_parameters() if id(p) in keep}
        if cfg.freeze_below and _tied(model) is not None:
            warnings.warn("method.freeze_below: the input embeddings are tied to the output head, "
                          "so they keep training with the head")
        return {n for n, d in self.depths.items() if not cfg.freeze_below or d >= cfg.freeze_below}

    def lr_scale(self, depth: int) -> float:
        """ξ^(L-1-depth) for a block or the embeddings; 1 for the head (depth L)."""
        return self.cfg.lr_decay ** max(0, self.num_blocks - 1 - depth)

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        """One group per (depth, matrix or vector): decay on matrices only, each with its lr scale."""
        groups: dict[tuple[int, bool], dict] = {}
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            d, matrix = self.depths[n], p.ndim >= 2
            g = groups.setdefault((d, matrix), {"params": [], "weight_decay": weight_decay if matrix else 0.0,
                                                "depth": d, "lr_scale": self.lr_scale(d)})
            g["params"].append(p)
        return [groups[k] for k in sorted(groups)]
