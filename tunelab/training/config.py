from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tunelab.errors import ConfigError


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Examples per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. The loss is normalised by the step's trained tokens,
    so the result does not depend on how a step is split."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: list[float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate decay after warm-up (to 0 at the last step for linear and cosine)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (0: no clipping)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: bf16 autocast keeps fp32 master weights and optimizer state. `auto` picks
    bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX) and
    fp32 elsewhere: on a CPU without them, bf16 matmuls run several times slower than fp32."""
    grad_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower)."""
    compile: bool = False
    """torch.compile each transformer block (opt-in; the first steps pay the compile time, see
    tunelab/training/compile.py)."""
    seed: int = 0
    """Seeds data order, initialisation and dropout."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    save_every: int = 50
    """Write a checkpoint every N steps (0: only the final one)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs the `tensorboard` extra)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto picks cuda when available."""
    compact_host_memory: bool = False
    """CPU: send large allocations to mmap so the resident size stays flat (about -35% peak RSS for
    SmolLM2 LoRA, at about -20% tokens/s; see tunelab/training/memory.py)."""
    max_bad_steps: int = 5
    """Steps with a non-finite loss or gradient are skipped; after this many in a row the run stops."""
    progress: bool = True
    """Show a progress bar with loss, tokens/s and ETA."""

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "grad_accum", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "keep_checkpoints", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: must be two numbers in [0, 1), got {self.betas}")
        self.betas = list(self.betas)
