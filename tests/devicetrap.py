"""A trap for tensors tunelab creates without saying where: while `DeviceTrap` is active, every
tensor factory (torch.tensor, zeros, arange, randn, ... and the parameters of nn modules) called
from tunelab's own code without an explicit `device=` is recorded with its file and line. Tensors
made by torch or transformers internals are theirs to place and are not recorded; `*_like`
factories and `.new_*` follow their input and are fine.

On a CPU-only machine a tensor created without a device lands on the CPU, where the model also
is, so nothing would fail; on a GPU machine it is on the wrong device and the first operation that
mixes it with the model's fails. The trap makes that visible everywhere."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

TUNELAB = str(Path(__file__).resolve().parent.parent / "tunelab")
FACTORIES = _device_constructors()


def _first_caller_outside_torch(depth: int = 2) -> str | None:
    """The file:line of the nearest frame outside torch (None if it is not tunelab's)."""
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{Path('/torch/')}/" not in name:
            return f"{name}:{frame.f_lineno}" if name.startswith(TUNELAB) else None
        frame = frame.f_back
    return None


class DeviceTrap(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            where = _first_caller_outside_torch()
            if where is not None:
                self.found.add(f"{where} ({func.__name__})")
        return func(*args, **kwargs)
