"""Shifted sparse attention for long-context fine-tuning: LongLoRA's S²-Attn and SinkLoRA's SF-Attn.

S²-Attn (Chen et al., ICLR 2024, "LongLoRA"). Each example of length n is cut into groups of G
tokens and attention runs causally inside each group only: cost n*G instead of n^2. Half of the
heads (the second half) use groups shifted by G/2, so that information crosses every group
boundary of the other half:

    heads [0, h):     groups [0, G), [G, 2G), ...          (h = H // 2, see split_heads for GQA)
    heads [h, H):      groups [0, G/2), [G/2, 3G/2), ..., the last one ending at n      (wrap=False)
                      or: q, k, v rolled by -G/2, groups [0, G), ..., output rolled back  (wrap=True)

wrap=False is LongLoRA's flash-attention path (group boundaries offset via cu_seqlens);
wrap=True its plain path (`torch.roll`), where the last shifted group holds the sequence's last
G/2 and first G/2 tokens and, causal in rolled order, lets the first tokens see the last ones.
Training only: inference runs full attention (LongLoRA's claim: the model keeps full-attention
quality). With grouped-query attention LongLoRA repeats the K/V heads and splits the query heads
exactly in half; we split at the K/V group boundary nearest below half instead, where there is
one (SmolLM2: 3 of 9 query heads unshifted, 6 shifted), so that no K/V head is copied (`split_heads`).

SF-Attn (Zhang, arXiv 2406.05678, "SinkLoRA"). Our reading of its abstract and figures (no code
was published): the shifted groups are "segmented and reassembled" so that no group wraps around
(wrap=False above), and the first `num_sinks` tokens of each example are global "sink attention
tokens" that every query attends to (StreamingLLM's 4 by default).

Examples shorter than a group are one group; a length that is not a multiple of G leaves a shorter
last group. Packed rows run per example (`cu_seq_lens_q`), padded rows per row on their real
tokens. The prompt family's key/value prefix (tunelab.methods._prefix) is global like the sinks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.models.attention import example_spans


@dataclass(frozen=True)
class GroupedShiftAttention:
    """The pattern as an attention function (installed on each attention module, see
    tunelab.models.attention.PATTERN): group size G, cyclic `wrap`, `num_sinks` global tokens,
    and `shift` (False: every head uses unshifted groups; for ablations and tests)."""

    group_size: int
    wrap: bool = False
    num_sinks: int = 0
    shift: bool = True

    def __post_init__(self) -> None:
        assert self.group_size >= 2 and self.group_size % 2 == 0, self.group_size
        assert not (self.wrap and self.num_sinks), "sinks go with non-cyclic groups"

    def __call__(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                 dropout: float = 0.0, scaling: float | None = None, prefix=None, **kwargs) -> torch.Tensor:
        """query (B, H, N, D), key/value (B, Hkv, N, D), prefix None or (key, value) (1, Hkv, P, D)
        -> (B, N, H, D); padding positions get zeros."""
        B, H, N, D = query.shape
        assert key.shape[2] == N, "training-time pattern: keys are the queries' own tokens"
        p = dropout if module.training else 0.0
        out = query.new_zeros(B, N, H, D)
        for b, s, e in example_spans(B, N, attention_mask, kwargs.get("cu_seq_lens_q")):
            y = self.example(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], prefix, p, scaling)
            out[b, s:e] = y[0].transpose(0, 1)
        return out

    def example(self, q, k, v, prefix, dropout: float, scaling) -> torch.Tensor:
        """One example: q (1, H, n, D), k/v (1, Hkv, n, D) -> (1, H, n, D)."""
        H = q.shape[1]
        split = split_heads(H, k.shape[1]) if self.shift else H
        halves = []
        for a, b, shifted in ((0, split, False), (split, H, True)):
            if a == b:
                continue
            kh, vh = _heads(k, a, b, H), _heads(v, a, b, H)
            glob = None if prefix is None else tuple(_heads(t.to(q.dtype), a, b, H) for t in prefix)
            halves.append(self._half(q[:, a:b], kh, vh, glob, shifted, dropout, scaling))
        return torch.cat(halves, 1)

    def starts(self, n: int, shifted: bool) -> list[int]:
        """Where the groups of one half begin, in the order attention sees the tokens (rolled
        order for the shifted half with wrap)."""
        G = self.group_size
        if shifted and not self.wrap:
            return [0] + list(range(G // 2, n, G))
        return list(range(0, n, G)) or [0]

    def _half(self, q, k, v, glob, shifted: bool, dropout: float, scaling) -> torch.Tensor:
        n, half = q.shape[2], self.group_size // 2
        roll = shifted and self.wrap
        if roll:
            q, k, v = (t.roll(-half, 2) for t in (q, k, v))
        bounds = [s for s in self.starts(n, shifted) if s < n] + [n]
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            gk, gv = self._globals(k, v, glob, s)
            outs.append(_attend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], gk, gv, dropout, scaling))
        y = torch.cat(outs, 2)
        return y.roll(half, 2) if roll else y

    def _globals(self, k, v, glob, start: int):
        """Keys/values every query of the group at `start` sees besides its group: the prefix and
        the example's sink tokens that lie before the group."""
        m = min(self.num_sinks, start)
        parts = ([glob] if glob is not None else []) + ([(k[:, :, :m], v[:, :, :m])] if m else [])
        if not parts:
            return None, None
        return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)

    def visibility(self, n: int) -> torch.Tensor:
        """(2, n, n) bool: which key positions (columns) each query (row) sees, for the unshifted
        and the shifted heads, in original token order (no prefix)."""
        out = torch.zeros(2, n, n, dtype=torch.bool)
        half = self.group_size // 2
        for h, shifted in ((0, False), (1, self.shift)):
            order = torch.arange(n).roll(-half) if shifted and self.wrap else torch.arange(n)  # rolled -> original
            bounds = [s for s in self.starts(n, shifted) if s < n] + [n]
            for s, e in zip(bounds[:-1], bounds[1:]):
                idx = order[s:e]
                out[h, idx[:, None], idx[None, :]] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
                if self.num_sinks and s:
                    out[h, idx[:, None], torch.arange(min(self.num_sinks, s))[None, :]] = True
        return out


def split_heads(num_heads: int, num_kv_heads: int) -> int:
    """How many query heads keep unshifted groups: half, moved down to a K/V group boundary when
    one lies inside (0, H), so that no K/V head is copied for the split (9 heads in 3 K/V groups:
    3 unshifted, 6 shifted); else exactly H // 2 (LongLoRA repeats K/V heads, as `_heads` does then)."""
    group = num_heads // num_kv_heads
    aligned = (num_heads // 2) // group * group
    return aligned if 0 < aligned < num_heads else num_heads // 2


def _heads(t: torch.Tensor, a: int, b: int, num_heads: int) -> torch.Tensor:
    """The key/value heads that query heads [a, b) read: a slice when [a, b) covers whole K/V
    groups (SDPA broadcasts them), else one K/V head per query head."""
    group = num_heads // t.shape[1]
    if a % group == 0 and b % group == 0:
        return t[:, a // group:b // group]
    return t[:, torch.arange(a, b, device=t.device) // group]


def _attend(q, k, v, gk, gv, dropout: float, scaling) -> torch.Tensor:
    """Causal attention of one group (1, h, g, D), plus global keys `gk`/`gv` seen by every query."""
    gqa = q.shape[1] != k.shape[1]
    if gk is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=gqa)
    g, m = q.shape[2], gk.shape[2]
    mask = torch.ones(g, m + g, dtype=torch.bool, device=q.device).tril(m)  # (g, m + g): globals, then causal
    return F.scaled_dot_product_attention(q, torch.cat([gk, k], 2), torch.cat([gv, v], 2), attn_mask=mask,
                                          scale=scaling, dropout_p=dropout, enable_gqa=gqa)
