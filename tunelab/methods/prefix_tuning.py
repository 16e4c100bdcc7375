"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every attention layer l gets n trainable key/value vectors per KV head, P_k^l, P_v^l (n, head_dim);
each query attends over [P_k^l; K] and [P_v^l; V]. He et al. (2022) show this is a gated parallel
modification of the head output:
    head = (1 - λ(x))·softmax(q Kᵀ) V + λ(x)·softmax(q P_kᵀ) P_v,
    λ(x) = Σ_i exp(q·P_k,i) / (Σ_i exp(q·P_k,i) + Σ_j exp(q·K_j))
(tested numerically on a layer of the tiny model). The prefix keys carry no position encoding;
the real tokens sit at positions n, n+1, ... as in PEFT (with RoPE only their relative positions
matter, so this changes nothing there; with absolute positions it matches PEFT).

Reparameterisation (the paper's, for stable optimisation; PEFT's `prefix_projection`): with
`projection_hidden` > 0, the prefix table is MLP(E) = W2 tanh(W1 E + b1) + b2 of a (n, d) matrix E,
trained instead of the table; only the folded table is needed afterwards. Without it the table
trains directly, initialised by default from the K/V of n random vocabulary tokens run through the
model (Li & Liang report real-token activations start better than noise); 'random' is N(0, 1), PEFT's.

Output: a PEFT PREFIX_TUNING adapter (adapter_config.json + adapter_model.safetensors with the
folded table `prompt_embeddings`, (n, layers·2·kv_heads·head_dim)); `PeftModel.from_pretrained`
gives our logits (tested to 1e-6). With the MLP, `tunelab_adapter.safetensors` also keeps E and the
MLP so `load` restores training state exactly. Cannot be merged into weights; disable recovers the base.
The prefix mechanism is tunelab.methods._prefix (also used by the MAM adapter).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from tunelab.errors import ConfigError
from tunelab.methods import register
from tunelab.methods._prefix import PrefixKV, model_dims
from tunelab.methods._prompt_base import PrefixMethod
from tunelab.methods._shared import WEIGHTS_FILE
from tunelab.options import Options

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass(kw_only=True)
class PrefixTuningConfig(Options):
    ranges: ClassVar = {"num_virtual_tokens": ">= 1", "projection_hidden": ">= 0"}
    num_virtual_tokens: int = 20
    """n: prefix length (key/value vectors per layer and KV head)."""
    projection_hidden: int = 0
    """Width of the reparameterising MLP during training (Li & Liang use 512); 0 trains the table directly."""
    init: Literal["vocab", "random"] = "vocab"
    """Start of a directly trained table: 'vocab' = K/V of n random vocabulary tokens, 'random' =
    N(0, 1). With the MLP, E is N(0, 1) (PEFT's)."""


@register("prefix_tuning")
class PrefixTuning(PrefixMethod):
    """Learned per-layer key/value prefixes; the model is frozen. See the module docstring."""

    Config = PrefixTuningConfig
    attr = "prefix"

    def build(self, model):
        return PrefixKV.for_model(model, self.cfg.num_virtual_tokens, self.cfg.projection_hidden or None,
                                  init=self.cfg.init)

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        if self.cfg.projection_hidden:  # E and the MLP, to resume or reload exactly
            super().save(model, tokenizer, out_dir, base_name)
        table = self.source(model).table().detach().contiguous()
        save_file({"prompt_embeddings": table}, str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
        (out_dir / PEFT_CONFIG).write_text(json.dumps(self._peft_config(model, base_name), indent=2))

    def _peft_config(self, model, base_name: str) -> dict:
        num_layers, kv_heads, head_dim, hidden = model_dims(model)
        return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
                "num_virtual_tokens": self.cfg.num_virtual_tokens, "token_dim": kv_heads * head_dim,
                "num_transformer_submodules": 1, "num_attention_heads": kv_heads, "num_layers": num_layers,
                "encoder_hidden_size": hidden, "prefix_projection": False, "inference_mode": True}

    def load(self, model, out_dir: Path) -> None:
        from safetensors.torch import load_file

        out_dir = Path(out_dir)
        if self.cfg.projection_hidden:
            if not (out_dir / WEIGHTS_FILE).exists():
                raise ConfigError(f"{out_dir}: has no {WEIGHTS_FILE} with the prefix MLP; load it with "
                                  "method.projection_hidden: 0 (the folded table)")
            return super().load(model, out_dir)
        table = load_file(str(out_dir / PEFT_WEIGHTS))["prompt_embeddings"]
        self.load_trainable_state(model, {f"{self.attr}.weight": table})
