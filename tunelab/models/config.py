"""The `model` section of the run config, with its long-context parts: RoPE scaling and the
training-time attention pattern (S²-Attn, SF-Attn, LeMo token elimination)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from tunelab.options import Options, require

RopeType = Literal["linear", "dynamic", "yarn", "longrope", "llama3"]
_ROPE_ONLY: dict[str, tuple[str, ...]] = {
    "attention_factor": ("yarn", "longrope"), "beta_fast": ("yarn",), "beta_slow": ("yarn",),
    "low_freq_factor": ("llama3",), "high_freq_factor": ("llama3",), "short_factor": ("longrope",),
    "long_factor": ("longrope",)}
"""Options of RopeScaling that only one or two scaling types read."""


@dataclass(kw_only=True)
class RopeScaling(Options):
    """Context extension by rescaling rotary positions (the types transformers implements).
    LongLoRA uses `linear` (position interpolation) with factor ceil(target length / trained length)."""
    ranges: ClassVar = {"factor": ">= 1", "original_max_position_embeddings": ">= 1", "attention_factor": "> 0",
                        "beta_fast": "> 0", "beta_slow": "> 0", "low_freq_factor": "> 0", "high_freq_factor": "> 0"}
    type: RopeType = "linear"
    """linear: position interpolation (Chen et al. 2023); dynamic: NTK-aware, rescaled with the length;
    yarn; longrope (needs short_factor and long_factor); llama3 (Llama 3.1's frequency-band scaling)."""
    factor: float = 2.0
    """How many times the model's trained context the scaled model covers."""
    original_max_position_embeddings: int | None = None
    """yarn, longrope, llama3: the context the model was trained at (unset: its max_position_embeddings)."""
    attention_factor: float | None = None
    """yarn, longrope: scale of the attention logits (unset: the type's formula)."""
    beta_fast: float | None = None
    """yarn: extrapolation boundary in rotations (transformers' default 32)."""
    beta_slow: float | None = None
    """yarn: interpolation boundary in rotations (transformers' default 1)."""
    low_freq_factor: float | None = None
    """llama3: wavelength bound of the interpolated band (unset: 1)."""
    high_freq_factor: float | None = None
    """llama3: wavelength bound of the kept band (unset: 4)."""
    short_factor: list[float] | None = None
    """longrope: per-frequency factors up to the original context (head_dim / 2 numbers)."""
    long_factor: list[float] | None = None
    """longrope: per-frequency factors beyond it (head_dim / 2 numbers)."""

    def validate(self) -> None:
        for name, types in _ROPE_ONLY.items():
            require(getattr(self, name) is None or self.type in types, name,
                    f"only used by rope_scaling type {' and '.join(types)}, not {self.type}")
        if self.type == "longrope":
            require(bool(self.short_factor) and bool(self.long_factor), "short_factor",
                    "type longrope needs short_factor and long_factor")

    def parameters(self, rope_theta: float, max_positions: int) -> dict:
        """The `rope_parameters` dict transformers reads, for a model with `rope_theta` and
        `max_positions` trained positions."""
        out = {"rope_type": self.type, "factor": self.factor, "rope_theta": rope_theta}
        if self.type in ("yarn", "longrope", "llama3"):
            out["original_max_position_embeddings"] = self.original_max_position_embeddings or max_positions
        if self.type == "llama3":
            out |= {"low_freq_factor": self.low_freq_factor or 1.0, "high_freq_factor": self.high_freq_factor or 4.0}
        return out | {k: getattr(self, k) for k in _ROPE_ONLY if getattr(self, k) is not None}

    def positions(self, max_positions: int) -> int:
        """How many positions the scaled model covers."""
        return int((self.original_max_position_embeddings or max_positions) * self.factor)


@dataclass(kw_only=True)
class AttentionConfig(Options):
    """A training-time attention pattern; evaluation and generation use full attention, with a
    compressed KV cache in generation if `kv_budget` is set. See tunelab/models/shifted.py (s2, sf),
    tunelab/models/lemo.py (lemo) and tunelab/models/h2o.py (kv_budget)."""
    ranges: ClassVar = {"group_size": ">= 2", "num_sink_tokens": ">= 0", "keep_ratio": "(0, 1]",
                        "kv_budget": ">= 2", "kv_recent": ">= 1",
                        "block_size": ">= 1", "num_dense_first": ">= 0", "num_dense_last": ">= 0",
                        "num_recent_blocks": ">= 0"}
    pattern: Literal["full", "s2", "sf", "lemo"] = "full"
    """full: causal attention; s2: LongLoRA's shifted sparse attention; sf: SinkLoRA's SF-Attn
    (shifted groups without wrap-around, plus global sink tokens); lemo: LeMo/Jenga block-wise
    token elimination."""
    group_size: int | None = None
    """s2, sf: tokens per attention group (even; must divide data.max_length). Unset: a quarter of
    data.max_length (LongLoRA's group_size_ratio 1/4), filled in when the run config is read."""
    wrap: bool = False
    """s2: shift the second half of the heads cyclically (LongLoRA's `roll` path: the last group
    wraps to the start); false: offset group boundaries without wrap (its flash-attention path)."""
    num_sink_tokens: int = 4
    """sf: the first tokens of each example that every query attends to (StreamingLLM's 4)."""
    keep_ratio: float = 0.5
    """lemo: share of each example's token blocks kept in the sparse layers, in (0, 1]."""
    block_size: int = 64
    """lemo: tokens per block (Jenga's 64)."""
    scorer: str = "oracle"
    """lemo: how blocks are ranked: `oracle` (attention each block receives, exact), `block_mean`
    (the same on block-averaged queries and keys), or a scorer registered in tunelab.models.lemo."""
    num_dense_first: int | None = None
    """lemo: leading layers that keep every token (unset: half the layers, as Jenga's Llama 2 setting)."""
    num_dense_last: int = 1
    """lemo: trailing layers that keep every token."""
    num_recent_blocks: int = 1
    """lemo: the last blocks of each example are always kept (the answer of an SFT example sits
    there); 0: the scorer alone decides, as in Jenga."""
    kv_budget: int | None = None
    """Generation only (any pattern): keep at most this many cached keys/values per layer and K/V
    head, H2O's heavy hitters (most attention accumulated) plus the `kv_recent` latest tokens plus
    the `num_sink_tokens` first ones: SinkLoRA's inference-time compression. Unset: the full cache."""
    kv_recent: int | None = None
    """With kv_budget: the latest tokens always kept (H2O's recent window). Unset: half the budget."""

    def recent_window(self) -> int:
        """kv_recent, its default filled in."""
        return self.kv_recent if self.kv_recent is not None else self.kv_budget // 2

    def validate(self) -> None:
        require(self.group_size is None or self.group_size % 2 == 0, "group_size",
                f"must be even (the shifted heads move by half a group), got {self.group_size}")
        require(not (self.pattern == "sf" and self.wrap), "wrap",
                "SF-Attn never wraps around (that is the difference from S2-Attn); use pattern s2")
        require(self.kv_recent is None or self.kv_budget is not None, "kv_recent", "set kv_budget too")
        if self.kv_budget is not None:
            require(self.recent_window() + self.num_sink_tokens < self.kv_budget, "kv_budget",
                    f"{self.kv_budget} leaves no slot for heavy hitters after kv_recent {self.recent_window()} and "
                    f"num_sink_tokens {self.num_sink_tokens}; raise it above {self.recent_window() + self.num_sink_tokens}")


@dataclass(kw_only=True)
class ModelConfig(Options):
    name: str = "smollm2-135m"
    """A built-in name (`tunelab models list`), a local HF model directory, a hub id, or a .gguf file."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off unless you turn it on."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the base weights. Keep float32 on CPU; precision of compute is train.precision."""
    attn_implementation: Literal["sdpa", "sdpa_masked", "eager"] = "sdpa"
    """Attention kernel. `sdpa` runs PyTorch SDPA; for packed rows tunelab runs it per example
    (tunelab.models.attention), which gives the same result without cross-example work;
    `sdpa_masked` is transformers' SDPA with a block-diagonal mask over the whole packed row."""
    allow_pickle: bool = False
    """Allow loading pickle-based weights (.bin/.pt); even then they load with weights_only=True."""
    rope_scaling: RopeScaling | None = None
    """Extend the context by rescaling rotary positions (e.g. {type: linear, factor: 2}); unset:
    the model's own positions, and a longer training example is an error."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Training-time attention pattern (full, s2, sf, lemo) and its options."""

    def validate(self) -> None:
        require(self.attention.pattern == "full" or self.attn_implementation == "sdpa", "attn_implementation",
                f"attention pattern {self.attention.pattern} runs on tunelab's SDPA path; set it to sdpa")


def check_context(model: ModelConfig, max_length: int) -> None:
    """Rules between the model and data sections: the group size of s2/sf divides the training
    length (unset: a quarter of it, filled in here)."""
    att = model.attention
    if att.pattern not in ("s2", "sf"):
        return
    if att.group_size is None:
        require(max_length % 8 == 0, "data.max_length", f"{max_length} is not a multiple of 8, so a quarter of it "
                "is no even group size dividing it; set model.attention.group_size")
        att.group_size = max_length // 4
    require(max_length % att.group_size == 0, "model.attention.group_size",
            f"{att.group_size} does not divide data.max_length={max_length}: a full-length example must split "
            "into whole groups")


def looks_like_path(name: str) -> bool:
    """A model name that can only be a path: it starts with /, ./, ../ or ~, names a .gguf file,
    or has more than one '/' (a hub id is `org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or \
        name.lower().endswith(".gguf") or name.count("/") > 1
