"""Per-example structure of a batch, packed or padded: which example each position belongs to.

Shared by objectives that score or select per example (ssToken, Q-Tuning, ...). Stable API:
`segment_ids(batch) -> LongTensor (B, T)`, the example index of every position (examples are
numbered 0..n-1 in row-major order across the whole batch), -1 on padding.
"""
from __future__ import annotations

import torch

__all__ = ["segment_ids", "num_segments", "segment_mean", "segment_min_max", "rank_in_segment"]


def segment_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Example index per position, (B, T) long; -1 where attention_mask is 0 (padding).

    Packed rows use `cu_seqlens` when present, else the restarts of `position_ids` at 0; a padded
    batch without position_ids counts one example per row."""
    ids = batch["input_ids"]  # (B, T)
    B, T = ids.shape
    valid = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
    if "cu_seqlens" in batch and B == 1:
        bounds = batch["cu_seqlens"].to(device=ids.device, dtype=torch.long)[1:]  # (n,) example ends
        seg = torch.bucketize(torch.arange(T, device=ids.device), bounds, right=True)[None]  # (1, T)
        seg = seg.masked_fill(seg >= bounds.numel(), -1)
    elif "position_ids" in batch:
        starts = (batch["position_ids"] == 0) & valid  # (B, T)
        starts[:, 0] |= valid[:, 0]  # a row always opens an example
        seg = starts.flatten().long().cumsum(0).view(B, T) - 1
    else:
        seg = torch.arange(B, device=ids.device)[:, None].expand(B, T).clone()
    return seg.masked_fill(~valid, -1)


def num_segments(seg: torch.Tensor) -> int:
    """How many examples `segment_ids` numbered (0 for an empty batch)."""
    return int(seg.max()) + 1 if seg.numel() else 0


def segment_mean(values: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of `values` (N,) per segment index in `seg` (N,), (n,); 0 for segments with no entries."""
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, torch.ones_like(values))
    return total / count.clamp_min(1)


def segment_min_max(values: torch.Tensor, seg: torch.Tensor, n: int, eps: float = 1e-8) -> torch.Tensor:
    """(v - min) / (max - min + eps) with min and max taken within each segment, (N,)."""
    lo = torch.full((n,), float("inf"), dtype=values.dtype, device=values.device)
    hi = torch.full((n,), float("-inf"), dtype=values.dtype, device=values.device)
    lo = lo.scatter_reduce(0, seg, values, "amin")
    hi = hi.scatter_reduce(0, seg, values, "amax")
    return (values - lo[seg]) / (hi[seg] - lo[seg] + eps)


def rank_in_segment(scores: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its segment by descending score (0 = best), (N,). Ties keep the
    earlier position first, so the ranking is deterministic."""
    order = torch.sort(scores, descending=True, stable=True).indices  # best first
    order = order[torch.sort(seg[order], stable=True).indices]  # grouped by segment, best first inside
    first = torch.searchsorted(seg[order], seg[order], right=False)  # start of each entry's group
    rank = torch.empty_like(seg)
    rank[order] = torch.arange(seg.numel(), device=seg.device) - first
    return rank
