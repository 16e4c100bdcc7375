"""LongLoRA's parameterization (Chen et al., ICLR 2024): LoRA plus trainable embeddings and norms.

LongLoRA extends the context of a pretrained model with S²-Attn during training (an attention
option: `model.attention.pattern: s2`, see tunelab/models/shifted.py), position interpolation
(`model.rope_scaling: {type: linear, factor: ...}`) and this parameterization: LoRA (r=8, alpha=16,
no dropout) on the attention projections q, k, v, o, and the input embeddings and every
normalisation layer trained in full (`trainable_params="embed,norm"` in its code). The paper found
LoRA alone falls well short of full fine-tuning for context extension and the embeddings and
norms, ~2% of the parameters of Llama 2 7B, close most of the gap.

Output: a PEFT adapter whose `modules_to_save` lists the fully trained modules (with
`ensure_weight_tying` when the output head is tied to the embeddings, so PEFT re-ties them), which
`PeftModel.from_pretrained(base, dir)` loads. Disabling restores the base values of those modules
(a copy is kept) and switches LoRA off.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import ConfigError
from tunelab.methods import register
from tunelab.methods.lora import PEFT_PREFIX, LoRA, LoRAConfig


@dataclass(kw_only=True)
class LongLoRAConfig(LoRAConfig):
    r: int = 8
    """Rank of the update (LongLoRA: 8)."""
    alpha: float = 16.0
    """Scale numerator (LongLoRA: 16)."""
    target_modules: list[str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Linear layers with a LoRA update (LongLoRA: the attention projections)."""
    trainable: list[str] = ("embed_tokens", "norm")
    """Modules trained in full, matched as PEFT's modules_to_save (a module name ending with the
    entry): LongLoRA's 'embed,norm' is the input embeddings and every norm layer."""

    def validate(self) -> None:
        super().validate()
        self.trainable = list(self.trainable)


@register("longlora")
class LongLoRA(LoRA):
    """LoRA on the selected layers, plus the `trainable` modules in full; everything else frozen."""

    Config = LongLoRAConfig

    def apply(self, model):
        super().apply(model)
        self.extra_modules = [n for n, m in model.named_modules()
                              if n and any(n.endswith(p) for p in self.cfg.trainable) and next(m.parameters(False), None) is not None]
        if not self.extra_modules:
            raise ConfigError(f"method.trainable: {self.cfg.trainable} matches no module with parameters")
        self._base = {}
        for name in self.extra_modules:
            for pname, p in model.get_submodule(name).named_parameters(recurse=False):
                p.requires_grad_(True)
                self._base[f"{name}.{pname}"] = p.detach().clone()
        return model

    def trainable_state(self, model):
        params = dict(model.named_parameters())
        return super().trainable_state(model) | {n: params[n].detach() for n in self._base if n in params}

    def _peft_config(self, base_name: str) -> dict:
        tied = getattr(self, "_tied", False)
        return super()._peft_config(base_name) | {"modules_to_save": sorted(set(self.cfg.trainable)),
                                                  "ensure_weight_tying": tied}

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        """LoRA's PEFT adapter, plus the fully trained modules; a tied output head is written under
        its own name too (PEFT re-ties it with `ensure_weight_tying` and expects both)."""
        from safetensors.torch import save_file

        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        self._tied = head is not None and head.weight is emb.weight and any(
            n.endswith(".weight") and dict(model.named_parameters()).get(n) is emb.weight for n in self._base)
        state = self.trainable_state(model)
        if self._tied:
            head_name = next(n for n, m in model.named_modules() if m is head)
            state[f"{head_name}.weight"] = head.weight.detach().clone()  # its own storage: safetensors refuses shared ones
        save_file({PEFT_PREFIX + n: t.contiguous() for n, t in state.items()},
                  str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out_dir / "adapter_config.json").write_text(json.dumps(self._peft_config(base_name), indent=2))

    def load(self, model, out_dir: Path) -> None:
        from safetensors.torch import load_file

        state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(out_dir / "adapter_model.safetensors")).items()}
        self.load_trainable_state(model, {k: v for k, v in state.items() if k in self.trainable_state(model)})

    @contextmanager
    def disabled(self, model):
        params = dict(model.named_parameters())
        trained = {n: params[n].detach().clone() for n in self._base}
        with torch.no_grad():
            for n, t in self._base.items():
                params[n].copy_(t)
        try:
            with super().disabled(model):
                yield
        finally:
            with torch.no_grad():
                for n, t in trained.items():
                    params[n].copy_(t)

