"""DSEE: Dually Sparsity-Embedded Efficient Tuning (Chen et al., ACL 2023, arXiv 2111.00160),
its parameter-efficient stage: a low-rank plus a sparse update of the attention projections,

    W' = W + (alpha / r) * (B A + S ⊙ M),   A ~ N(0, 0.02), B = 0, S = 0 at the start,

with M a fixed support of `num_sparse` entries per matrix, chosen once from the pretrained W by
a GreBsmo-style decomposition W ≈ U V + S* (the entries of largest |S*|: where W is least
low-rank). GreBsmo as in the reference code: for rank = 1 .. grebsmo_rank, `grebsmo_iters`
alternations U = QR((W - S) Vᵀ).Q, V = Uᵀ (W - S), S = hard_threshold(W - U V, 0.01), then grow
V by the first row of R in QR(W - U V - S). Alternatives: 'random' and 'magnitude' (top |W|).

Output: `lowrank/` is a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) that
`PeftModel.from_pretrained` loads; it holds B A only. PEFT cannot represent the sparse part
S ⊙ M: it is saved as `sparse_delta.safetensors` (indices + values, scale alpha/r in the JSON),
and `tunelab.methods.lt_sft.compose(base, [dir])` folds it into a base model, after which the
PEFT adapter on that model gives DSEE's function exactly. `merge` folds both.
Readings we chose: the rank of the GreBsmo loop is capped at min(m, n) // 2 (the reference's
100 would make S* empty on small matrices); its second stage (magnitude or head pruning of the
merged weights, then re-tuning) is not part of this method.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from tunelab.methods import Method, register
from tunelab.methods import _sparse as S
from tunelab.methods._shared import decay_groups, freeze_all, set_module, target_linears
from tunelab.methods.lora import PEFT_PREFIX
from tunelab.options import Options

LOWRANK_DIR = "lowrank"


@dataclass(kw_only=True)
class DSEEConfig(Options):
    ranges: ClassVar = {"r": ">= 1", "num_sparse": ">= 1", "grebsmo_rank": ">= 1", "grebsmo_iters": ">= 1"}
    r: int = 4
    """Rank of the low-rank part B A."""
    alpha: float = 32.0
    """Both parts are scaled by alpha / r."""
    num_sparse: int = 128
    """N, the entries of the sparse part per matrix."""
    target_modules: list[str] = ("q_proj", "v_proj")
    """Layers to adapt (LoRA's matching rules); the paper adapts the query and value projections."""
    sparse_method: Literal["grebsmo", "random", "magnitude"] = "grebsmo"
    """How the sparse support M is chosen from the pretrained weight."""
    grebsmo_rank: int = 100
    """GreBsmo: rank grown to (one per outer iteration), capped at min(m, n) // 2. The reference's
    100 costs minutes per 576 x 576 matrix on a CPU; 16 is a quick start for small models."""
    grebsmo_iters: int = 10
    """GreBsmo: alternations per rank."""
    grebsmo_threshold: float = 0.01
    """GreBsmo: entries of W - U V below this magnitude are not sparse (absolute; the reference's
    0.01 suits weights of std ~0.02-0.05, scale it with the weights)."""
    seed: int = 0
    """Seeds A's initialisation, GreBsmo's start and the random support."""

    def validate(self) -> None:
        self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@torch.no_grad()
def grebsmo(weight: torch.Tensor, max_rank: int, iters: int, threshold: float, generator) -> torch.Tensor:
    """The sparse part S* (m, n) of W ≈ U V + S* (GreBsmo-style greedy bilateral smoothing)."""
    w = weight.float()                                                    # (m, n), on its device
    v = torch.randn(1, w.shape[1], generator=generator, device="cpu").to(w.device)  # (rank, n); host RNG
    for rank in range(1, max(1, min(max_rank, min(w.shape) // 2)) + 1):
        s = torch.zeros_like(w)
        for _ in range(iters):
            u = torch.linalg.qr((w - s) @ v.T).Q                          # (m, rank)
            v = u.T @ (w - s)                                             # (rank, n)
            s = w - u @ v
            s[s.abs() < threshold] = 0
        v = torch.cat([v, torch.linalg.qr(w - u @ v - s).R[:1]])          # grow the rank by one
    return s


def sparse_support(weight: torch.Tensor, cfg: DSEEConfig, generator) -> torch.Tensor:
    """Sorted flat indices of the N entries of M."""
    n = min(cfg.num_sparse, weight.numel())
    if cfg.sparse_method == "random":
        return torch.randperm(weight.numel(), generator=generator, device="cpu")[:n].sort().values
    score = weight.float() if cfg.sparse_method == "magnitude" else \
        grebsmo(weight, cfg.grebsmo_rank, cfg.grebsmo_iters, cfg.grebsmo_threshold, generator)
    return torch.topk(score.abs().reshape(-1), n, sorted=False).indices.sort().values.cpu()


class DSEELinear(S.SparseDeltaLinear):
    """y = x (W + s S⊙M)ᵀ + b + s B A x."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, r: int, scale: float, generator):
        super().__init__(base, indices, scale)
        kw = dict(bias=False, dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A, self.lora_B = nn.Linear(base.in_features, r, **kw), nn.Linear(r, base.out_features, **kw)
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.randn(self.lora_A.weight.shape, generator=generator, device="cpu") * 0.02)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if not self.enabled else y + self.lora_B(self.lora_A(x)) * self.scale

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        lowrank = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale
        base = super().merged_linear()
        base.weight.add_(lowrank.to(base.weight.dtype))
        return base


@register("dsee")
class DSEE(Method):
    """Low-rank plus sparse update; see the module docstring."""

    Config = DSEEConfig

    def apply(self, model):
        freeze_all(model)
        g = torch.Generator().manual_seed(self.cfg.seed)
        self.target_names = target_linears(model, self.cfg.target_modules)
        for n in self.target_names:
            base = model.get_submodule(n)
            idx = sparse_support(base.weight, self.cfg, g)
            set_module(model, n, DSEELinear(base, idx, self.cfg.r, self.cfg.scaling, g))
        return model

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        layers = S.sparse_layers(model).values()
        return decay_groups([p for m in layers for p in (m.lora_A.weight, m.lora_B.weight, m.sparse_values)],
                            weight_decay, decay_vectors=True)

    def trainable_state(self, model) -> dict:
        out = S.layer_state(model)
        for n, m in S.sparse_layers(model).items():
            out |= {f"{n}.lora_A.weight": m.lora_A.weight.detach(), f"{n}.lora_B.weight": m.lora_B.weight.detach()}
        return out

    def load_trainable_state(self, model, state: dict) -> None:
        S.load_state(model, state, set(self.trainable_state(model)))

    # -- output: PEFT LoRA adapter for B A, sparse delta for S ⊙ M
    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        from safetensors.torch import save_file

        S.save_sparse(model, out_dir, self.name, self.cfg, {"base_model": base_name})
        lowrank = Path(out_dir) / LOWRANK_DIR
        lowrank.mkdir(exist_ok=True)
        state = {PEFT_PREFIX + k: v.contiguous().cpu()
                 for k, v in self.trainable_state(model).items() if ".lora_" in k}
        save_file(state, str(lowrank / "adapter_model.safetensors"), metadata={"format": "pt"})
        (lowrank / "adapter_config.json").write_text(json.dumps(self._peft_config(base_name), indent=2))

    def _peft_config(self, base_name: str) -> dict:
        import re
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
                "r": self.cfg.r, "lora_alpha": self.cfg.alpha, "lora_dropout": 0.0, "use_rslora": False,
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                "modules_to_save": None,
                "target_modules": "^(" + "|".join(re.escape(n) for n in self.target_names) + ")$"}

    def load(self, model, out_dir: Path) -> None:
        from safetensors.torch import load_file

        state, _ = S.read_sparse(out_dir)
        lowrank = load_file(str(Path(out_dir) / LOWRANK_DIR / "adapter_model.safetensors"))
        self.load_trainable_state(model, state | {k.removeprefix(PEFT_PREFIX): v for k, v in lowrank.items()})

    def merge(self, model):
        return S.merge_layers(model)

    def disabled(self, model):
        return S.layers_disabled(model)
