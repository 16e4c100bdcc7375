"""Choosing the device and the compute precision, and applying the precision (autocast)."""
from __future__ import annotations

import functools
import os
from contextlib import nullcontext

import torch

AUTO_PRECISION_ENV = "TUNELAB_AUTO_PRECISION"
"""Set to `bf16` or `fp32` to make `precision: auto` resolve to it on any device, whatever the
hardware (the test suite runs the training paths both ways on every machine with it)."""


def pick_device(name: str, index: int | None = None) -> torch.device:
    """train.device: `auto` is cuda when available, else cpu; a GPU's `index` when given (one
    process per GPU: its local rank)."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    return torch.device(kind, index) if kind == "cuda" and index is not None else torch.device(kind)


def model_device(model) -> torch.device:
    """Where a model computes: the device of its first parameter (cpu for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), e.g. 'AMD EPYC'; the platform's processor string elsewhere."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.partition(":")[2].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or "unknown"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (Linux; elsewhere assume not), unless oneDNN, which
    runs PyTorch's bf16 matmuls on the CPU, is held below them (`bf16_isa_limit`)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and bf16_isa_limit() is None


def bf16_isa_limit() -> str | None:
    """'ONEDNN_MAX_CPU_ISA=<level>' when that variable holds oneDNN below its bf16 instructions (an
    older CPU emulated): bf16 matmuls are emulated then (measured on an AVX512-BF16 EPYC, one thread:
    197 GFLOP/s unlimited, 37 at AVX512_CORE, 19 at AVX2, 191 at AVX512_CORE_BF16). None otherwise.
    ATEN_CPU_CAPABILITY does not reach those matmuls (199 GFLOP/s at avx2)."""
    level = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if not level or level in ("ALL", "DEFAULT") or "BF16" in level or "AMX" in level or level.startswith("AVX10"):
        return None
    return f"ONEDNN_MAX_CPU_ISA={level}"


def cpu_isa() -> list[str]:
    """The vector ISA levels that matter for matmul speed, as named in results files."""
    names = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
    return [label for flag, label in names.items() if flag in cpu_flags()]


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the device computes bf16 natively, else 'fp32' (or what
    $TUNELAB_AUTO_PRECISION says, when set)."""
    if precision != "auto":
        return precision
    forced = os.environ.get(AUTO_PRECISION_ENV, "").strip()
    if forced:
        if forced not in ("bf16", "fp32"):
            raise ValueError(f"${AUTO_PRECISION_ENV}={forced!r}: must be bf16 or fp32")
        return forced
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def precision_warning(precision: str, device: torch.device) -> str | None:
    """A warning for train.precision: bf16 asked for explicitly on a CPU that has no native bf16
    (no AVX512-BF16 or AMX-BF16): its bf16 matmuls are emulated there. On an AVX2-only AMD EPYC
    (torch 2.13.0) a SmolLM2-135M LoRA step took 135 s in bf16 against 4 s in fp32."""
    if precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16():
        return None
    isa = ", ".join(cpu_isa()) or "no AVX2"
    if limit := bf16_isa_limit():
        isa += f"; held below them by {limit}"
    return (f"train.precision: bf16 on a CPU without native bf16 ({cpu_model()}: {isa}): bf16 matmuls are "
            "emulated and can be tens of times slower than fp32 here; use precision: auto (fp32 on this CPU)")


def autocast(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast when `precision` resolves to 'bf16' on `device` (fp32 master weights stay)."""
    device = torch.device(device)
    if resolve_precision(precision, device) != "bf16":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
