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

Inductor's on-disk graph cache (torch 2.13) keys a compiled graph without the vector ISA it was
generated for, which `ATEN_CPU_CAPABILITY` chooses. A graph cached under one capability and served
under another ran with NaN losses (avx512 cached, avx2 served) or failed to build (`default`
served); so a run that sets `ATEN_CPU_CAPABILITY` keeps its own cache, beside torch's default one.
"""
from __future__ import annotations

import os

from tunelab.errors import TunelabError


def keep_inductor_cache_per_isa() -> str | None:
    """With `ATEN_CPU_CAPABILITY` set and the inductor cache at torch's default place, move the cache
    to a sibling directory named after the capability; return the directory chosen (None: unchanged).
    A cache directory the user chose (`TORCHINDUCTOR_CACHE_DIR`) is left as it is."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip()
    if not capability:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    default, chosen = os.path.abspath(default_cache_dir()), os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is not None and os.path.abspath(chosen) != default:   # torch writes its default back
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path = f"{default}-isa-{capability}"
    return path


def compile_blocks(model) -> int:
    """Compile every transformer block of `model` in place; return how many were compiled."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise TunelabError(f"train.compile: found no transformer blocks in {type(model).__name__} "
                           "(it declares no _no_split_modules); set train.compile: false")
    keep_inductor_cache_per_isa()
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
