"""Opt-in `torch.compile` (`train.compile: true`).

We compile each transformer block in place (`nn.Module.compile`), not the whole model: parameter
names stay as they are (methods, checkpoints and export address parameters by name, and
`torch.compile(model)` would prefix them with `_orig_mod.`), objectives that call the backbone and
the head separately still run compiled blocks, and one compiled block serves every layer.
Blocks are found from `model._no_split_modules`, the class names transformers gives its decoder
layers. Shapes vary from step to step (packed rows), so we compile with `dynamic=True`; the
per-example attention reads its sequence bounds on the host, which splits the graph there.
Compilation happens during the first steps: its cost shows in the run's start-up and first step
times (metrics.jsonl), and `bench/` reports it.
"""
from __future__ import annotations

from tunelab.errors import TunelabError


def compile_blocks(model) -> int:
    """Compile every transformer block of `model` in place; return how many were compiled."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise TunelabError(f"train.compile: found no transformer blocks in {type(model).__name__} "
                           "(it declares no _no_split_modules); set train.compile: false")
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
