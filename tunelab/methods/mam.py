"""MAM adapter ("Mix-And-Match"; He et al., "Towards a Unified View of Parameter-Efficient
Transfer Learning", ICLR 2022): the unified view's best combination of its design dimensions,

    attention:  prefix tuning, l virtual key/value vectors per layer  (a gated parallel change
                of each head: (1 - λ)·Attn(x) + λ·softmax(q P_kᵀ) P_v)
    FFN:        scaled parallel adapter  h <- FFN(x) + s · W_up ReLU(W_down x),  s = 4

Their XSum/MT recipe (README, `exps/run_xsum.sh`): l = 30, r = 512, s = 4, W_up zero ("lora"
init); those are the defaults here. Their prefix is reparameterised by an MLP (mid_dim 800);
`projection_hidden` gives that, 0 trains the K/V table directly (initialised from real-token
activations, as prefix_tuning does).

Composition, built from the two mechanisms as they are: the prefix is `_prefix.attach_prefix`
with a `PrefixKV` source (module `prefix`, as in the `prefix_tuning` method), the FFN branch is
the `parallel_adapter`'s `ParallelAdapter` (`<block>.adapter_ffn`). The prefix needs a
transformers decoder (`get_decoder()` + an attention interface), so MAM, unlike the adapters,
does not run on encoder-only stacks such as AST.

At init the FFN branch is zero, so MAM computes prefix tuning alone; with the prefix switched off
it computes the parallel adapter alone (both tested). Output: `tunelab_adapter.safetensors` with
the prefix and adapter tensors + `tunelab_adapter.json`. PEFT cannot load it (it has no bottleneck
adapters, and no way to combine one with its PREFIX_TUNING); nothing to merge (non-linear);
disabling recovers the base exactly (the model's own attention implementation again).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

from tunelab.methods import register
from tunelab.methods._bottleneck import ParallelAdapter
from tunelab.methods._prefix import PrefixKV, attach_prefix, prefix_disabled
from tunelab.methods._shared import freeze_all
from tunelab.methods.adapters import AdapterMethod, BottleneckOptions, attach_adapters

PREFIX = "prefix"


@dataclass(kw_only=True)
class MAMConfig(BottleneckOptions):
    ranges: ClassVar = {"num_virtual_tokens": ">= 1", "projection_hidden": ">= 0"}
    bottleneck: int = 512
    """Bottleneck width r of the FFN parallel adapter (He et al.: 512 on XSum/MT, 16 on GLUE)."""
    scaling: float = 4.0
    """s of the scaled parallel adapter."""
    num_virtual_tokens: int = 30
    """l: prefix length (key/value vectors per layer and KV head)."""
    projection_hidden: int = 0
    """Width of the MLP that reparameterises the prefix during training (He et al.: 800); 0: none."""
    prefix_init: Literal["vocab", "random"] = "vocab"
    """Start of a directly trained prefix: K/V of l random vocabulary tokens, or N(0, 1)."""


@register("mam")
class MAMAdapter(AdapterMethod):
    """Prefix tuning at attention + scaled parallel adapter at the FFN; see the module docstring."""

    Config = MAMConfig
    kind = ParallelAdapter

    def apply(self, model):
        cfg = self.cfg
        freeze_all(model)
        source = PrefixKV.for_model(model, cfg.num_virtual_tokens, cfg.projection_hidden or None,
                                    init=cfg.prefix_init)
        attach_prefix(model, source, name=PREFIX)
        source.requires_grad_(True)
        self.adapter_names = attach_adapters(model, cfg, ParallelAdapter, ("ffn",))
        return model

    @contextmanager
    def disabled(self, model):
        with ExitStack() as stack:
            stack.enter_context(prefix_disabled(model))
            stack.enter_context(super().disabled(model))
            yield
