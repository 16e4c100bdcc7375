"""Per-layer key/value prefixes for any transformers decoder: the one mechanism behind prompt tuning,
prefix tuning, DePT, EPT, CPT (and the prefix half of MAM adapters).

Why a K/V prefix and not a longer input. In a causal LM, n virtual tokens placed *first* have keys
and values that never depend on the real tokens. So "run the model on [P; x]" equals "run it on x
while every attention layer also attends to that layer's K/V of P" (He et al., 2022, the unified
view). Realised that way, the model's output keeps the input's length (objectives align logits
with `targets`), every example of a packed row sees its own copy of the prefix (attention is cut
per example with `cu_seq_lens_q`), padded and left-padded KV-cached generation work unchanged (the
prefix is never written into the cache), and the soft prompt runs through the model once per
forward, not once per example.

Public surface (used by prompt_tuning, prefix_tuning, dept, ept, cpt, and the MAM adapter):

    class PrefixSource(nn.Module)        # what produces the prefix; subclass it
        num_virtual_tokens: int
        kv(decoder, num_examples=1) -> list[(key, value)]  # one pair per layer, each (1, H_kv, n, D),
                                           # keys as the layer compares them with queries (RoPE applied);
                                           # num_examples: examples in this forward (a packed row counts
                                           # each), for sources that add a per-example auxiliary loss
        update_embeds(embeds, position_ids) -> embeds | None   # optional change of the input embeddings
                                           # (DePT's low-rank update); position_ids are the example's own
        cacheable: bool = True             # kv() may be reused while no parameter changed (eval only)

    class PromptSource(PrefixSource)     # prefix = K/V of a soft prompt run through the frozen model
        prompt() -> (n, d) embeddings      # subclass provides this
    class PrefixKV(PrefixSource)         # prefix tuning: learned K/V, optionally an MLP reparameterisation
        PrefixKV.for_model(model, num_virtual_tokens, projection_hidden=None, init="vocab")
        table() -> (n, L * 2 * H_kv * D) in PEFT's PREFIX_TUNING layout; kv_to_table() is its inverse

    attach_prefix(model, source, *, name, position_offset=None)
        Registers `source` as submodule `name` of `model` (its parameters are `<name>.*`), hooks the
        decoder, switches attention to "tunelab_prefix" (SDPA + prefix). The real tokens' positions are
        shifted by `position_offset` (default n) so they sit after the virtual tokens, as in PEFT.
    prefix_disabled(model)   context manager: the base model's exact function (original attention too)
    prompt_kv(decoder, embeds) -> (hidden (1, n, d), [(key, value)] per layer)

How it runs: a forward pre-hook on `model.get_decoder()` computes the prefixes and passes them to
the attention function as the keyword `tunelab_prefix` (transformers forwards extra decoder
keywords to every attention call). Passing them as an argument rather than storing them on modules
keeps gradient checkpointing's recomputation identical to the first forward. If something later
switches the model's attention (ssToken sets 'eager' to read attention weights), the hook routes
it back through the prefix attention and honours the wish: with 'eager', weights are computed
explicitly and returned over the real keys (the prefix columns dropped).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError

NAME = "tunelab_prefix"
PREFIX_KW = "tunelab_prefix"
"""Decoder keyword carrying `Prefixes`."""
CAPTURE_KW = "tunelab_capture"
"""Decoder keyword: a dict that attention fills with layer_idx -> (key, value) (prompt runs)."""
_STATE = "_tunelab_prefix_state"


class Prefixes(NamedTuple):
    """What the pre-hook hands every attention call of one forward."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (key, value), each (1, H_kv, n, D)."""
    eager: bool
    """The model was set to eager attention (e.g. an objective reads attention weights): compute
    the weights explicitly and return them, over the real keys."""


# -- attention ----------------------------------------------------------------------------------
def _causal(tq: int, tk: int, device) -> torch.Tensor:
    """(tq, tk) bool: query i sees key j iff j <= i + (tk - tq) (the last tq of tk positions)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)


def _with_prefix_columns(mask: torch.Tensor | None, n: int, tq: int, tk: int, device) -> torch.Tensor:
    """The model's mask over the real keys, with n always-visible prefix columns in front."""
    if mask is None:
        mask = _causal(tq, tk, device)[None, None]  # (1, 1, tq, tk)
    mask = mask[..., :tk]
    fill = True if mask.dtype == torch.bool else 0.0  # bool masks: True = attend; float: additive
    cols = torch.full((*mask.shape[:-1], n), fill, dtype=mask.dtype, device=device)
    return torch.cat([cols, mask], dim=-1)


def _sdpa(module, q, k, v, mask, dropout, scaling):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                          dropout_p=dropout if module.training else 0.0,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _eager(module, q, k, v, mask, dropout, scaling):
    """Explicit softmax attention, returning the weights too; k/v may have fewer (KV) heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * (scaling or q.shape[-1] ** -0.5)  # (B, H, Tq, n + Tk)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    w = F.dropout(scores.softmax(-1, dtype=torch.float32).to(q.dtype), p=dropout, training=module.training)
    return w @ v, w


def prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """query (B, H, Tq, D), key/value (B, H_kv, Tk, D) -> ((B, Tq, H, D), weights or None); every
    query also attends to this layer's prefix from `kwargs['tunelab_prefix']` (none: packed SDPA)."""
    from tunelab.models.attention import packed_sdpa, training_pattern

    capture, prefixes = kwargs.pop(CAPTURE_KW, None), kwargs.pop(PREFIX_KW, None)
    if capture is not None:
        capture[module.layer_idx] = (key, value)
        if training_pattern(module) is not None:  # a soft prompt's own run: full attention, as at inference
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                 enable_gqa=query.shape[1] != key.shape[1])
            return out.transpose(1, 2).contiguous(), None
    if prefixes is None:
        return packed_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    pattern = training_pattern(module)  # S2/SF-Attn while training: the prefix is global to every group
    if pattern is not None and not prefixes.eager:
        return pattern(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       prefix=prefixes.kv[module.layer_idx], **kwargs), None
    pk, pv = (t.to(query.dtype) for t in prefixes.kv[module.layer_idx])  # (1, H_kv, n, D)
    n, cu = pk.shape[2], kwargs.get("cu_seq_lens_q")
    if cu is not None and not prefixes.eager and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        return _packed_with_prefix(module, query, key, value, pk, pv, cu, dropout, scaling), None
    B, tq, tk = query.shape[0], query.shape[2], key.shape[2]
    mask = _with_prefix_columns(attention_mask, n, tq, tk, query.device)  # packed: HF's block mask
    k = torch.cat([pk.expand(B, -1, -1, -1), key], dim=2)
    v = torch.cat([pv.expand(B, -1, -1, -1), value], dim=2)
    if prefixes.eager:
        out, weights = _eager(module, query, k, v, mask, dropout, scaling)
        return out.transpose(1, 2).contiguous(), weights[..., n:]
    return _sdpa(module, query, k, v, mask, dropout, scaling).transpose(1, 2).contiguous(), None


def _packed_with_prefix(module, query, key, value, pk, pv, cu, dropout, scaling) -> torch.Tensor:
    """One packed row: causal attention per example (bounds `cu`), each over [prefix; example]."""
    n, parts = pk.shape[2], []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        mask = _with_prefix_columns(None, n, e - s, e - s, query.device)
        k, v = torch.cat([pk, key[:, :, s:e]], dim=2), torch.cat([pv, value[:, :, s:e]], dim=2)
        parts.append(_sdpa(module, query[:, :, s:e], k, v, mask, dropout, scaling))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()  # (1, N, H, D)


def register() -> str:
    """Make "tunelab_prefix" known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


# -- sources ------------------------------------------------------------------------------------
def model_dims(model) -> tuple[int, int, int, int]:
    """(num_layers, num_kv_heads, head_dim, hidden_size) of a decoder config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim, cfg.hidden_size


class PrefixSource(nn.Module):
    """Produces the per-layer K/V prefix (and optionally changes the input embeddings)."""

    num_virtual_tokens: int
    cacheable: bool = True

    def kv(self, decoder, num_examples: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def update_embeds(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | None:
        """embeds (B, T, d), position_ids (B or 1, T) within each example -> new embeds, or None."""
        return None


def prompt_kv(decoder, embeds: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run a prompt (n, d) through the (frozen) decoder at positions 0..n-1 and capture every
    layer's post-RoPE key/value: (hidden (1, n, d), [(key, value) (1, H_kv, n, D)] per layer)."""
    captured: dict = {}
    pos = torch.arange(embeds.shape[0], device=embeds.device)[None]
    with _prefix_attention_on(decoder):
        hidden = decoder(inputs_embeds=embeds[None], position_ids=pos, use_cache=False,
                         **{CAPTURE_KW: captured}).last_hidden_state
    return hidden, [captured[i] for i in sorted(captured)]


@contextmanager
def _prefix_attention_on(decoder) -> Iterator[None]:
    """Capturing needs our attention function; a model without a prefix yet gets it for the run."""
    before = decoder.config._attn_implementation
    if before != NAME:
        decoder.set_attn_implementation(register())
    try:
        yield
    finally:
        if before != NAME:
            decoder.set_attn_implementation(before)


class PromptSource(PrefixSource):
    """A prefix that is the K/V of a soft prompt run through the frozen model (prompt tuning and
    its descendants). Subclasses implement `prompt()`."""

    def prompt(self) -> torch.Tensor:
        """(n, d) input embeddings of the virtual tokens."""
        raise NotImplementedError

    def kv(self, decoder, num_examples: int = 1):
        embeds = self.prompt().to(decoder.get_input_embeddings().weight.dtype)
        return prompt_kv(decoder, embeds)[1]


class PrefixKV(PrefixSource):
    """Prefix tuning (Li & Liang, 2021): learned keys and values for every layer.

    Stored in PEFT's layout: a flat (n, num_layers * 2 * H_kv * head_dim) table whose row i holds
    virtual token i's key and value for every layer. With `projection_hidden`, the table is instead
    MLP(E) = W2 tanh(W1 E + b1) + b2 of a (n, d) embedding E (the paper's reparameterisation for
    stable training; PEFT's `prefix_projection`); `table()` folds it into the plain layout."""

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 hidden_size: int, projection_hidden: int | None = None, device=None):
        super().__init__()
        self.num_virtual_tokens, self.shape = num_virtual_tokens, (num_layers, num_kv_heads, head_dim)
        width = num_layers * 2 * num_kv_heads * head_dim
        if projection_hidden:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, hidden_size, device=device))
            self.mlp = nn.Sequential(nn.Linear(hidden_size, projection_hidden, device=device), nn.Tanh(),
                                     nn.Linear(projection_hidden, width, device=device))
        else:
            self.weight = nn.Parameter(torch.randn(num_virtual_tokens, width, device=device))

    @classmethod
    def for_model(cls, model, num_virtual_tokens: int, projection_hidden: int | None = None,
                  init: str = "vocab") -> "PrefixKV":
        """A prefix sized for `model`, on its device and dtype. init "vocab": the K/V of
        `num_virtual_tokens` random vocabulary tokens run through the model (Li & Liang found real
        activations a better start than noise); "random": N(0, 1) as PEFT (always with an MLP)."""
        if num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens: must be >= 1, got {num_virtual_tokens}")
        emb = model.get_input_embeddings().weight
        src = cls(num_virtual_tokens, *model_dims(model), projection_hidden=projection_hidden, device=emb.device)
        src.to(device=emb.device, dtype=emb.dtype)
        if init == "vocab" and not projection_hidden:
            ids = torch.randint(0, emb.shape[0], (num_virtual_tokens,), device="cpu")  # the run's seeded CPU RNG, any device
            with torch.no_grad():
                src.weight.copy_(kv_to_table(prompt_kv(model.get_decoder(), emb[ids.to(emb.device)])[1]))
        return src

    def table(self) -> torch.Tensor:
        """(n, num_layers * 2 * H_kv * D): the prefix in PEFT's PREFIX_TUNING layout."""
        return self.mlp(self.embedding) if hasattr(self, "mlp") else self.weight

    def kv(self, decoder, num_examples: int = 1):
        L, H, D = self.shape
        t = self.table().view(self.num_virtual_tokens, L, 2, H, D).permute(1, 2, 3, 0, 4)  # (L, 2, H, n, D)
        return [(t[i, 0][None], t[i, 1][None]) for i in range(L)]


def kv_to_table(kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of `PrefixKV.kv`: per-layer (1, H, n, D) pairs -> (n, L * 2 * H * D)."""
    t = torch.stack([torch.stack([k[0], v[0]]) for k, v in kvs])  # (L, 2, H, n, D)
    return t.permute(3, 0, 1, 2, 4).reshape(t.shape[3], -1)


# -- attaching ------------------------------------------------------------------------------------
class _State:
    """What the decoder's pre-hook needs; a plain object so deepcopy(model) copies it along."""

    def __init__(self, source: PrefixSource, offset: int, base_attn: str):
        self.source, self.offset, self.base_attn = source, offset, base_attn
        self.enabled, self.cache = True, None

    def prefixes(self, decoder, num_examples: int):
        """The source's K/V; reused in eval without grad while no parameter changed."""
        if torch.is_grad_enabled() or decoder.training or not self.source.cacheable:
            self.cache = None
            return self.source.kv(decoder, num_examples)
        dev = decoder.get_input_embeddings().weight.device.type
        key = (tuple((id(p), p._version) for p in self.source.parameters()),
               torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
        if self.cache is None or self.cache[0] != key:
            self.cache = (key, self.source.kv(decoder))
        return self.cache[1]


def _positions(kwargs: dict, length: int, device) -> torch.Tensor:
    """The position_ids the decoder would use (transformers' default when none are given)."""
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"]
    past = kwargs.get("past_key_values")
    start = past.get_seq_length() if past is not None else 0
    return (torch.arange(length, device=device) + start)[None]


def _pre_hook(decoder, args, kwargs):
    state: _State | None = decoder.__dict__.get(_STATE)
    if state is None or not state.enabled or CAPTURE_KW in kwargs:
        return None
    if decoder.config._attn_implementation != NAME:  # switched since (an objective wanting eager
        state.base_attn = decoder.config._attn_implementation  # weights): keep its wish, route via us
        decoder.set_attn_implementation(NAME)
    if args:  # input_ids given positionally
        kwargs["input_ids"], args = args[0], args[1:]
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    pos = _positions(kwargs, ref.shape[1], ref.device)
    if ids is not None and type(state.source).update_embeds is not PrefixSource.update_embeds:
        kwargs["inputs_embeds"], kwargs["input_ids"] = decoder.get_input_embeddings()(ids), None
    if kwargs.get("inputs_embeds") is not None:
        new = state.source.update_embeds(kwargs["inputs_embeds"], pos)
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"] if new is None else new
    kwargs["position_ids"] = pos + state.offset
    cu = kwargs.get("cu_seq_lens_q")
    kv = state.prefixes(decoder, len(cu) - 1 if cu is not None else ref.shape[0])
    kwargs[PREFIX_KW] = Prefixes(kv, eager=state.base_attn == "eager")
    return args, kwargs


def attach_prefix(model, source: PrefixSource, *, name: str, position_offset: int | None = None) -> None:
    """Give `model` the prefix `source` (see the module docstring). `source` becomes submodule
    `name`; call once per model."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError("method: prompt and prefix methods here need a decoder-only causal LM")
    decoder = model.get_decoder()
    if _STATE in decoder.__dict__:
        raise ConfigError("this model already has a prefix attached (one prefix method per model)")
    offset = source.num_virtual_tokens if position_offset is None else position_offset
    model.add_module(name, source)
    decoder.__dict__[_STATE] = _State(source, offset, model.config._attn_implementation)
    decoder.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model.set_attn_implementation(register())


@contextmanager
def prefix_disabled(model) -> Iterator[None]:
    """The base model's exact function: no prefix, no shift, its own attention implementation."""
    state: _State = model.get_decoder().__dict__[_STATE]
    state.enabled = False
    model.set_attn_implementation(state.base_attn)
    try:
        yield
    finally:
        model.set_attn_implementation(NAME)
        state.enabled = True
