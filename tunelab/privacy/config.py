"""The `privacy` section of the run config: DP-SGD (per-example clipping and Gaussian noise)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tunelab.options import Options


@dataclass(kw_only=True)
class PrivacyConfig(Options):
    ranges: ClassVar = {"clip_norm": "> 0", "noise_multiplier": ">= 0", "delta": "(0, 1)"}
    dp_sgd: bool = False
    """Train with DP-SGD (Abadi et al. 2016): each example's gradient is clipped to clip_norm, the
    clipped sum gets Gaussian noise of std noise_multiplier * clip_norm, and the result is divided
    by the examples in the step. Needs data.packing off (the privacy unit is one example) and one
    process; methods and objectives that cannot run it say so before training."""
    clip_norm: float = 1.0
    """C: the largest L2 norm one example's gradient may contribute."""
    noise_multiplier: float = 1.0
    """sigma: the noise std in units of clip_norm (0: clipping only, no privacy guarantee)."""
    delta: float = 1e-5
    """The delta at which epsilon is reported (keep it below 1 / training examples)."""
