"""Fine-tuning x RAG at several training-set sizes (Barnett et al. 2024's design, scaled to a CPU):
the generator is fine-tuned (LoRA) on RAG-format rows (question + the fixed retriever's passages ->
answer, loss on the answer only) from a pool of questions disjoint from the evaluation questions;
base, fine-tuned, base+RAG and fine-tuned+RAG are then scored by the judge on the same evaluation
questions and the same retrieved passages. Smaller training sets are prefixes of larger ones."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from tunelab.rag.collection import facts_collection
from tunelab.rag.harness import compare, model_generator
from tunelab.rag.judges import JUDGES
from tunelab.rag.retriever import BM25Retriever

LORA = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}


def _write_train(path: Path, qas, contexts) -> None:
    rows = [{"question": q.question, "contexts": c, "answer": q.answer} for q, c in zip(qas, contexts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def finetune(train_file: Path, size: int, out: Path, model: str, seed: int):
    """A LoRA run on the first `size` rows for one epoch (micro-batch 4); returns (model, tokenizer)."""
    from tunelab import config as C
    from tunelab.training.final import load_trained
    from tunelab.training.loop import train

    cfg = C.build({"model": {"name": model}, "method": LORA,
                   "data": {"train": str(train_file), "format": "rag", "eval": None, "max_length": 768},
                   "train": {"steps": math.ceil(size / 4), "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
                             "seed": seed, "save_every": 0, "progress": False},
                   "eval": {"before": False}, "output": str(out)})
    train(cfg, out)
    _, tuned, tok, _ = load_trained(out)
    return tuned, tok


def run_experiment(out: Path, *, sizes: list[int], num_eval: int, top_k: int, n_entities: int, interval,
                   seed: int = 0, model: str = "smollm2-135m", judge: str = "token_overlap") -> dict:
    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig

    out.mkdir(parents=True, exist_ok=True)
    docs, qas = facts_collection(n_entities, seed)
    random.Random(seed).shuffle(qas)
    evals, pool = qas[:num_eval], qas[num_eval:num_eval + max(sizes)]
    retriever = BM25Retriever(docs)
    found = retriever.retrieve([q.question for q in evals + pool], top_k)
    eval_ctx = [[d.text for d in ds] for ds in found[:num_eval]]
    hits = [q.doc_id in {d.doc_id for d in ds} for q, ds in zip(evals, found[:num_eval])]
    _write_train(out / "train.jsonl", pool, [[d.text for d in ds] for ds in found[num_eval:]])
    questions, refs = [q.question for q in evals], [q.answer for q in evals]
    base, tok = load_model(ModelConfig(name=model))
    results = compare({"base": model_generator(base.eval(), tok, max_new_tokens=16)}, questions, refs,
                      JUDGES[judge], eval_ctx)
    for size in sizes:
        tuned, tok = finetune(out / "train.jsonl", size, out / f"ft-{size}", model, seed)
        results |= compare({f"ft-{size}": model_generator(tuned, tok, max_new_tokens=16)}, questions, refs,
                           JUDGES[judge], eval_ctx)
    return {"judge": judge, "num_documents": len(docs), "num_eval": num_eval, "top_k": top_k,
            "retrieval_hit_rate": sum(hits) / len(hits), "table": _table(results, interval), "conditions": results}


def _table(results: dict, interval) -> dict:
    rows = []
    for name, r in results.items():
        s = r["summary"]
        rows.append([name, s["accuracy"], interval(s["num_correct"], s["num_questions"]), s["completeness"], s["precision"]])
    return {"columns": ["condition", "accuracy", "accuracy_95ci", "completeness", "precision"], "rows": rows}
