"""H2O KV-cache compression for generation: SinkLoRA's inference-time reading of SF-Attn.

SinkLoRA (Zhang, arXiv 2406.05678) trains with SF-Attn and, per its abstract, serves with H2O's
KV-cache compression (Zhang et al., NeurIPS 2023, "Heavy-Hitter Oracle"). Our reading, since no
SinkLoRA code was published: during generation every attention layer keeps, for each batch row
and each K/V head, at most `budget` cached keys/values:

- the example's first `sinks` real tokens (SinkLoRA's global sink tokens; StreamingLLM's 4),
- the `recent` most recent tokens (H2O's local window),
- and, in the slots left, the "heavy hitters": the tokens with the largest attention accumulated
  over every query so far (summed over the query heads that share the K/V head).

After each forward (the prompt's prefill, then each new token) the layer adds this step's
attention weights to the accumulated scores and evicts the lowest-scoring keys beyond the budget.
Evicted keys keep no trace; kept keys keep the rotary position they were cached with, and new
tokens keep counting positions from the total seen (`get_seq_length` is that total), as in H2O.
The prefill itself attends in full; so the cache after the prompt, and every later step's
attention, costs `budget` keys instead of the sequence's length.

Attention here is computed explicitly (softmax of scaled q·kᵀ in fp32, in chunks of queries), since
the weights are needed; padding keys (left-padded batches) never receive attention and are evicted
first. Used through `compressed_cache(model, policy)` around `model.generate(..., cache=cache)`:
tunelab.eval.task.generate does it whenever the model carries a policy (`model.attention.kv_budget`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from tunelab.models.attention import KV, NAME, attention_modules
POLICY = "tunelab_kv_policy"
"""Attribute of a model holding its `KVPolicy` (set at load from model.attention.kv_budget)."""
QUERY_CHUNK = 256
"""Queries whose (heads, keys) weights are built at a time in the prefill."""


@dataclass(frozen=True)
class KVPolicy:
    budget: int
    recent: int
    sinks: int

    def __post_init__(self) -> None:
        assert self.budget > self.recent + self.sinks >= 0, self


def policy_of(model) -> KVPolicy | None:
    return model.__dict__.get(POLICY)


class H2OLayer(DynamicLayer):
    """One layer's compressed cache. Besides keys/values (B, Hkv, L, D) it holds per cached key:
    `scores` (accumulated attention, fp32), `valid` (False: a padding key) and `positions`."""

    def __init__(self, policy: KVPolicy):
        super().__init__()
        self.policy = policy
        self.cumulative_length = 0
        self.scores = self.valid = self.positions = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, Hkv, n, _ = key_states.shape
        dev = key_states.device
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + n, device=dev).expand(B, Hkv, n)
        self.cumulative_length += n
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        new = (torch.zeros(B, Hkv, n, device=dev), torch.ones(B, Hkv, n, dtype=torch.bool, device=dev), new_pos)
        if self.scores is None:
            self.scores, self.valid, self.positions = new
        else:
            self.scores, self.valid, self.positions = (torch.cat([old, t], -1) for old, t in
                                                       zip((self.scores, self.valid, self.positions), new))
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def attend(self, query, key, value, attention_mask, scaling) -> torch.Tensor:
        """query (B, H, q, D) against the cached key/value (B, Hkv, L, D), the last q of them new
        -> (B, q, H, D); then accumulate this step's attention and evict beyond the budget."""
        B, H, q, D = query.shape
        Hkv, L = key.shape[1], key.shape[2]
        if L == q and attention_mask is not None and attention_mask.dim() == 4:  # the prefill: padding keys
            last = attention_mask[:, 0, -1, -L:]
            real = last if last.dtype == torch.bool else last == 0
            self.valid = self.valid & real[:, None, :]
        g = H // Hkv
        scale = scaling if scaling is not None else 1 / math.sqrt(D)
        qf = query.float().reshape(B, Hkv, g, q, D)
        kf, vf = key.float(), value.float()
        past = L - q
        out = torch.empty(B, Hkv, g, q, D, device=query.device)
        received = torch.zeros(B, Hkv, L, device=query.device)
        for s in range(0, q, QUERY_CHUNK):
            e = min(q, s + QUERY_CHUNK)
            logits = torch.einsum("bkgqd,bkld->bkgql", qf[:, :, :, s:e], kf) * scale
            i = torch.arange(s, e, device=query.device)[:, None]
            j = torch.arange(L, device=query.device)[None, :]
            seen = (j < past) | (j - past <= i)  # (chunk, L): the past, then causal among the new
            seen = seen[None, None, None] & self.valid[:, :, None, None, :]
            w = logits.masked_fill(~seen, -math.inf).softmax(-1).nan_to_num(0.0)  # a padding query sees nothing
            out[:, :, :, s:e] = w @ vf[:, :, None]
            received += w.sum((2, 3))
        self.scores = self.scores + received
        if L > self.policy.budget:
            self._evict()
        return out.reshape(B, H, q, D).transpose(1, 2).to(query.dtype)

    def _evict(self) -> None:
        p = self.policy
        keep_always = self.valid & ((self.valid.cumsum(-1) <= p.sinks)
                                    | (self.positions >= self.cumulative_length - p.recent))
        priority = self.scores.masked_fill(~self.valid, -math.inf).masked_fill(keep_always, math.inf)
        idx = priority.topk(p.budget, -1).indices.sort(-1).values  # (B, Hkv, budget), in cache order
        take = idx[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, take), self.values.gather(2, take)
        self.scores, self.valid, self.positions = (t.gather(2, idx) for t in (self.scores, self.valid, self.positions))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an H2O cache cannot be cropped (evicted keys are gone)")


class H2OCache(Cache):
    def __init__(self, num_layers: int, policy: KVPolicy):
        super().__init__(layers=[H2OLayer(policy) for _ in range(num_layers)])


@contextmanager
def compressed_cache(model, policy: KVPolicy | None):
    """An `H2OCache` for one `model.generate(..., cache=cache)` call, its layers reachable from the
    attention modules (tunelab.models.attention routes their attention to it); None without a policy."""
    if policy is None:
        yield None
        return
    if model.config._attn_implementation != NAME:
        raise ValueError(f"model.attention.kv_budget: H2O needs tunelab's SDPA path, the model runs "
                         f"{model.config._attn_implementation}")
    mods = attention_modules(model)
    cache = H2OCache(1 + max(m.layer_idx for m in mods), policy)
    for m in mods:
        m.__dict__[KV] = cache.layers[m.layer_idx]
    try:
        yield cache
    finally:
        for m in mods:
            m.__dict__.pop(KV, None)
