"""Full fine-tuning: every parameter trains; the output is a complete HF model directory."""
from __future__ import annotations

from pathlib import Path

from tunelab.methods import Method, register


@register("full")
class FullFineTuning(Method):
    """All weights train (tied embeddings count once). `save` writes a `from_pretrained`-ready
    directory in safetensors; there is nothing to merge and no base to fall back to in-process
    (load the base model separately to compare)."""

    supports_disable = False
    parallel = ("fsdp", "ddp")

    def apply(self, model):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, model, out_dir: Path) -> None:
        # through transformers' own loader: it maps the names save_pretrained wrote back to the
        # model's (GPT-NeoX saves lm_head as embed_out) and ties what is tied
        saved = type(model).from_pretrained(out_dir, dtype=model.dtype, use_safetensors=True,
                                            attn_implementation="eager")  # only its weights are used
        missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"{out_dir}: weights do not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
