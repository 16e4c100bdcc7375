"""CPT: Context-aware Prompt Tuning (Blau et al., arXiv 2410.17222); HF PEFT's `PeftType.CPT`.

The prompt is an in-context-learning context: k demonstrations, templated, tokenized to ids c
(n tokens) with a type per token, code 4·j + t for demonstration j and t = 1 input template,
2 input text, 3 output template, 4 label. CPT tunes the context's embeddings:
    prompt_t = E(c_t) + δ_t,   δ (n, d) starting at 0,
with three constraints from the paper / PEFT's implementation:
  * only template and input tokens move: δ_t is multiplied by a 0/1 row mask, so label tokens (and
    code-0 tokens) keep δ_t = 0 and their gradient is exactly 0;
  * projected gradient descent: after every optimizer step (`on_step`) each row is pulled back into
    its ε-ball, δ_t ← δ_t · ε_t / max(‖δ_t‖, ε_t), ε_t = ε_format·√(d/2048) for template tokens and
    ε_input·√(d/2048) for input tokens (PEFT projects at each forward; after each step is the same
    constraint for every forward that follows);
  * the loss also covers the context's label tokens, optionally decayed: label group g gets weight
    γ^(distance from the last group), the query's own label (last) weight 1.

Readings chosen: the query's label loss is the run's objective (e.g. SFT); the context's label loss
is computed from the prompt's own forward (it does not depend on the query, the model is causal)
and joined to the backward as an auxiliary term, counted once per example in the forward like
PEFT's per-example copy of the context. PEFT divides the sum by all label tokens, the loop by the
query's: a constant factor per step. The logged loss is the objective's; `cpt_context_loss` is
logged beside it. The context runs as a K/V prefix (tunelab.methods._prefix); with δ = 0 the
model equals the plain ICL concatenation [c; x] (tested). Needs a decoder-only causal LM.

Context: give `token_ids` + `type_mask` (PEFT's cpt_token_ids / cpt_tokens_type_mask), or
`demonstrations` ([input, output] pairs) with the two templates, tokenized with the model's tokenizer.
Output: tunelab's own safetensors (`cpt.delta`); the context ids live in the saved options. PEFT's CPT
adapter stores more (a frozen copy of E(c)) and returns logits over the context too, so we do not
write it. No merge (the context is extra positions); disable recovers the base model.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods import register
from tunelab.methods._prefix import PrefixSource, prompt_kv
from tunelab.methods._prompt_base import PrefixMethod, tokenizer_for
from tunelab.options import Options
from tunelab.run.context import StepContext


@dataclass(kw_only=True)
class CPTConfig(Options):
    ranges: ClassVar = {"epsilon_input": ">= 0", "epsilon_format": ">= 0", "decay": "(0, 1]"}
    token_ids: list[int] = field(default_factory=list)
    """The context's token ids (PEFT's cpt_token_ids); or use `demonstrations`. With neither, PEFT's
    placeholder context [0] (one template token) and a warning."""
    type_mask: list[int] = field(default_factory=list)
    """Per-token type codes 4·j + t (t: 1 input template, 2 input, 3 output template, 4 label; 0 other)."""
    demonstrations: list[list[str]] = field(default_factory=list)
    """[input, output] pairs, templated and tokenized into the context (instead of token_ids)."""
    input_template: str = "input: {}\n"
    """Template of a demonstration's input; '{}' marks the input text."""
    output_template: str = "output: {}\n\n"
    """Template of a demonstration's output; '{}' marks the label."""
    epsilon_input: float = 0.1
    """ε for input tokens (scaled by √(d/2048))."""
    epsilon_format: float = 0.1
    """ε for template tokens (scaled by √(d/2048))."""
    context_loss: bool = True
    """Also train on the context's label tokens (CPT's loss)."""
    loss_weighting: Literal["none", "decay"] = "none"
    """'decay': label group g weighs γ^(groups after it) (PEFT's opt_weighted_loss_type)."""
    decay: float = 1.0
    """γ for 'decay' (PEFT's opt_loss_decay_factor; its tests use 0.95)."""

    def validate(self) -> None:
        if self.token_ids and self.demonstrations:
            raise ConfigError("token_ids: give either token_ids (+ type_mask) or demonstrations, not both")
        if not self.token_ids and not self.demonstrations:  # PEFT's placeholder context
            warnings.warn("method.demonstrations: CPT got no context; using PEFT's placeholder (token id 0, "
                          "one template token), which makes it a 1-token prompt tuning")
            self.token_ids, self.type_mask = [0], [1]
        if self.token_ids and len(self.type_mask) != len(self.token_ids):
            raise ConfigError(f"type_mask: needs one code per token id ({len(self.token_ids)}), "
                              f"got {len(self.type_mask)}")
        if any(t < 0 for t in self.type_mask):
            raise ConfigError("type_mask: codes must be >= 0")
        if any(len(d) != 2 for d in self.demonstrations):
            raise ConfigError("demonstrations: each must be an [input, output] pair")
        for key in ("input_template", "output_template"):
            if getattr(self, key).count("{}") != 1:
                raise ConfigError(f"{key}: must contain '{{}}' exactly once")


def encode_demonstrations(tokenizer, cfg: CPTConfig) -> tuple[list[int], list[int]]:
    """(ids, type codes) of the templated demonstrations, each piece tokenized on its own."""
    ids, types = [], []
    for j, (inp, out) in enumerate(cfg.demonstrations):
        for template, text, fmt, code in ((cfg.input_template, inp, 1, 2), (cfg.output_template, out, 3, 4)):
            before, after = template.split("{}")
            for piece, t in ((before, fmt), (text, code), (after, fmt)):
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
                ids += piece_ids
                types += [4 * j + t] * len(piece_ids)
    return ids, types


def label_weights(type_mask: torch.Tensor, decay: float) -> torch.Tensor:
    """(n,) weight per token: label tokens of the g-th label group from the end (the query, after
    the context, is group 0) get decay^(g), i.e. the context's last group decay^1; others 0."""
    is_label = (type_mask > 0) & (type_mask % 4 == 0)
    groups = type_mask[is_label].unique().flip(0)  # last group first
    w = torch.zeros(type_mask.shape, dtype=torch.float32, device=type_mask.device)
    for g, code in enumerate(groups.tolist(), start=1):
        w[type_mask == code] = decay ** g
    return w


class _WithAuxLoss(torch.autograd.Function):
    """Identity on x; its backward also back-propagates `aux` with gradient 1: `aux` joins the
    loss that x feeds into, once per backward."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_like = (aux.dtype, aux.device)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        dtype, device = ctx.aux_like
        return grad, torch.ones((), dtype=dtype, device=device)


class CPTContext(PrefixSource):
    """The context c with its bounded, masked embedding offset δ."""

    def __init__(self, token_ids: list[int], type_mask: list[int], cfg: CPTConfig, head: nn.Module, like):
        super().__init__()
        self.num_virtual_tokens, self.cfg = len(token_ids), cfg
        types = torch.tensor(type_mask, device=like.device)
        d = like.shape[1]
        self.register_buffer("token_ids", torch.tensor(token_ids, device=like.device), persistent=False)
        self.register_buffer("type_mask", types, persistent=False)
        fmt, inp = (types > 0) & (types % 4 % 2 == 1), (types > 0) & (types % 4 == 2)  # codes 1, 3 | 2
        eps = torch.zeros(len(token_ids), device=like.device)
        eps[fmt], eps[inp] = cfg.epsilon_format * math.sqrt(d / 2048), cfg.epsilon_input * math.sqrt(d / 2048)
        self.register_buffer("epsilon", eps.to(like), persistent=False)  # (n,)
        self.register_buffer("movable", (fmt | inp).to(like)[:, None], persistent=False)  # (n, 1)
        w = label_weights(types, cfg.decay if cfg.loss_weighting == "decay" else 1.0)
        self.register_buffer("label_weight", w.to(like), persistent=False)  # (n,)
        self.delta = nn.Parameter(torch.zeros(len(token_ids), d, device=like.device, dtype=like.dtype))
        self.__dict__["head"] = head  # the model's output layer, not a submodule of ours (frozen, shared)
        self.last_context_loss = float("nan")

    def embeds(self, decoder) -> torch.Tensor:
        """(n, d): E(c) + δ on movable rows."""
        return decoder.get_input_embeddings()(self.token_ids) + self.delta * self.movable

    def context_loss(self, hidden: torch.Tensor) -> torch.Tensor:
        """Σ_t w_t CE(head(h_{t-1}), c_t) over the context's label tokens t >= 1; hidden (1, n, d)."""
        w = self.label_weight[1:]
        keep = w > 0
        logits = self.head(hidden[0, :-1][keep]).float()  # (k, V)
        ce = F.cross_entropy(logits, self.token_ids[1:][keep], reduction="none")
        return (ce * w[keep]).sum()

    def kv(self, decoder, num_examples: int = 1):
        hidden, kvs = prompt_kv(decoder, self.embeds(decoder).to(decoder.get_input_embeddings().weight.dtype))
        if self.cfg.context_loss and self.training and torch.is_grad_enabled() and bool((self.label_weight > 0).any()):
            aux = self.context_loss(hidden)
            self.last_context_loss = float(aux.detach()) / float((self.label_weight > 0).sum())
            k0, v0 = kvs[0]
            kvs = [(_WithAuxLoss.apply(k0, num_examples * aux), v0)] + kvs[1:]
        return kvs

    @torch.no_grad()
    def project(self) -> None:
        """δ_t ← δ_t · ε_t / max(‖δ_t‖, ε_t); rows that may not move stay 0."""
        norms = self.delta.norm(dim=1)  # (n,)
        factor = torch.where(norms > self.epsilon, self.epsilon / norms.clamp_min(1e-30), torch.ones_like(norms))
        self.delta.mul_((factor[:, None] * self.movable).to(self.delta.dtype))


@register("cpt")
class CPT(PrefixMethod):
    """Context-aware prompt tuning: a tuned ICL context with ε-bounded embedding offsets. See the module docstring."""

    Config = CPTConfig
    attr = "cpt"

    def build(self, model):
        ids, types = self.cfg.token_ids, self.cfg.type_mask
        if self.cfg.demonstrations:
            ids, types = encode_demonstrations(tokenizer_for(model, "method.demonstrations"), self.cfg)
        emb = model.get_input_embeddings().weight
        if not ids or max(ids) >= emb.shape[0] or min(ids) < 0:
            raise ConfigError(f"method.token_ids: need ids in [0, {emb.shape[0]}) (the vocabulary)")
        return CPTContext(ids, types, self.cfg, model.get_output_embeddings(), emb)

    def on_step(self, model, ctx: StepContext, optimizer) -> None:
        self.source(model).project()

    def stats(self, model) -> dict[str, float]:
        value = self.source(model).last_context_loss
        return {"cpt_context_loss": value} if math.isfinite(value) else {}
