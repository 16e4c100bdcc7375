"""Task evaluation: teacher-forced loss on the eval data, and answer accuracy by batched greedy
generation (left padding + KV cache), scored by exact match of the final answer."""
from __future__ import annotations

import re
import time

import torch

from tunelab.data.records import Example, Record
from tunelab.eval.config import EvalConfig
from tunelab.objectives import chunked_head_cross_entropy, model_inputs, token_cross_entropy, trained_hidden
from tunelab.run.device import autocast, model_device, to_device


EVAL_CHUNK_TOKENS = 1024
"""Target positions projected through the output head at once in eval_loss: bounds the fp32
(tokens, vocab) logits to ~200 MB for a 49k vocabulary, whatever the eval batch size."""


@torch.no_grad()
def eval_loss(model, examples: list[Example], *, batch_size: int, pad_id: int, precision: str = "fp32") -> float:
    """Mean CE over every trained token of `examples`. The head runs on target positions only,
    `EVAL_CHUNK_TOKENS` at a time (the full (B, T, V) logits are never built for a plain head)."""
    from tunelab.data import collate

    total, count, was_training, device = 0.0, 0, model.training, model_device(model)
    model.eval()  # no dropout; the caller's mode comes back afterwards
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[i:i + batch_size], packing=False, pad_id=pad_id), device)
        with torch.no_grad(), autocast(precision, device):
            hidden, targets = trained_hidden(model, batch)
            if hidden is None:  # a head that transforms its logits: the plain full forward
                total += float(token_cross_entropy(model(**model_inputs(batch)).logits, batch["targets"]).sum())
            else:
                total += float(chunked_head_cross_entropy(hidden, model.get_output_embeddings(), targets,
                                                          EVAL_CHUNK_TOKENS))
        count += len(targets)
    model.train(was_training)
    return total / max(count, 1)


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn ids: eos plus the chat template's end marker when the vocabulary has one."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
             precision: str = "fp32") -> list[str]:
    """Greedy completions of token-id prompts, `batch_size` at a time, left-padded, KV-cached (an
    H2O-compressed cache when the model carries a KV budget: tunelab.models.h2o)."""
    from tunelab.models.h2o import compressed_cache, policy_of

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = []
    device = model_device(model)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # (B, width), left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with autocast(precision, device), compressed_cache(model, policy_of(model)) as cache:
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=stop_token_ids(tokenizer),
                                 use_cache=True, **({"cache": cache} if cache is not None else {}))
        outs += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outs


def has_gold_answer(record: Record, pattern: str) -> bool:
    """Whether generation can be scored on `record`: a chat record with an `answer` field, or whose
    last assistant turn has a final-answer line matching `pattern` (GSM8K's `#### 42`). Free-text
    replies have none: their gain is measured by loss and perplexity instead."""
    from tunelab.data import reference_answer

    if not record.messages:
        return False
    if record.answer is not None:
        return True
    reply = reference_answer(record)
    return bool(reply) and re.search(pattern, reply, re.MULTILINE) is not None


def answer_accuracy(model, tokenizer, records: list[Record], cfg: EvalConfig, precision: str = "fp32") -> dict:
    """Score the first `cfg.num_examples` records with a gold answer (`has_gold_answer`) by
    generating their last assistant turn; {} when none has one."""
    from tunelab.data import encode_prompt, reference_answer
    from tunelab.eval.metrics import contains_match, exact_match

    chat = [r for r in records if has_gold_answer(r, cfg.answer_pattern)][: cfg.num_examples]
    if not chat:
        return {}
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    preds = generate(model, tokenizer, [encode_prompt(r, tokenizer) for r in chat],
                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, precision=precision)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    refs = [reference_answer(r) for r in chat]
    score = {"exact_match": lambda p, r: exact_match(p, r, cfg.answer_pattern),
             "contains": contains_match}[cfg.metric]
    hits = [bool(score(p, r)) for p, r in zip(preds, refs)]
    out = {"accuracy": sum(hits) / len(hits), "num_examples": len(hits),
           "examples_per_s": len(hits) / seconds, **by_length(chat, hits),
           "samples": [{"source": r.source, "reference": ref, "prediction": p, "correct": h}
                       for r, ref, p, h in list(zip(chat, refs, preds, hits))[:5]]}
    if any("task" in r.meta for r in chat):  # a task set (AnyTaskTune): each sub-task scored apart
        out["by_task"] = by_task([r.meta.get("task", "(no task)") for r in chat], hits)
    return out


def by_task(tasks: list[str], hits: list[bool]) -> dict[str, dict]:
    """{task: {accuracy, num_examples}} over the scored examples, tasks sorted by name."""
    out = {}
    for t in sorted(set(tasks)):
        mine = [h for task, h in zip(tasks, hits) if task == t]
        out[t] = {"accuracy": sum(mine) / len(mine), "num_examples": len(mine)}
    return out


def by_length(records: list[Record], hits: list[bool]) -> dict:
    """{"by_length": {bucket: {"accuracy", "num_examples"}}} when the records name a length
    bucket in `meta["length"]` (builtin:longctx), else {}."""
    groups: dict[int, list[bool]] = {}
    for r, h in zip(records, hits):
        if "length" in r.meta:
            groups.setdefault(r.meta["length"], []).append(h)
    return {"by_length": {b: {"accuracy": sum(g) / len(g), "num_examples": len(g)}
                          for b, g in sorted(groups.items())}} if groups else {}
