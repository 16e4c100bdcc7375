"""Choosing the device and the compute precision, and applying the precision (autocast)."""
from __future__ import annotations

import functools
from contextlib import nullcontext

import torch


def pick_device(name: str, index: int | None = None) -> torch.device:
    """train.device: `auto` is cuda when available, else cpu; a GPU's `index` when given (one
    process per GPU: its local rank)."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    return torch.device(kind, index) if kind == "cuda" and index is not None else torch.device(kind)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (Linux); elsewhere assume not."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the device computes bf16 natively, else 'fp32'."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast when `precision` resolves to 'bf16' on `device` (fp32 master weights stay)."""
    device = torch.device(device)
    if resolve_precision(precision, device) != "bf16":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
