"""Bottleneck adapters: sequential (Houlsby et al. 2019 / Pfeiffer et al. 2021) and parallel
(He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022).

Each adapted sublayer output h (attention and/or FFN, before the block's residual add) becomes
    sequential:  h + s · W_up f(W_down h)      (`adapter`, s = 1: Houlsby's plain add)
    parallel:    h + s · W_up f(W_down x)      (`parallel_adapter`, s = 4: He et al.'s scaled PA)
with x the sublayer's input, f a ReLU (He et al.; PETL_AST uses GELU), W_down: (r, d), W_up: (d, r)
zero-initialised, so training starts exactly at the base model. The base model is frozen.

Placement: `houlsby` adapts attention and FFN, `pfeiffer` the FFN only (Cappellazzo et al.'s
`adapter_type`). The adapters find their sublayers by name inside each transformer block (see
`_blocks.SUBLAYERS`), so the same method adapts Llama, GPT-2, BERT, ViT or an audio spectrogram
transformer; `modules` names them for any other nn.Module stack.

Readings chosen where the sources differ: only the residual forms that start at the base are
offered (the sequential adapter keeps its internal residual h + Δ(h); the parallel one has none,
as PETL_AST's README recommends); the optional LayerNorms of He et al.'s `Adapter_Layer` are off
(their MAM recipe does not use them); dropout sits after f, as in their code.

Output: `tunelab_adapter.safetensors` (parameter names as in the model, e.g.
`model.layers.0.adapter_ffn.down.weight`) + `tunelab_adapter.json` (method, options, base model).
PEFT has no bottleneck-adapter type, so PEFT cannot load it (and we do not write an
adapter_config.json that would pretend otherwise); AdapterHub's `adapters` library uses its own
names and config. `tunelab.load_run` reloads it. An adapter is non-linear, so it cannot be merged
into the base weights; disabling the adapters recovers the base model exactly.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from tunelab.errors import TunelabError
from tunelab.methods import Method, register, switched_off
from tunelab.methods._blocks import check_roles, find_blocks, sublayer_name
from tunelab.methods._bottleneck import Bottleneck, ParallelAdapter, SequentialAdapter, bottlenecks, hidden_size
from tunelab.methods._shared import freeze_all, load_adapter, save_adapter
from tunelab.options import Options

PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}


@dataclass(kw_only=True)
class BottleneckOptions(Options):
    """What every bottleneck adapter needs (shared by adapter, parallel_adapter and mam)."""
    ranges: ClassVar = {"bottleneck": ">= 1", "dropout": "[0, 1)"}
    bottleneck: int = 64
    """Bottleneck width r (Cappellazzo et al.: d / reduction rate)."""
    activation: Literal["relu", "gelu", "silu"] = "relu"
    """Non-linearity f between the down and up projections."""
    scaling: float = 1.0
    """s in h + s·Δ: 1 is the plain add of Houlsby adapters."""
    dropout: float = 0.0
    """Dropout after f."""
    blocks: str | None = None
    """Regex for the name of the nn.ModuleList of transformer blocks; default: the largest one."""
    modules: dict[str, str] = field(default_factory=dict)
    """Sublayer names inside a block, by role (attn_in, attn_out, ffn_in, ffn_out); default: found
    from the names transformers uses (self_attn/attention/attn, mlp, BERT's intermediate/output.dense)."""

    def validate(self) -> None:
        check_roles(self.modules, "modules")


@dataclass(kw_only=True)
class AdapterConfig(BottleneckOptions):
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    """Where adapters go in each block: 'houlsby' after attention and FFN, 'pfeiffer' after the FFN only."""


@dataclass(kw_only=True)
class ParallelAdapterConfig(AdapterConfig):
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    """'pfeiffer': beside the FFN only (He et al.'s PA); 'houlsby': beside attention too."""
    scaling: float = 4.0
    """s in h + s·Δ(x): He et al.'s scaled parallel adapter uses 4."""


def attach_adapters(model, cfg: BottleneckOptions, kind: type[Bottleneck], slots: tuple[str, ...]) -> list[str]:
    """Add one `kind` adapter per slot ('attn', 'ffn') to every block; return their names."""
    blocks_name, blocks = find_blocks(model, cfg.blocks)
    like = next(model.parameters())
    names = []
    for i, block in enumerate(blocks):
        for slot in slots:
            target = block.get_submodule(sublayer_name(block, f"{slot}_out", cfg.modules))
            source = block.get_submodule(sublayer_name(block, f"{slot}_in", cfg.modules)) \
                if kind.reads_input else target
            adapter = kind(hidden_size(model, target), cfg.bottleneck, cfg.activation, cfg.scaling,
                           cfg.dropout, like)
            block.add_module(f"adapter_{slot}", adapter)
            adapter.attach(source, target)
            names.append(f"{blocks_name}.{i}.adapter_{slot}")
    return names


class AdapterMethod(Method):
    """Shared hooks of the adapter family: frozen base, adapters train, own safetensors output."""

    frozen_base = True

    supports_merge = False
    kind: ClassVar[type[Bottleneck]]

    def apply(self, model):
        freeze_all(model)
        self.adapter_names = attach_adapters(model, self.cfg, self.kind, PLACEMENTS[self.cfg.placement])
        return model

    def trainable_state(self, model):
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        save_adapter(out_dir, self, self.trainable_state(model), base_name, adapters=self.adapter_names)

    def load(self, model, out_dir: Path) -> None:
        self.load_trainable_state(model, load_adapter(out_dir, self))

    def merge(self, model):
        raise TunelabError(f"method '{self.name}' cannot be merged into a plain model (an adapter is "
                           "non-linear); export without merging and load it with tunelab.load_run")

    @contextmanager
    def disabled(self, model):
        with switched_off(bottlenecks(model)):
            yield


@register("adapter")
class BottleneckAdapter(AdapterMethod):
    """Sequential bottleneck adapter, Houlsby (attention + FFN) or Pfeiffer (FFN) placement."""

    Config = AdapterConfig
    kind = SequentialAdapter


@register("parallel_adapter")
class ParallelAdapterMethod(AdapterMethod):
    """He et al.'s (scaled) parallel adapter: a bottleneck branch beside the FFN reading its input."""

    Config = ParallelAdapterConfig
    kind = ParallelAdapter
