"""Low-precision copies of large weights, made once per optimizer step into buffers kept across steps.

Autocast keeps its bf16 cast of a trained weight for the whole step (`training/step.py` holds one
autocast context per step), but it caches nothing for frozen weights, nor inside an autograd
Function's forward (grad mode is off there). The fused head + cross-entropy
(`objectives/_head_ce.py`) therefore cast the (V, d) output head itself once per call, i.e. once
per piece of a split step: for SmolLM2 a fresh 56 MB bf16 tensor each time, above glibc's largest
mmap threshold (32 MiB), so each one was mapped, page-faulted in and unmapped again (profiled on a
2-core AVX512-BF16 EPYC: 18-20 ms per cast, and about a third of a LoRA step's page faults;
bench/results/profile-lora-bf16-head-cast-2026-12-07.json).

Inside `one_cast_per_step()` (entered by the training step), `cast_once(weight, dtype)` writes the
cast into a buffer kept for that weight (the same rounding as `weight.to(dtype)`) the first time the
weight is asked for in the step, and returns that buffer for the rest of the step; the next step
writes it again, so a weight changed by the optimizer, or in place by anyone, is re-read every step.
Outside a step (evaluation, generation) it is a plain `weight.to(dtype)`. On the CPU the buffer lives
as long as the weight does (the page faults are the cost saved); on other devices (CUDA's caching
allocator reuses freed blocks without faults) it is dropped when the step ends, so a GPU, or an
FSDP2 rank holding only a shard between steps, keeps no extra copy of the head between steps.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.weak import WeakIdKeyDictionary

_kept = WeakIdKeyDictionary()  # weight -> its low-precision buffer
_cast_this_step: set[int] | None = None  # ids of the weights written this step; None outside a step


@contextmanager
def one_cast_per_step():
    """The scope of one optimizer step: each weight is cast at most once inside it (nested: one scope)."""
    global _cast_this_step
    outer = _cast_this_step
    _cast_this_step = set() if outer is None else outer
    try:
        yield
    finally:
        _cast_this_step = outer
        if outer is None:
            for weight in [w for w, buf in _kept.items() if buf.device.type != "cpu"]:
                del _kept[weight]


@torch.no_grad()
def cast_once(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)`; inside a step, written at most once per step into a kept buffer."""
    if _cast_this_step is None or weight.dtype == dtype:
        return weight.to(dtype)
    buf = _kept.get(weight)
    if buf is None or buf.dtype != dtype or buf.shape != weight.shape or buf.device != weight.device:
        buf = _kept[weight] = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        _cast_this_step.discard(id(weight))
    if id(weight) not in _cast_this_step:
        buf.copy_(weight)  # round to nearest even, as .to(dtype)
        _cast_this_step.add(id(weight))
    return buf
