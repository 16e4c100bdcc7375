"""Examples -> model batches, packed or padded, with targets already shifted.

`targets[t]` is the label of token t+1 *of the same example* (the last token of each example
gets -100), so the loss is `cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)`
and a packed row never predicts the first token of the next example.

Packed (`packing=True`): all examples in one row, shape (1, total_len), no attention_mask.
Positions restart at 0 for each example; this is transformers' "padding-free" path: with
`attention_mask=None` the mask builder (masking_utils.find_packed_sequence_indices) splits the
row wherever position_ids do not step by +1 and makes each example attend only to itself.
Caveat found in transformers 5.23: that detection is skipped when a KV cache exists, and Llama
creates a DynamicCache whenever `use_cache` is on (the config default, even in train mode),
which silently lets examples attend across boundaries. Always forward with `use_cache=False`;
`model_inputs(batch)` builds the keyword arguments that way. `cu_seqlens` (int32, (n+1,)) is
for varlen flash-attention kernels and for per-example bookkeeping.

Padded (`packing=False`): right-padded (B, T) with attention_mask 1 on real tokens, 0 on pads.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tunelab.data.records import Example
from tunelab.data.render import IGNORE

HOST = torch.device("cpu")
"""Batches are built in host memory (explicitly, whatever torch's default device is); the loop
moves them to the model's device."""


def shifted_targets(labels: Sequence[int]) -> list[int]:
    """labels[1:] + [-100]: the target at position t is the label of token t+1."""
    return list(labels[1:]) + [IGNORE] if labels else []


def collate(examples: Sequence[Example], packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of tensors from `examples` (see the module docstring for the two layouts)."""
    assert examples, "collate needs at least one example"
    return _packed(examples) if packing else _padded(examples, pad_id)


def _packed(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    ids, pos, tgt, lengths = [], [], [], [0]
    for ex in examples:
        ids += ex.input_ids
        pos += range(len(ex))
        tgt += shifted_targets(ex.labels)
        lengths.append(len(ex))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long, device=HOST),  # (1, N)
        "position_ids": torch.tensor([pos], dtype=torch.long, device=HOST),  # (1, N), 0 at each example start
        "targets": torch.tensor([tgt], dtype=torch.long, device=HOST),  # (1, N)
        "cu_seqlens": torch.tensor(lengths, dtype=torch.int32, device=HOST).cumsum(0, dtype=torch.int32),  # (n+1,)
    }


def _padded(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    B, T = len(examples), max(len(ex) for ex in examples)
    batch = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long, device=HOST),
        "attention_mask": torch.zeros((B, T), dtype=torch.long, device=HOST),
        "position_ids": torch.zeros((B, T), dtype=torch.long, device=HOST),
        "targets": torch.full((B, T), IGNORE, dtype=torch.long, device=HOST),
    }
    for b, ex in enumerate(examples):
        n = len(ex)
        batch["input_ids"][b, :n] = torch.tensor(ex.input_ids, device=HOST)
        batch["attention_mask"][b, :n] = 1
        batch["position_ids"][b, :n] = torch.arange(n, device=HOST)
        batch["targets"][b, :n] = torch.tensor(shifted_targets(ex.labels), device=HOST)
    return batch


def split_batch(batch: dict[str, torch.Tensor], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Split a batch at example boundaries into pieces of at most `max_tokens` positions (an
    example longer than that stays whole). Loss sums over the pieces add up to the batch's."""
    if "cu_seqlens" in batch:  # packed: greedy runs of whole examples
        cu = batch["cu_seqlens"].tolist()  # example i spans cu[i]:cu[i+1]
        cuts = [0]
        for i in range(1, len(cu) - 1):  # cut before example i when the piece would outgrow the budget
            if cu[i + 1] - cu[cuts[-1]] > max_tokens:
                cuts.append(i)
        cuts.append(len(cu) - 1)
        return [_packed_slice(batch, cu[a], cu[b], batch["cu_seqlens"][a:b + 1]) for a, b in zip(cuts, cuts[1:])]
    B, T = batch["input_ids"].shape  # padded: whole rows, trailing pad columns trimmed
    rows = max(1, max_tokens // T)
    out = []
    for r in range(0, B, rows):
        piece = {k: v[r:r + rows] for k, v in batch.items()}
        width = int(piece["attention_mask"].sum(1).max())
        out.append({k: v[:, :width] for k, v in piece.items()})
    return out


def _packed_slice(batch, start: int, end: int, cu: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[:, start:end] for k, v in batch.items() if k != "cu_seqlens"} | {"cu_seqlens": cu - start}


MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments for a transformers causal LM forward: the model's tensors from the batch
    plus `use_cache=False`, without which packed examples are not isolated (module docstring).
    Packed batches also pass their example boundaries (`cu_seq_lens_q/k`, the varlen-attention
    convention), which lets boundary-aware attention (tunelab.models.attention, flash-attention)
    skip cross-example work; plain SDPA ignores them and relies on the position_ids mask."""
    out = {k: batch[k] for k in MODEL_KEYS if k in batch} | {"use_cache": False}
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"]
        longest = int((cu[1:] - cu[:-1]).max())
        out |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return out
