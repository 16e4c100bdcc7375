"""What the prompt family (prompt_tuning, prefix_tuning, dept, ept, cpt) shares: the Method hooks
around a `PrefixSource` (frozen base, own safetensors output, exact disable, no merge), the soft
prompt with its initialisations, and finding the tokenizer for text options."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.methods import Method
from tunelab.methods._prefix import PrefixSource, PromptSource, attach_prefix, prefix_disabled
from tunelab.methods._shared import freeze_all, load_adapter, save_adapter
from tunelab.options import Options, require


@dataclass(kw_only=True)
class SoftPromptConfig(Options):
    ranges: ClassVar = {"num_virtual_tokens": ">= 1"}
    num_virtual_tokens: int = 20
    """n: how many virtual tokens the soft prompt has."""
    init: Literal["vocab", "text", "random"] = "vocab"
    """'vocab': embeddings of n random vocabulary tokens (Lester et al.'s sampled-vocabulary init);
    'text': embeddings of `init_text`, repeated or cut to n tokens; 'random': N(0, std of the
    embedding matrix)."""
    init_text: str | None = None
    """Text for init 'text' (e.g. a task instruction), tokenized with the model's tokenizer."""

    def validate(self) -> None:
        require((self.init == "text") == bool(self.init_text), "init_text",
                "required with init 'text' and only used with it")


def tokenizer_for(model, key: str):
    """The tokenizer saved beside the model (model.name_or_path); `key` names the option needing it."""
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "") or ""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{key}: needs the model's tokenizer, but none loads from '{path}' ({e}); "
                          "give token ids instead") from None


def initial_prompt(model, cfg: SoftPromptConfig) -> torch.Tensor:
    """(n, d) starting embeddings of the soft prompt, per `cfg.init` (global RNG: seeded by the run)."""
    emb = model.get_input_embeddings().weight.detach()  # (V, d)
    n = cfg.num_virtual_tokens
    if cfg.init == "random":
        return torch.randn(n, emb.shape[1], device=emb.device, dtype=emb.dtype) * emb.float().std().item()
    if cfg.init == "vocab":
        ids = torch.randint(0, emb.shape[0], (n,), device="cpu")  # the run's seeded CPU RNG, any device
    else:
        tok = tokenizer_for(model, "init_text")
        text_ids = tok(cfg.init_text, add_special_tokens=False)["input_ids"]
        if not text_ids:
            raise ConfigError("init_text: tokenizes to no tokens")
        ids = torch.tensor((text_ids * (n // len(text_ids) + 1))[:n], device="cpu")
    return emb[ids.to(emb.device)].clone()


class SoftPrompt(PromptSource):
    """Prompt tuning's prompt: a free (n, d) matrix of input embeddings."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.num_virtual_tokens = embedding.shape[0]
        self.embedding = nn.Parameter(embedding)

    def prompt(self) -> torch.Tensor:
        return self.embedding


class PrefixMethod(Method):
    """Shared hooks: the base model is frozen, the prefix source (submodule `attr`) trains.
    Output is `tunelab_adapter.safetensors` (names as in the model) + `tunelab_adapter.json`."""

    frozen_base = True

    supports_merge = False
    attr: ClassVar[str] = "prompt"

    def build(self, model) -> PrefixSource:
        """The prefix source for `model` (on its device, freshly initialised)."""
        raise NotImplementedError

    def apply(self, model):
        freeze_all(model)
        source = self.build(model)
        attach_prefix(model, source, name=self.attr)
        for p in source.parameters():
            p.requires_grad_(True)
        return model

    def source(self, model) -> PrefixSource:
        return getattr(model, self.attr)

    def trainable_state(self, model):
        return {f"{self.attr}.{n}": p.detach() for n, p in self.source(model).named_parameters()}

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        save_adapter(out_dir, self, self.trainable_state(model), base_name)

    def load(self, model, out_dir: Path) -> None:
        self.load_trainable_state(model, load_adapter(out_dir, self))

    def merge(self, model):
        raise TunelabError(f"method '{self.name}' cannot be merged into a plain model: its virtual tokens "
                           "are extra attention positions, not a weight change; export without merging")

    @contextmanager
    def disabled(self, model):
        with prefix_disabled(model):
            yield
