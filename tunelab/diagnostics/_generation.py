"""Asking a model questions: chat-rendered prompts and batched greedy answers.

An `Answerer` maps questions (user-turn strings) to the model's replies. Diagnostics that score
answers take Answerers, so tests can pass a plain function (a lookup table) instead of a model.
"""
from __future__ import annotations

from typing import Callable

Answerer = Callable[[list[str]], list[str]]
"""questions -> replies, one per question, in order."""


def question_ids(tokenizer, question: str) -> list[int]:
    """Token ids of `question` as a user turn with the generation prompt after it. A tokenizer
    without a chat template gets a plain 'Question: ...\\nAnswer:' prompt instead."""
    from tunelab.data.render import render_chat

    if getattr(tokenizer, "chat_template", None) is None:
        text = f"Question: {question}\nAnswer:"
    else:
        text = render_chat([{"role": "user", "content": question}], tokenizer, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_answerer(model, tokenizer, *, max_new_tokens: int, batch_size: int = 16,
                  precision: str = "fp32") -> Answerer:
    """An Answerer that asks `model` by greedy decoding (tunelab.eval.task.generate)."""
    from tunelab.eval.task import generate

    def answer(questions: list[str]) -> list[str]:
        if not questions:
            return []
        prompts = [question_ids(tokenizer, q) for q in questions]
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        precision=precision)
    return answer


def cached(answerer: Answerer) -> Answerer:
    """The same Answerer, remembering replies so a question is generated once per model."""
    memo: dict[str, str] = {}

    def answer(questions: list[str]) -> list[str]:
        todo = list(dict.fromkeys(q for q in questions if q not in memo))
        memo.update(zip(todo, answerer(todo)))
        return [memo[q] for q in questions]
    return answer


def right_padded(seqs: list[list[int]], pad_id: int, device="cpu"):
    """(input_ids, attention_mask), both (B, T) on `device`, right-padded with `pad_id`."""
    import torch

    T = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=device)
    return ids, mask
