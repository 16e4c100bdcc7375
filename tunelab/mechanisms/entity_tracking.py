"""Entity tracking under cross-model activation patching (CMAP; Prakash et al. 2024, "Fine-tuning
enhances existing mechanisms", arXiv 2402.14811, experiment_3/cmap_utils.py).

    accuracy        argmax of the next-token logits at the last token == the label's first token
    head scores     how much writing the *source* model's output of one attention head (at the last
                    token) into the *target* model raises log p(label): `attribution` is the first-
                    order estimate (a_source - a_target) . d log p / d a_target from one backward
                    pass (attribution patching); `exact` patches each head in turn (one forward
                    per head: for small models and for checking the estimate)
    recovery        base accuracy with the top-k heads' outputs patched from the fine-tuned model,
                    as a share of the gap: (acc(base + k tuned heads) - acc(base)) / (acc(tuned) -
                    acc(base)); and back: the tuned model with the same heads from the base

Our reading where the paper leaves room: heads are patched at the last token only (the paper also
patches some heads at the previous query-box position), and all heads are ranked by one score
instead of the paper's four head groups found by path patching.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.records import Record
from tunelab.errors import TunelabError
from tunelab.mechanisms.patching import Site, num_heads, patch_activations, record_activations

OUT_PROJ = ("self_attn.o_proj", "attention.o_proj", "attn.c_proj", "attn.out_proj", "self_attn.out_proj",
            "attention.output.dense", "self_attention.dense")
"""Where the heads' concatenated outputs are read, relative to a block, first present wins."""


@dataclass
class Prompts:
    """Entity-tracking prompts, left-padded so the last token is at -1 in every row."""
    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor    # (B, T), 0 at each row's first real token
    labels: torch.Tensor          # (B,) first token of the queried object
    num_skipped: int = 0
    """Prompts dropped because two of their objects share a first token."""

    def __len__(self) -> int:
        return len(self.labels)

    def chunk(self, start: int, size: int) -> "Prompts":
        sl = slice(start, start + size)
        return Prompts(self.input_ids[sl], self.attention_mask[sl], self.position_ids[sl], self.labels[sl])

    def inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "use_cache": False}


def first_token(tokenizer, word: str) -> int:
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]


def encode(records: list[Record], tokenizer) -> Prompts:
    """Token ids of each record's meta['prompt'] and its label's first token."""
    rows, labels, skipped = [], [], 0
    for r in records:
        firsts = [first_token(tokenizer, o) for o in r.meta["objects"]]
        if len(set(firsts)) < len(firsts):
            skipped += 1
            continue
        rows.append(tokenizer(r.meta["prompt"], add_special_tokens=False)["input_ids"])
        labels.append(first_token(tokenizer, r.answer))
    if not rows:
        raise TunelabError("entity tracking: no usable prompt (every one has two objects with the same first token)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(map(len, rows))
    # built in host memory; each forward moves its chunk to the model's device (_on)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device="cpu")
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device="cpu")
    return Prompts(ids, mask, (mask.cumsum(1) - 1).clamp(min=0), torch.tensor(labels, device="cpu"), skipped)


def _device(model: nn.Module):
    return next(model.parameters()).device


def _on(p: Prompts, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in p.inputs().items()}


@torch.no_grad()
def last_logits(model: nn.Module, prompts: Prompts, batch_size: int = 16, source: nn.Module | None = None,
                sites: list[Site] = ()) -> torch.Tensor:
    """(B, V) fp32 logits at the last token; with `source` and `sites`, those sites patched from `source`."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts.chunk(i, batch_size)
        if source is None or not sites:
            out.append(model(**_on(chunk, _device(model))).logits[:, -1].float().cpu())
            continue
        cache = record_activations(source, sites, **_on(chunk, _device(source)))
        with patch_activations(model, cache, sites):
            out.append(model(**_on(chunk, _device(model))).logits[:, -1].float().cpu())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def label_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) log p(label) at the last token."""
    return F.log_softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)


def out_projections(model: nn.Module) -> list[str]:
    """Per block, the name of the module whose input is the heads' concatenated outputs."""
    from tunelab.methods._blocks import find_blocks

    blocks_name, blocks = find_blocks(model, key="mechanisms")
    names = dict(blocks[0].named_modules())
    rel = next((c for c in OUT_PROJ if c in names), None)
    if rel is None:
        raise TunelabError(f"mechanisms: no attention output projection ({', '.join(OUT_PROJ)}) in a "
                           f"{type(blocks[0]).__name__}")
    return [f"{blocks_name}.{i}.{rel}" for i in range(len(blocks))]


def head_sites(model: nn.Module, heads: list[tuple[int, int]], positions=(-1,)) -> list[Site]:
    """Sites for (layer, head) pairs at `positions`."""
    projs = out_projections(model)
    return [Site(projs[layer], head=h, positions=tuple(positions)) for layer, h in heads]
