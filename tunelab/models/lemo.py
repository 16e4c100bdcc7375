"""LeMo / Jenga: block-wise token elimination inside attention (Wang et al., arXiv 2501.09767,
published as "Jenga", USENIX ATC 2025).

In long-context fine-tuning most tokens contribute little to attention. In the sparse layers
(Jenga's artifact: all but the first half and the last layer) each example's tokens are cut into
blocks of `block_size`; a scorer ranks the blocks by their informativeness, the attention
sub-layer runs on the kept blocks only, and every eliminated token gets exactly zero attention
output, so its hidden state passes through the residual (its MLP still runs). The kept tokens are
*gathered* before the Q/K/V projections (index_select, not a mask), keep their original rotary
positions, and attend causally among themselves: projections, attention and the activations saved
for backward all scale with the kept share.

Informativeness (the paper): I(T_j) = sum over queries i != j of token j's attention, summed over
heads; a block's score is the max over its tokens. Scorers (`SCORERS`, pluggable with
`register_scorer`): `oracle` computes that from exact causal softmax attention (chunked, without
gradient); `block_mean` from block-averaged queries and keys (a parameter-free stand-in for
Jenga's learned low-rank predictor, which we do not train). Readings we chose: the last
`num_recent_blocks` blocks of each example are always kept (an SFT answer sits there; Jenga, on
language modelling, has no such rule; 0 turns it off), and at least one block is kept. Skipped:
Jenga's MLP-neuron sparsity, its kernels and segment-wise logits. Training only: in eval mode
every token attends.

The hooks need tunelab's attention path (packed rows): kept tokens of all examples form one
packed row whose example bounds go to attention as `cu_seq_lens_q`.
"""
from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunelab.errors import ConfigError
from tunelab.models.attention import example_spans

Scorer = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]
"""(queries (H, n, D), keys (H, n, D) after RoPE, block size, softmax scale) -> (num_blocks,) scores."""
SCORERS: dict[str, Scorer] = {}
ORACLE_CHUNK = 512
"""Queries per chunk of the oracle's exact attention: bounds its transient (H, chunk, n) scores."""


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Make a scorer available as model.attention.scorer `name`."""
    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn
    return deco


def block_max(values: torch.Tensor, block: int) -> torch.Tensor:
    """(n,) -> (ceil(n / block),): the max of each block (the last one may be shorter)."""
    n = values.shape[0]
    pad = -n % block
    padded = torch.cat([values, values.new_full((pad,), -math.inf)]) if pad else values
    return padded.view(-1, block).amax(1)


@register_scorer("oracle")
def oracle(q: torch.Tensor, k: torch.Tensor, block: int, scaling: float) -> torch.Tensor:
    """Exact informativeness: attention each token receives from the later queries (causal
    softmax, its own query excluded), summed over queries and heads; block max."""
    H, n, _ = q.shape
    received = torch.zeros(n, dtype=torch.float32, device=q.device)
    keys = torch.arange(n, device=q.device)
    for s in range(0, n, ORACLE_CHUNK):
        scores = (q[:, s:s + ORACLE_CHUNK] @ k.transpose(1, 2)).float() * scaling  # (H, c, n)
        rows = torch.arange(s, s + scores.shape[1], device=q.device)[:, None]
        probs = scores.masked_fill(keys[None] > rows, -math.inf).softmax(-1)
        received += probs.masked_fill(keys[None] == rows, 0.0).sum((0, 1))
    return block_max(received, block)


@register_scorer("block_mean")
def block_mean(q: torch.Tensor, k: torch.Tensor, block: int, scaling: float) -> torch.Tensor:
    """Informativeness of blocks from block-averaged queries and keys: (n/block)^2 work."""
    H, n, D = q.shape
    nb, pad = -(-n // block), -n % block
    counts = torch.full((nb,), float(block), device=q.device)
    counts[-1] = block - pad

    def pooled(t):
        t = torch.cat([t, t.new_zeros(H, pad, D)], 1) if pad else t
        return t.view(H, nb, block, D).sum(2).float() / counts[None, :, None]
    scores = pooled(q) @ pooled(k).transpose(1, 2) * scaling  # (H, nb, nb)
    idx = torch.arange(nb, device=q.device)
    probs = scores.masked_fill(idx[None] > idx[:, None], -math.inf).softmax(-1)
    return probs.masked_fill(idx[None] == idx[:, None], 0.0).sum((0, 1))


@dataclass
class _Kept:
    """What the pre-hook hands the post-hook: kept positions (flattened over B * N), the shape."""
    index: torch.Tensor
    batch: int
    length: int


class TokenElimination:
    """The forward pre-hook (gather) and forward hook (scatter) of one sparse attention layer."""

    def __init__(self, keep_ratio: float, block_size: int, scorer: Scorer, num_recent_blocks: int = 1):
        assert 0 < keep_ratio <= 1 and block_size >= 1
        self.keep_ratio, self.block_size, self.scorer, self.recent = keep_ratio, block_size, scorer, num_recent_blocks

    def kept_blocks(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices (sorted) of the blocks to keep, given their (num_blocks,) scores."""
        nb = scores.shape[0]
        forced = min(self.recent, nb)
        count = max(math.ceil(self.keep_ratio * nb), forced, 1)
        rank = scores.clone().float()
        rank[nb - forced:] = math.inf
        return rank.topk(count).indices.sort().values

    def kept_tokens(self, n: int, scores: torch.Tensor) -> torch.Tensor:
        """Token positions (sorted, within [0, n)) of the kept blocks."""
        blocks = self.kept_blocks(scores)
        pos = (blocks[:, None] * self.block_size + torch.arange(self.block_size, device=blocks.device)).flatten()
        return pos[pos < n]

    @torch.no_grad()
    def _scores(self, module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Block scores of one example: h (n, d), cos/sin (n, Dh)."""
        D = module.head_dim
        q = module.q_proj(h).view(h.shape[0], -1, D).transpose(0, 1)  # (H, n, D)
        k = module.k_proj(h).view(h.shape[0], -1, D).transpose(0, 1)  # (Hkv, n, D)
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb
        q, k = rotate(q, k, cos, sin, unsqueeze_dim=0)
        k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
        return self.scorer(q, k, self.block_size, module.scaling)

    def pre_hook(self, module, args, kwargs):
        module.__dict__.pop("_tunelab_kept", None)
        if not module.training or "tunelab_capture" in kwargs:  # a soft prompt's own run (tunelab.methods._prefix)
            return None  # stays dense, as at inference
        if "hidden_states" in kwargs:
            h = kwargs["hidden_states"]
        else:
            h, args = args[0], args[1:]
        B, N, d = h.shape
        cos, sin = (t.expand(B, -1, -1) for t in kwargs["position_embeddings"])  # (B, N, Dh)
        spans = example_spans(B, N, kwargs.get("attention_mask"), kwargs.get("cu_seq_lens_q"))
        index, counts = [], []
        for b, s, e in spans:
            local = self.kept_tokens(e - s, self._scores(module, h[b, s:e], cos[b, s:e], sin[b, s:e]))
            index.append(local + (b * N + s))
            counts.append(len(local))
        index = torch.cat(index)
        module.__dict__["_tunelab_kept"] = _Kept(index, B, N)
        cu = torch.tensor([0] + counts, dtype=torch.int32, device=h.device).cumsum(0, dtype=torch.int32)
        take = lambda t: t.reshape(B * N, -1).index_select(0, index)[None]  # noqa: E731  (1, K, -1)
        kwargs |= {"hidden_states": take(h), "position_embeddings": (take(cos), take(sin)), "attention_mask": None,
                   "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(counts), "max_length_k": max(counts)}
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = take(kwargs["position_ids"].expand(B, N)[..., None])[..., 0]
        return args, kwargs

    def post_hook(self, module, args, kwargs, output):
        kept: _Kept | None = module.__dict__.pop("_tunelab_kept", None)
        if kept is None:
            return None
        y = output[0][0]  # (K, d)
        full = y.new_zeros(kept.batch * kept.length, y.shape[-1]).index_copy(0, kept.index, y)
        return (full.view(kept.batch, kept.length, -1), *output[1:])


def sparse_layers(num_layers: int, num_dense_first: int | None, num_dense_last: int) -> range:
    """The layers that eliminate tokens: all but the first (default: half) and the last ones."""
    first = num_layers // 2 if num_dense_first is None else num_dense_first
    return range(first, max(first, num_layers - num_dense_last))


def install(model, att) -> int:
    """Hook token elimination (`att`: the model.attention config) into the sparse layers' attention;
    returns how many layers eliminate tokens."""
    if att.scorer not in SCORERS:
        raise ConfigError(f"model.attention.scorer: '{att.scorer}' is not a known scorer; choose one of: "
                          f"{', '.join(sorted(SCORERS))} (or register one with tunelab.models.lemo.register_scorer)")
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ConfigError("model.attention: pattern lemo needs a decoder whose layers have `self_attn` (Llama family)")
    chosen = sparse_layers(len(layers), att.num_dense_first, att.num_dense_last)
    if not chosen:
        warnings.warn(f"model.attention: pattern lemo eliminates tokens in no layer of this {len(layers)}-layer model "
                      f"(num_dense_first={att.num_dense_first}, num_dense_last={att.num_dense_last}): it trains as "
                      "full attention", stacklevel=2)
    hook = TokenElimination(att.keep_ratio, att.block_size, SCORERS[att.scorer], att.num_recent_blocks)
    for i in chosen:
        attn = layers[i].self_attn
        attn.register_forward_pre_hook(hook.pre_hook, with_kwargs=True)
        attn.register_forward_hook(hook.post_hook, with_kwargs=True)
    return len(chosen)
