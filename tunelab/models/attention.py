"""Attention for packed rows that never computes across examples.

transformers' padding-free path isolates packed examples with a block-diagonal (N, N) mask; SDPA
then runs its masked kernel over the whole row: cost grows with the square of the row length and,
on CPU, the fused causal kernel is not used. `packed_sdpa` instead runs causal SDPA on each
example's slice (from `cu_seq_lens_q`), so attention costs sum(len_i^2) and takes the fast
`is_causal` path. Without `cu_seq_lens_q` (padded batches, generation) it is transformers' SDPA.

Registered as attention implementation "tunelab_sdpa" (with SDPA's mask builder), so any model
that supports SDPA can use it: `model.set_attn_implementation("tunelab_sdpa")`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "tunelab_sdpa"


def packed_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """query (1, H, N, D), key/value (1, Hkv, N, D) -> ((1, N, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    bounds = cu.tolist() if cu is not None else None
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or bounds[0] != 0 \
            or bounds[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    # split (not slicing): its backward concatenates the pieces' gradients once, where slices
    # would each build a zero-filled full-size gradient to be summed
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    parts = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa,
                                            dropout_p=dropout if module.training else 0.0)
             for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)) if q.shape[2]]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make "tunelab_sdpa" known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
