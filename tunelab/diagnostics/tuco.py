"""TuCo, Tuning Contribution (Nuti, Franzmeyer, Henriques; ICML 2025; arXiv 2506.23423).

A residual transformer computes x_{l+1} = x_l + f(x_l, l). With f^PT the pre-trained (base) block
and f^FT the fine-tuned one, every block update splits exactly, on the fine-tuned residual stream:
    PTC_l = f^PT(x_l, l)                    pre-training component
    FTC_l = f^FT(x_l, l) - f^PT(x_l, l)     fine-tuning component,   f^FT = PTC_l + FTC_l
and, summed over layers at the prompt's last token (Algorithm 1 of the paper),
    TuCo = ||sum_l FTC_l|| / (||sum_l PTC_l|| + ||sum_l FTC_l||)   in [0, 1]  (Euclidean norms).
Readings we chose (unverified in the paper's code, which is not public): block granularity (the
whole decoder layer), the last prompt token (the position that produces the reply's first token).

`tuco_forward(base, tuned, inputs, alpha)` runs x_{l+1} = x_l + PTC_l + alpha * FTC_l. The paper's
alpha = 0 gives the base model only when embeddings and head are shared; here the embedding output
and the logits are interpolated the same way (e = e_PT + alpha (e_FT - e_PT), logits likewise from
x_L), so alpha = 0 reproduces the base model's logits and alpha = 1 the tuned model's for any
method whose change lives in weights (full fine-tuning of tied embeddings included; prompt and
prefix tuning too, whose virtual tokens act inside the attention of the blocks). Methods that
rewrite the inputs inside the forward (DePT/EPT's position-wise embedding offsets) keep that
input change at alpha = 0. The TuCo value itself uses blocks only: a change made only to the
embeddings or the head gives TuCo = 0 (see `forgetting`'s KL drift for the whole effect).

Implementation: forward hooks on the tuned model's decoder layers call the base model's layer l
with the same arguments (mask, rotary embeddings, positions), so nothing is re-implemented.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from tunelab.diagnostics import Diagnostic, Findings, register
from tunelab.diagnostics._generation import question_ids, right_padded
from tunelab.errors import TunelabError
from tunelab.options import Options, require


@dataclass(kw_only=True)
class TuCoConfig(Options):
    ranges: ClassVar = {"num_prompts": ">= 1", "max_length": ">= 1", "batch_size": ">= 1"}
    num_prompts: int = 32
    """Prompts of the run's eval data (its train data if it has none) to measure TuCo on."""
    generic: bool = True
    """Also measure on built-in generic instructions (the paper: TuCo is lower off-task)."""
    max_length: int = 256
    """Prompts are cut to their last this many tokens."""
    batch_size: int = 8
    """Prompts per forward pass."""
    quantiles: list[float] = (0.1, 0.25, 0.5, 0.75, 0.9)
    """Quantiles of the per-prompt TuCo distribution to report."""

    def validate(self) -> None:
        self.quantiles = list(self.quantiles)
        require(all(0 <= q <= 1 for q in self.quantiles), "quantiles", "must lie in [0, 1]")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers: the ModuleList named *layers with one entry per layer."""
    n = model.config.num_hidden_layers
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name.endswith("layers"):
            return mod
    raise TunelabError(f"cannot find the {n} decoder layers of {type(model).__name__} (a ModuleList named *layers)")


def _final_norm(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder()
    for attr in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(decoder, attr, None), nn.Module):
            return getattr(decoder, attr)
    raise TunelabError(f"cannot find the final norm of {type(model).__name__} to interpolate its head")


def _first(output) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple starting with it, depending on the version."""
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, new: torch.Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _reentrant_safe(fn):
    """A hook that calls the base model's module: when base and tuned are the same model, that call
    re-enters this very hook, which must then leave the output alone."""
    busy = [False]

    def hook(*args):
        if busy[0]:
            return None
        busy[0] = True
        try:
            return fn(*args)
        finally:
            busy[0] = False
    return hook


def _layer_hook(base_layer: nn.Module, alpha: float, acc: dict | None, state: dict):
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]  # (B, T, d): the tuned residual stream x_l
        out_ft, out_pt = _first(output), _first(base_layer(*args, **kwargs))
        if acc is not None:
            ptc, ftc = out_pt - x, out_ft - out_pt  # (B, T, d) each
            acc["ptc"] = acc.get("ptc", 0) + ptc
            acc["ftc"] = acc.get("ftc", 0) + ftc
            acc.setdefault("ptc_norms", []).append(ptc.norm(dim=-1))  # (B, T) per layer
            acc.setdefault("ftc_norms", []).append(ftc.norm(dim=-1))
        if alpha == 1.0:
            state["x_last"] = out_ft
            return None  # leave the tuned model's output bit-exact
        new = out_pt + alpha * (out_ft - out_pt)  # x_l + PTC_l + alpha * FTC_l
        state["x_last"] = new
        return _with_first(output, new)
    return _reentrant_safe(hook)


def _embed_hook(base_embed: nn.Module, alpha: float):
    def hook(module, args, output):
        e_pt = base_embed(*args)
        return e_pt + alpha * (output - e_pt)
    return _reentrant_safe(hook)


def _head_hook(base: nn.Module, alpha: float, state: dict):
    norm, head = _final_norm(base), base.get_output_embeddings()

    def hook(module, args, output):
        T = args[0].shape[1]  # the head may see only the last positions (logits_to_keep)
        logits_pt = head(norm(state["x_last"])[:, -T:])
        return logits_pt + alpha * (output - logits_pt)
    return _reentrant_safe(hook)


@contextmanager
def steered(base: nn.Module, tuned: nn.Module, alpha: float = 1.0, acc: dict | None = None):
    """Within this context a forward of `tuned` computes x_l + PTC_l + alpha * FTC_l at every
    layer (and interpolates embeddings and logits when alpha != 1); `acc`, if given, collects the
    sums over layers of PTC and FTC, (B, T, d), and per-layer norms, L x (B, T)."""
    b_layers, t_layers = decoder_layers(base), decoder_layers(tuned)
    if len(b_layers) != len(t_layers):
        raise TunelabError(f"base has {len(b_layers)} decoder layers, tuned {len(t_layers)}: not the same architecture")
    state: dict = {}
    handles = [t.register_forward_hook(_layer_hook(b, alpha, acc, state), with_kwargs=True)
               for b, t in zip(b_layers, t_layers)]
    if alpha != 1.0:
        embed = _embed_hook(base.get_input_embeddings(), alpha)
        handles.append(tuned.get_input_embeddings().register_forward_hook(embed))
        handles.append(tuned.get_output_embeddings().register_forward_hook(_head_hook(base, alpha, state)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def tuco_forward(base: nn.Module, tuned: nn.Module, inputs: dict, alpha: float) -> torch.Tensor:
    """Logits (B, T, V) of the tuned model with its fine-tuning component scaled by `alpha`:
    0 gives the base model's logits, 1 the tuned model's. `inputs`: input_ids, attention_mask, ..."""
    with steered(base, tuned, alpha):
        return tuned(**inputs, use_cache=False).logits


@dataclass
class Decomposition:
    """PTC and FTC at each sequence's last token: sums over layers (B, d), norms per layer (L, B)."""
    ptc: torch.Tensor
    ftc: torch.Tensor
    ptc_norms: torch.Tensor
    ftc_norms: torch.Tensor

    @property
    def tuco(self) -> torch.Tensor:
        """(B,) ||FTC|| / (||PTC|| + ||FTC||); 0 where both are 0."""
        f, p = self.ftc.norm(dim=-1), self.ptc.norm(dim=-1)
        return torch.where(f > 0, f / (p + f), torch.zeros_like(f))


@torch.no_grad()
def decompose(base: nn.Module, tuned: nn.Module, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> Decomposition:
    """Algorithm 1 on a right-padded batch (B, T); each row's last real token is scored."""
    acc: dict = {}
    with steered(base, tuned, 1.0, acc):
        tuned(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    last = (attention_mask.sum(-1) - 1) if attention_mask is not None else \
        torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return Decomposition(acc["ptc"][rows, last].float(), acc["ftc"][rows, last].float(),
                         torch.stack(acc["ptc_norms"])[:, rows, last].float(),
                         torch.stack(acc["ftc_norms"])[:, rows, last].float())


def tuco_of_prompts(base, tuned, prompts: list[list[int]], pad_id: int, batch_size: int) -> Decomposition:
    """Decompose every prompt, `batch_size` at a time; the rows concatenated in order."""
    device = next(tuned.parameters()).device
    parts = [decompose(base, tuned, *right_padded(prompts[i:i + batch_size], pad_id, device))
             for i in range(0, len(prompts), batch_size)]
    return Decomposition(*(torch.cat([getattr(p, f) for p in parts], dim=1 if f.endswith("norms") else 0).cpu()
                           for f in ("ptc", "ftc", "ptc_norms", "ftc_norms")))


def distribution(values: torch.Tensor, quantiles: list[float]) -> dict:
    """{"values": per-prompt values, "quantiles": {q: value}} for the report."""
    qs = torch.quantile(values.double(), torch.tensor(quantiles, dtype=torch.double, device=values.device)).tolist() if len(values) else []
    return {"values": [round(v, 6) for v in values.tolist()], "quantiles": {str(q): v for q, v in zip(quantiles, qs)}}


def summary_figures(name: str, values: torch.Tensor) -> dict[str, float]:
    """Mean and median TuCo of one prompt set. The median is the midpoint of the two middle values
    for an even count (as the report's quantiles compute it), not torch.median's lower one."""
    return {f"tuco_{name}_mean": float(values.mean()),
            f"tuco_{name}_median": float(torch.quantile(values.double(), 0.5))}


@register("tuco")
class TuningContribution(Diagnostic):
    """TuCo per prompt (eval prompts, and generic instructions), with summary quantiles and the
    per-layer mean norms of FTC and PTC at the last token."""

    Config = TuCoConfig

    def run(self, ctx) -> Findings:
        from tunelab.diagnostics._generic import GENERIC_INSTRUCTIONS

        c, tok = self.cfg, ctx.tokenizer
        sets = {"eval": ctx.eval_prompts(c.num_prompts, c.max_length)}
        if c.generic:
            sets["generic"] = [question_ids(tok, q)[-c.max_length:] for q in GENERIC_INSTRUCTIONS[:c.num_prompts]]
        summary, details = {}, {}
        for name, prompts in sets.items():
            dec = tuco_of_prompts(ctx.base, ctx.tuned, prompts, tok.pad_token_id, c.batch_size)
            values = dec.tuco
            summary |= summary_figures(name, values)
            details[name] = distribution(values, c.quantiles)
            details[f"{name}_per_layer"] = {
                "columns": ["layer", "ftc_norm", "ptc_norm"],
                "rows": [[l, float(f), float(p)] for l, (f, p) in
                         enumerate(zip(dec.ftc_norms.mean(1).tolist(), dec.ptc_norms.mean(1).tolist()))]}
        return Findings(summary, details)
