"""The evaluation harness: the same questions, the same retrieved passages (the retriever is run
once and held fixed), several generators, each with and without the passages; a judge scores every
answer. A generator is any callable user-turn texts -> replies (`model_generator` wraps a model)."""
from __future__ import annotations

from statistics import fmean
from typing import Callable

from tunelab.data.formats import rag_prompt
from tunelab.rag.judges import Judge

Generator = Callable[[list[str]], list[str]]


def model_generator(model, tokenizer, *, max_new_tokens: int = 16, batch_size: int = 8,
                    precision: str = "fp32") -> Generator:
    """Greedy replies of `model` to user turns rendered with its chat template."""
    from tunelab.data.render import render_chat
    from tunelab.eval.task import generate

    def answer(turns: list[str]) -> list[str]:
        texts = [render_chat([{"role": "user", "content": t}], tokenizer, add_generation_prompt=True) for t in turns]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        precision=precision) if ids else []
    return answer


def prompts(questions: list[str], contexts: list[list[str]] | None) -> list[str]:
    """The user turns: each question with its passages (None: without)."""
    return [rag_prompt(q, c if contexts else []) for q, c in zip(questions, contexts or [[]] * len(questions))]


def score(generator: Generator, questions: list[str], references: list[str], judge: Judge,
          contexts: list[list[str]] | None = None) -> dict:
    """Mean judge scores of `generator` on the questions (with `contexts` when given), and per-question rows."""
    replies = generator(prompts(questions, contexts))
    marks = [judge(q, r, ref) for q, r, ref in zip(questions, replies, references)]
    keys = list(marks[0]) if marks else []
    summary = {k: fmean(m[k] for m in marks) for k in keys} | {"num_questions": len(marks),
                                                                "num_correct": int(sum(m.get("accuracy", 0) for m in marks))}
    rows = [[q, ref, r, *(round(m[k], 4) for k in keys)] for q, ref, r, m in zip(questions, references, replies, marks)]
    return {"summary": summary, "rows": {"columns": ["question", "reference", "reply", *keys], "rows": rows}}


def compare(generators: dict[str, Generator], questions: list[str], references: list[str], judge: Judge,
            contexts: list[list[str]]) -> dict[str, dict]:
    """For each generator `g`: `g` (no passages) and `g+rag` (the fixed retrieved passages)."""
    out = {}
    for name, gen in generators.items():
        out[name] = score(gen, questions, references, judge)
        out[f"{name}+rag"] = score(gen, questions, references, judge, contexts)
    return out
