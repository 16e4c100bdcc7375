"""Judges: score an answer against a reference on accuracy and completeness (Barnett et al. 2024,
"Fine-tuning or fine-failing?", arXiv 2406.11201, judge their RAG answers on these two criteria
with an LLM). A judge is any callable (question, answer, reference) -> {"accuracy", "completeness"}
in [0, 1]; an LLM judge plugs in the same way. Built in: the deterministic token-overlap judge."""
from __future__ import annotations

from typing import Callable

from tunelab.eval.metrics import token_overlap

Judge = Callable[[str, str, str], dict[str, float]]


def token_overlap_judge(question: str, answer: str, reference: str) -> dict[str, float]:
    """completeness = the share of the reference's normalised tokens the answer contains (SQuAD
    recall); accuracy = 1 when it contains all of them, else 0; precision is kept for reference."""
    precision, recall = token_overlap(answer, reference)
    return {"accuracy": float(recall == 1.0), "completeness": recall, "precision": precision}


JUDGES: dict[str, Judge] = {"token_overlap": token_overlap_judge}
