"""Frozen weights stored once in the compute precision.

Under bf16 autocast, `F.linear` casts its fp32 weight to bf16 in every forward. Autocast caches
that cast only for weights that require grad, so a frozen base model (LoRA, adapters, the prompt
family) is re-cast in every forward of every micro-batch: 135M values read as fp32 and written as
bf16 each time for SmolLM2, and the bf16 copies kept for backward. Storing those frozen weights
in bf16 once, before training, gives the same numbers (autocast's cast is the same
round-to-nearest, and a weight already in bf16 is used as is) with half the memory and no casts.

Only plain `nn.Linear` layers whose weight is frozen are converted, never the output head (tied to
the input embeddings, which autocast does not cast), and only for methods that declare a frozen
base read by its own layers (`Method.frozen_base`): a method that adds a delta to a frozen weight
(the sparse family) must add it in fp32.
"""
from __future__ import annotations

import torch
from torch import nn


def frozen_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain nn.Linear layers whose parameters are all frozen, except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules()
            if type(m) is nn.Linear and m is not head and not any(p.requires_grad for p in m.parameters())]


@torch.no_grad()
def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Convert the frozen linear layers' weights (and biases) to `dtype`, in place; the count."""
    layers = frozen_linears(model)
    for m in layers:
        m.to(dtype)
    return len(layers)
