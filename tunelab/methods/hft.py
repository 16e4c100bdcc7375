"""HFT: Half Fine-Tuning (Hui et al., ACL 2025, arXiv 2404.18466).

Full fine-tuning in which half of each transformer block's parameters are frozen, chosen at
module (matrix) level, never element-wise, and re-chosen for each stage; the update is
theta <- theta - lr * (m ⊙ grad) with m in {0, 1} fixed within a stage. The per-layer rule at
ratio 1/2 (from a public re-implementation, `gucci-j/ssu`; the paper gives no code):
  attention  2 of {q, k, v, o} frozen, at random;
  FFN        a random L // 2 of the L layers freeze 2 of {gate, up, down}, the others 1 (1.5 / 3);
  norms      1 of {input_layernorm, post_attention_layernorm} frozen (`freeze_norms`).
Readings we chose: embeddings, the head and the final norm are left trainable, as in the
re-implementation (`embeddings_and_head: freeze` freezes them); a stage is a run, or
`reselect_every` steps within a run; stage j draws its half from the seed and j alone, so a
resumed run re-derives it. Tensors leaving the trainable half drop their Adam state; those
entering it start with fresh moments.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

from tunelab.errors import ConfigError
from tunelab.methods import register
from tunelab.methods import _sparse as S
from tunelab.options import Options
from tunelab.run.context import StepContext

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?([^.]+)\.[^.]+$")   # -> (layer index, module leaf)


@dataclass(kw_only=True)
class HFTConfig(Options):
    ranges: ClassVar = {"reselect_every": ">= 0"}
    seed: int = 0
    """Seeds which half is frozen (use a new seed for each stage of a multi-run pipeline)."""
    reselect_every: int = 0
    """Re-choose the frozen half every this many steps (0: once, for the whole run = one stage)."""
    freeze_norms: bool = True
    """Also freeze 1 of the 2 norms of each layer (the re-implementation does; the paper: unverified)."""
    embeddings_and_head: Literal["train", "freeze"] = "train"
    """Embeddings, final norm and output head: trained (re-implementation) or frozen."""


def layer_modules(names: list[str]) -> dict[int, dict[str, list[str]]]:
    """{layer index: {module leaf (q_proj, ...): [its parameter names]}}."""
    out: dict[int, dict[str, list[str]]] = {}
    for n in names:
        if m := LAYER.search(n):
            out.setdefault(int(m.group(1)), {}).setdefault(m.group(2), []).append(n)
    return out


def frozen_half(names: list[str], seed: int, stage: int, freeze_norms: bool = True) -> set[str]:
    """The parameter names HFT freezes in `stage` (a pure function of the names, seed and stage)."""
    layers = layer_modules(names)
    if not any(set(mods) & set(ATTENTION + FFN) for mods in layers.values()):
        raise ConfigError("method hft: found no transformer layers with q/k/v/o_proj and "
                          "gate/up/down_proj modules (Llama-family names are supported)")
    rng = random.Random(f"hft:{seed}:{stage}")
    two = set(rng.sample(sorted(layers), len(layers) // 2))
    frozen: set[str] = set()
    for i in sorted(layers):
        picks = [(ATTENTION, 2), (FFN, 2 if i in two else 1)] + ([(NORMS, 1)] if freeze_norms else [])
        for category, count in picks:
            present = [leaf for leaf in category if leaf in layers[i]]
            for leaf in rng.sample(present, min(count, len(present))):
                frozen.update(layers[i][leaf])
    return frozen


@register("hft")
class HalfFineTuning(S.TensorSelection):
    """Half fine-tuning; see the module docstring."""

    Config = HFTConfig

    def apply(self, model):
        names = [n for n, _ in model.named_parameters()]
        outer = self.cfg.embeddings_and_head == "train"         # embeddings, final norm, head
        self._init_selection(model, [n for n in names if outer or LAYER.search(n)])
        self._restore(model)
        return model

    def stage(self, step: int) -> int:
        return step // self.cfg.reselect_every if self.cfg.reselect_every else 0

    def trainable_names(self, stage: int) -> set[str]:
        return set(self.candidates) - frozen_half(self.candidates, self.cfg.seed, stage, self.cfg.freeze_norms)

    def _restore(self, model) -> None:
        self.set_trainable(model, self.trainable_names(self.stage(self._step(model))))

    def on_step(self, model, ctx: StepContext, optimizer) -> None:
        self.mark_trained()
        self._set_step(model, ctx.step)
        if self.cfg.reselect_every and ctx.step % self.cfg.reselect_every == 0:
            self.set_trainable(model, self.trainable_names(self.stage(ctx.step)), optimizer)

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        super().save(model, tokenizer, out_dir, base_name)
        meta = {"options": asdict(self.cfg), "stage": self.stage(self._step(model)), "base_model": base_name}
        (Path(out_dir) / "hft.json").write_text(json.dumps(meta, indent=2))
