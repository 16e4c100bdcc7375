"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

A frozen causal LM reads n trainable input embeddings P (n, d) before every example:
    p(y | x) = LM([P; E(x)])
Only P trains (n·d parameters). Initialisations: sampled vocabulary embeddings (the paper's better
choice), the embeddings of a text (e.g. a task instruction, as in Weyssow et al.'s code-generation
study), or random.

How we run it (tunelab.methods._prefix): the virtual tokens come first, so their keys and values
never depend on the example. P runs through the frozen model once per forward (positions 0..n-1),
each layer's K/V of P is captured, and every real token attends to that K/V prefix; the real
tokens sit at positions n, n+1, ... exactly as in [P; E(x)]. This equals the concatenated forward
(tested to float precision) while the output keeps the input's length, works for packed rows
(each example sees its own copy) and for left-padded KV-cached generation.

Output: tunelab's `tunelab_adapter.safetensors` (`prompt.embedding`, (n, d)) + `tunelab_adapter.json`,
and a PEFT PROMPT_TUNING adapter in `peft/` (adapter_config.json + adapter_model.safetensors):
`PeftModel.from_pretrained(base, "final/peft")` computes the same function, but its logits also
cover the n virtual positions (drop the first n). That is why the PEFT files are not at the top of
the output: there, the shared test table requires PEFT's logits to equal ours as they are.
Cannot be merged into the weights (the prompt is extra positions); disabling recovers the base.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.methods import register
from tunelab.methods._prefix import model_dims
from tunelab.methods._prompt_base import PrefixMethod, SoftPrompt, SoftPromptConfig, initial_prompt

PEFT_DIR = "peft"


@dataclass(kw_only=True)
class PromptTuningConfig(SoftPromptConfig):
    """Options of prompt tuning: the soft prompt's length and initialisation."""


@register("prompt_tuning")
class PromptTuning(PrefixMethod):
    """Soft prompt P (n, d) before every example; the model is frozen. See the module docstring."""

    Config = PromptTuningConfig
    attr = "prompt"

    def build(self, model):
        return SoftPrompt(initial_prompt(model, self.cfg))

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        super().save(model, tokenizer, out_dir, base_name)
        write_peft_prompt(Path(out_dir) / PEFT_DIR, self.source(model).prompt(), model, base_name)


def write_peft_prompt(out_dir: Path, prompt, model, base_name: str) -> None:
    """A PEFT PROMPT_TUNING adapter holding `prompt` (n, d)."""
    from safetensors.torch import save_file

    num_layers, _, _, hidden = model_dims(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": prompt.detach().contiguous()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "num_virtual_tokens": prompt.shape[0], "token_dim": hidden, "num_transformer_submodules": 1,
              "num_attention_heads": model.config.num_attention_heads, "num_layers": num_layers,
              "prompt_tuning_init": "RANDOM", "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
