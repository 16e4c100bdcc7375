from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from tunelab.options import Options, require


@dataclass(kw_only=True)
class TrainConfig(Options):
    ranges: ClassVar = {
        "steps": ">= 1", "micro_batch_size": ">= 1", "grad_accum": ">= 1", "log_every": ">= 1", "lr": "> 0",
        "max_tokens_per_forward": ">= 0", "max_bad_steps": ">= 1", "warmup_steps": ">= 0", "save_every": ">= 0",
        "seed": f"[0, {2**32 - 1}]", "weight_decay": ">= 0", "max_grad_norm": ">= 0",
        # keep >= 1: pruning to 0 would delete the checkpoint just written, leaving nothing to resume
        "keep_checkpoints": ">= 1"}
    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Examples per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. The loss is normalised by the step's trained tokens,
    so the result does not depend on how a step is split."""
    max_tokens_per_forward: int | None = None
    """Bound on the positions in one forward/backward: larger micro-batches are split at example
    boundaries and their gradients summed (same result, less activation memory). Applies to
    per-token objectives (see Objective.per_token); 0 turns it off. Unset: 512 on CPU (small
    forwards stay in cache and measured fastest there), 16384 on a GPU (which needs large matmuls
    to be busy; see max_tokens_per_forward_for)."""
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
    fp32 elsewhere (also where ONEDNN_MAX_CPU_ISA holds oneDNN below them): on a CPU without them,
    bf16 matmuls run several times slower than fp32."""
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
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """How the processes of a torchrun launch share the work: `ddp` keeps a full replica of the
    model in each and sums their gradients (DistributedDataParallel); `fsdp` shards parameters,
    gradients and optimizer state over them (FSDP2). `auto`: the method's first choice (fsdp for
    full and layers, ddp for the parameter-efficient methods). One process without torchrun: unused.
    micro_batch_size is per process: N processes take N times its examples per step."""
    compact_host_memory: bool = False
    """CPU: send large allocations to mmap so the resident size stays flat (about -35% peak RSS for
    SmolLM2 LoRA, at about -20% tokens/s; see tunelab/training/memory.py)."""
    max_bad_steps: int = 5
    """Steps with a non-finite loss or gradient are skipped; after this many in a row the run stops."""
    progress: bool = True
    """Show a progress bar with loss, tokens/s and ETA."""

    def validate(self) -> None:
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                f"must be two numbers in [0, 1), got {self.betas}")
        self.betas = list(self.betas)


    def warnings(self) -> list[str]:
        """Settings that are valid but do not do what they say (printed when training starts)."""
        out = []
        if self.warmup_steps >= self.steps:  # warm-up step i sets lr = train.lr * (i + 1) / (warmup_steps + 1)
            out.append(f"train.warmup_steps={self.warmup_steps} is not below train.steps={self.steps}: the run "
                       f"ends inside the warm-up, so the learning rate peaks at {self.steps}/{self.warmup_steps + 1} "
                       f"of train.lr and never decays")
        return out


SPLIT_DEFAULT = {"cpu": 512, "cuda": 16384}
"""max_tokens_per_forward when unset, by device type."""


def max_tokens_per_forward_for(tc: TrainConfig, device) -> int:
    """The split bound in force: the configured one, else the device type's default."""
    if tc.max_tokens_per_forward is not None:
        return tc.max_tokens_per_forward
    return SPLIT_DEFAULT.get(getattr(device, "type", str(device)), SPLIT_DEFAULT["cpu"])
