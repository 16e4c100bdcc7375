"""Fine-tuning vs retrieval (Barnett et al. 2024, "Fine-tuning or fine-failing?", arXiv 2406.11201).

Public surface:
    facts_collection(n_entities, seed) -> (documents, questions)   built from builtin:facts
    BM25Retriever(documents).retrieve(queries, k)                  bm25s (extra: tunelab[rag])
    score / compare / model_generator                              the harness (harness.py)
    token_overlap_judge, JUDGES                                    judges (judges.py)
The RAG data format (`question`, `contexts`, `answer`) is tunelab.data's `rag` format.
"""
from __future__ import annotations

from tunelab.rag.collection import QA, Document, facts_collection
from tunelab.rag.harness import compare, model_generator, score
from tunelab.rag.judges import JUDGES, token_overlap_judge
from tunelab.rag.retriever import BM25Retriever

__all__ = ["BM25Retriever", "Document", "JUDGES", "QA", "compare", "facts_collection", "model_generator", "score",
           "token_overlap_judge"]
