"""Adaptive reasoning depth at inference, after ReasoningV (Qin et al., 2025; arXiv 2504.14560),
and the unbiased pass@k estimator its results are reported with.

What the paper describes (through a review; no code was released, the brief marks it [R]): a
lightweight classifier (its "Judge Adapter") rates each problem easy, medium or hard; easy problems
are answered without explicit reasoning and harder ones get larger reasoning budgets, for up to
75% fewer generated tokens. What is here: the routing, with any classifier — a function from the
prompt to a label — and a budget per label (max new tokens and an optional system instruction);
prompts are generated in groups of equal budget. What is not: the trained judge itself (its
architecture, data and training are unpublished). `by_length` is a stand-in classifier (word
count thresholds), there to make the router usable and testable, not a reproduction.

    pass@k = 1 - C(n - c, k) / C(n, k)       n samples per problem, c of them correct
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import comb

from tunelab.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    max_new_tokens: int
    """How long the answer (reasoning included) may be."""
    system: str | None = None
    """A system instruction for this depth (None: the prompt as it is)."""


BUDGETS = {"easy": Budget(48, "Answer with the final result only, without explaining."),
           "medium": Budget(128), "hard": Budget(384, "Think step by step before giving the final result.")}
"""Default budgets per difficulty (our choice; the paper's are not published)."""


def by_length(prompt: str, medium: int = 30, hard: int = 60) -> str:
    """A stand-in difficulty classifier: easy below `medium` words, hard from `hard` words."""
    words = len(prompt.split())
    return "easy" if words < medium else ("medium" if words < hard else "hard")


class ReasoningBudgetRouter:
    """Maps each prompt to a budget through `classify` (prompt -> label in `budgets`)."""

    def __init__(self, classify: Callable[[str], str] = by_length, budgets: dict[str, Budget] | None = None):
        self.classify, self.budgets = classify, dict(budgets or BUDGETS)

    def route(self, prompt: str) -> tuple[str, Budget]:
        label = self.classify(prompt)
        if label not in self.budgets:
            raise ConfigError(f"reasoning budget: the classifier said {label!r}; the budgets are for "
                              f"{', '.join(self.budgets)}")
        return label, self.budgets[label]

    def generate(self, model, tokenizer, prompts: list[str], batch_size: int = 16, precision: str = "fp32") -> list[dict]:
        """Greedy answers, each generated with its prompt's budget: [{label, max_new_tokens, text}]."""
        from tunelab.data import encode_prompt
        from tunelab.data.records import Record
        from tunelab.eval.task import generate

        routed = [self.route(p) for p in prompts]
        out: list[dict | None] = [None] * len(prompts)
        for label in dict.fromkeys(lab for lab, _ in routed):
            idx = [i for i, (lab, _) in enumerate(routed) if lab == label]
            budget = self.budgets[label]
            system = [{"role": "system", "content": budget.system}] if budget.system else []
            ids = [encode_prompt(Record(messages=system + [{"role": "user", "content": prompts[i]}]), tokenizer) for i in idx]
            texts = generate(model, tokenizer, ids, max_new_tokens=budget.max_new_tokens, batch_size=batch_size,
                             precision=precision)
            for i, text in zip(idx, texts):
                out[i] = {"label": label, "max_new_tokens": budget.max_new_tokens, "text": text}
        return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples is correct) from n samples, c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)
