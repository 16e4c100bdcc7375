"""Privacy audit (defensive; after ReCIT, Xie et al. 2025, arXiv 2504.20570, and the span checks of
DAGER): what a run's shared gradients and its trained model reveal about its training data.

1. Canaries: records of data.train whose reply matches `canary_pattern` (a named group `secret`
   of digits) are planted secrets; one canary per distinct (owner, secret), with how many records
   repeat it. Exposure (Carlini et al. 2019) = log2(C + 1) - log2(rank of the true secret's
   log-likelihood among C distinct random secrets of the same shape), and extraction = greedy
   decoding after the prompt and the reply's prefix reproduces the secret; for the tuned and the
   base model.
2. Token-set recovery from the gradient of a batch of the run's first training examples, at each
   of `batch_sizes`: embedding rows, and span membership on layer 0's q projection for full
   fine-tuning (its weight gradient) and for LoRA (dL/dA, when the run's model has LoRA there);
   recall and precision against the batch's true token set (tunelab/diagnostics/_leakage.py); the
   precision of an empty recovered set is not measured (None), e.g. LoRA's dL/dA while B = 0.
3. The same under DP-SGD (per-example clipping to `clip_norm`, noise `sigma * clip_norm`, each of
   `sigmas`) and for FedKSeed's seed-scalar messages (`kseed_steps` pairs, full-parameter z).
Gradients are taken on the tuned model in fp32 on the CPU. Nothing beyond the token set and the
planted secrets is reconstructed.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from tunelab.diagnostics import Diagnostic, Findings, register
from tunelab.diagnostics import _leakage as L
from tunelab.options import Options
from tunelab.run.device import model_device


@dataclass(kw_only=True)
class PrivacyAuditConfig(Options):
    ranges: ClassVar = {"clip_norm": "> 0", "kseed_steps": ">= 1", "tol": "(0, 1)", "num_candidates": ">= 1"}
    batch_sizes: list[int] = (1, 4, 16)
    """Examples per audited gradient."""
    sigmas: list[float] = (1.0,)
    """DP-SGD noise multipliers to audit (the run's own is added when it trained with DP-SGD)."""
    clip_norm: float = 1.0
    """DP-SGD's per-example clip norm C for the audited tensor (the run's own when it used DP-SGD)."""
    kseed_steps: int = 20
    """FedKSeed: seed-scalar pairs an observer sees for one batch."""
    tol: float = 1e-3
    """Span membership: a token is declared present when its relative residual is below this."""
    canary_pattern: str = r"access code of (?P<owner>\w+) is (?P<secret>\d{6})"
    """A regex over assistant replies; its `secret` group (digits) marks a planted canary."""
    num_candidates: int = 200
    """Random secrets each canary is ranked against."""
    seed: int = 0

    def validate(self) -> None:
        # each once: a size or sigma given twice would add the same rows twice
        self.batch_sizes = list(dict.fromkeys(int(b) for b in self.batch_sizes))
        self.sigmas = list(dict.fromkeys(float(s) for s in self.sigmas))
        re.compile(self.canary_pattern)


def _example_grads(model, ex) -> dict:
    """One example's gradients: input-embedding rows (V, d), q weight, LoRA A (or None), and the
    norm of the whole model's weight gradient."""
    q = L.layer0_q(model)
    weight = getattr(q, "base_layer", q).weight
    lora_a = getattr(getattr(q, "lora_A", None), "weight", None)
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:  # every weight's gradient: what full-parameter sharing would expose
        p.requires_grad_(True)
    try:
        return _grads(model, ex, params, weight, lora_a)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _grads(model, ex, params, weight, lora_a) -> dict:
    dev = model_device(model)
    ids, labels = torch.tensor([ex.input_ids], device=dev), torch.tensor([ex.labels], device=dev)
    x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=x, labels=labels).loss
    tensors = [x, *params] + ([lora_a] if lora_a is not None else [])
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    by_id = {id(p): g for p, g in zip(params, grads[1:1 + len(params)])}
    emb = torch.zeros_like(model.get_input_embeddings().weight).index_add_(0, ids[0], grads[0][0].detach())
    return {"emb": emb, "q": by_id[id(weight)].detach(), "lora": grads[-1].detach() if lora_a is not None else None,
            "all": math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads[1:] if g is not None)), "ids": _read(ex)}


def _read(ex) -> set[int]:
    """The tokens the loss reads: those before the last labelled position (a token after it
    feeds no prediction that has a target, so no gradient reaches its embedding)."""
    last = max((i for i, y in enumerate(ex.labels) if y != -100), default=0)
    return set(ex.input_ids[:last])


def _mechanisms(cfg: PrivacyAuditConfig, run_cfg) -> list[tuple[str, float]]:
    sigmas = list(cfg.sigmas) + ([run_cfg.privacy.noise_multiplier] if run_cfg.privacy.dp_sgd else [])
    return [("none", 0.0)] + [("dp", s) for s in dict.fromkeys(sigmas)] + [("fedkseed", 0.0)]


def gradient_rows(model, examples, cfg: PrivacyAuditConfig, run_cfg) -> list[list]:
    """[mechanism, sigma, leak, batch size, tokens, recall, precision, top-k recall] rows; a ratio
    over an empty set (precision when nothing was recovered) is None: not measured."""
    clip = run_cfg.privacy.clip_norm if run_cfg.privacy.dp_sgd else cfg.clip_norm
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    model = model.float().eval()
    xs = L.layer0_inputs(model)
    per = [_example_grads(model, examples[i]) for i in order[:max(cfg.batch_sizes)]]
    rows, gen = [], torch.Generator(device="cpu").manual_seed(cfg.seed)
    # with fewer examples than a batch size the batch is all of them: audited once, under its true size
    for b in dict.fromkeys(min(b, len(per)) for b in cfg.batch_sizes if per):
        batch, true = per[:b], set().union(*(p["ids"] for p in per[:b]))
        for mech, sigma in _mechanisms(cfg, run_cfg):
            for leak in ("emb", "q", "lora"):
                if batch[0][leak] is None:
                    continue
                grads = [p[leak] for p in batch]
                total = torch.stack(grads).sum(0)
                rest = math.sqrt(max(sum(p["all"] for p in batch) ** 2 - float(total.double().pow(2).sum()), 0.0))
                seen = L.shared(grads, mech, clip, sigma, cfg.kseed_steps, rest, gen)
                found = L.nonzero_rows(seen) if leak == "emb" else L.span_members(seen, xs, cfg.tol)
                prec, rec = L.precision_recall(found, true)
                top = len(L.top_rows(seen, len(true)) & true) / len(true) if leak == "emb" and true else None
                rows.append([mech, sigma, {"emb": "embedding rows", "q": "span: layer-0 q (full)",
                                           "lora": "span: layer-0 LoRA A"}[leak], b, len(true), rec, prec, top])
    return rows


CANARY_COLUMNS = ["owner", "repeats", "model", "candidates", "rank", "exposure", "extracted"]


def planted(records, pattern: re.Pattern) -> list[tuple]:
    """[(record, match, repeats)] per distinct canary: a canary is its (owner, secret); the records
    that carry it again (repeats, however worded) are counted, not audited again, so a canary planted
    k times is one canary of the extraction rate and the mean exposure, not k."""
    first: dict[tuple, tuple] = {}
    for r in records:
        m = pattern.search(r.messages[-1]["content"]) if r.messages else None
        if m:
            key = (m.groupdict().get("owner") or "", m.group("secret"))
            rec, match, n = first.get(key, (r, m, 0))
            first[key] = (rec, match, n + 1)
    return list(first.values())


def canary_rows(ctx, records, cfg: PrivacyAuditConfig) -> list[list]:
    """CANARY_COLUMNS per distinct planted canary and model (tuned, base)."""
    found, rows = planted(records, re.compile(cfg.canary_pattern)), []
    for which in ("tuned", "base"):
        model = ctx.model(which).float().eval()
        for rec, m, repeats in found:
            num, rank, extracted = _canary(model, ctx.tokenizer, rec, m, cfg)
            rows.append([m.groupdict().get("owner") or "", repeats, which, num, rank, L.exposure(rank, num), extracted])
    return rows


def candidates(secret: str, num: int, seed: int) -> list[str]:
    """`num` distinct random secrets of the secret's shape (as many digits), the secret excluded; all
    the others when there are fewer. Distinct: a candidate drawn twice would count twice in the rank."""
    space, n = 10 ** len(secret), len(secret)
    drawn = random.Random(f"{seed}:{secret}").sample(range(space), min(num + 1, space))
    return [c for c in (f"{x:0{n}d}" for x in drawn) if c != secret][:num]


@torch.no_grad()
def _canary(model, tok, rec, m, cfg: PrivacyAuditConfig) -> tuple[int, int, bool]:
    """(candidates ranked against, the secret's rank among them, whether greedy decoding extracts it)."""
    from tunelab.data import encode_prompt
    from tunelab.data.records import Record

    secret, reply, dev = m.group("secret"), rec.messages[-1]["content"], model_device(model)
    prefix = reply[:m.start("secret")]
    prompt = encode_prompt(Record(messages=rec.messages[:-1] + [{"role": "assistant", "content": "."}]), tok)
    cands = candidates(secret, cfg.num_candidates, cfg.seed)

    def score(s: str) -> float:
        cont = tok(prefix + s, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + cont], device=dev)
        logp = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        return float(logp.gather(1, torch.tensor(cont, device=dev)[:, None]).sum())
    rank = L.secret_rank([score(c) for c in cands], score(secret))
    start = torch.tensor([prompt + tok(prefix, add_special_tokens=False)["input_ids"]], device=dev)
    out = model.generate(start, max_new_tokens=len(secret) + 2, do_sample=False, pad_token_id=tok.pad_token_id)
    return len(cands), rank, tok.decode(out[0, start.shape[1]:]).strip().startswith(secret)


@register("privacy")
class PrivacyAudit(Diagnostic):
    """Canary exposure/extraction and token-set recovery from shared gradients, with and without
    DP-SGD and for FedKSeed's messages; see the module docstring."""

    Config = PrivacyAuditConfig
    cheap = False  # per-example backward passes of the whole model
    brief = ("canaries", "canary_exposure_tuned", "embedding_recall_none", "embedding_precision_dp")

    def run(self, ctx) -> Findings:
        from tunelab.data import encode
        from tunelab.data.split import train_eval_records

        records = train_eval_records(ctx.cfg.data)[0]
        examples = encode(records, ctx.tokenizer, ctx.cfg.data)
        grads = gradient_rows(ctx.tuned, examples, self.cfg, ctx.cfg)
        canaries = canary_rows(ctx, records, self.cfg)
        return Findings(_summary(grads, canaries, max((r[3] for r in grads), default=0)), {
            "gradient_leakage": {"columns": ["mechanism", "sigma", "leak", "batch_size", "tokens", "recall",
                                             "precision", "topk_recall"], "rows": grads},
            "canaries": {"columns": CANARY_COLUMNS, "rows": canaries}})


def _summary(grads: list[list], canaries: list[list], b: int) -> dict:
    """Means over distinct canaries; a precision or recall that was not measured stays None."""
    col = {c: i for i, c in enumerate(CANARY_COLUMNS)}
    tuned = [r for r in canaries if r[col["model"]] == "tuned"]
    out = {"canaries": len(tuned), "canary_records": sum(r[col["repeats"]] for r in tuned)}
    for which in ("tuned", "base"):
        mine = [r for r in canaries if r[col["model"]] == which]
        if mine:
            out[f"canary_exposure_{which}"] = sum(r[col["exposure"]] for r in mine) / len(mine)
            out[f"canary_extracted_{which}"] = sum(r[col["extracted"]] for r in mine) / len(mine)
    for mech, _, leak, size, _, rec, prec, _ in grads:
        if size == b and leak == "embedding rows":
            out.setdefault(f"embedding_recall_{mech}", rec)
            out.setdefault(f"embedding_precision_{mech}", prec)
    return out
