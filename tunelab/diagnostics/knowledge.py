"""Knowledge, FineTuneBench style (Wu, Wu, Zou 2024; arXiv 2411.05059) on `builtin:facts`.

Invented people with invented facts (tunelab/data/builtin/facts.py). After training on them:
    verbatim_accuracy    the exact training questions        (memorisation)
    rephrased_accuracy   the same facts, asked differently   (generalisation)
    generalisation_gap   verbatim - rephrased
    updated_new_accuracy / updated_old_accuracy   for facts whose value changed (update_train):
                         how often the reply has the new value, and how often still the old one
A reply is correct when it contains the short answer as a whole word (case-insensitive), the
FineTuneBench exact-match reading for sentence replies. With `compare_base` the base model's
accuracy is reported alongside (about chance: the facts are invented).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tunelab.data.records import Record
from tunelab.diagnostics import Diagnostic, Findings, register
from tunelab.diagnostics._generation import Answerer
from tunelab.options import Options, require

SPLITS = {"verbatim": "probe_verbatim", "rephrased": "probe_rephrased", "updated": "probe_updated"}
"""Our name for each probe split -> the builtin:facts split."""


@dataclass(kw_only=True)
class KnowledgeConfig(Options):
    ranges: ClassVar = {"num_probes": ">= 1", "answer_tokens": ">= 1"}
    facts: str | None = None
    """The builtin:facts world to probe, e.g. 'builtin:facts?n_entities=50&seed=0' (any split
    option is replaced). null: the run's data.train when it is builtin:facts, else the defaults."""
    num_probes: int = 20
    """Probes per split (the first N): up to 3N questions."""
    answer_tokens: int = 20
    """Reply length (an answer sentence such as "Velmora Quistane lives in Quenth." is ~12 tokens)."""
    compare_base: bool = False
    """Also ask the base model (a chance-level reference: the facts are invented); doubles the cost."""

    def validate(self) -> None:
        require(self.facts is None or self.facts.startswith("builtin:facts"), "facts",
                f"must be a builtin:facts spec, got {self.facts!r}")


def world_spec(facts: str | None, train_spec: str) -> str:
    """The builtin:facts spec (without split) to probe: `facts`, else the run's training data
    when it is builtin:facts, else the defaults."""
    from tunelab.data.builtin import parse_spec

    spec = facts or (train_spec if train_spec.startswith("builtin:facts") else "builtin:facts")
    _, options = parse_spec(spec)
    options.pop("split", None)
    return "builtin:facts" + ("?" + "&".join(f"{k}={v}" for k, v in options.items()) if options else "")


def probe_sets(world: str, limit: int) -> dict[str, list[Record]]:
    """The first `limit` records of each probe split of `world`."""
    from tunelab.data.builtin import load_builtin

    sep = "&" if "?" in world else "?"
    return {name: load_builtin(f"{world}{sep}split={split}")[:limit] for name, split in SPLITS.items()}


def question(record: Record) -> str:
    return record.messages[0]["content"]


def knowledge_scores(answer: Answerer, sets: dict[str, list[Record]]) -> tuple[dict[str, float], dict]:
    """Accuracies of `answer` on each probe set (updated: new and old value) and per-set samples."""
    from tunelab.eval.metrics import contains_match

    scores, samples = {}, {}
    asked = [question(r) for records in sets.values() for r in records]
    by_question = dict(zip(asked, answer(asked)))  # one batched call for every split
    for name, records in sets.items():
        replies = [by_question[question(r)] for r in records]
        hits = [contains_match(p, r.answer) for p, r in zip(replies, records)]
        scores[f"{name}_accuracy" if name != "updated" else "updated_new_accuracy"] = _rate(hits)
        if name == "updated":
            scores["updated_old_accuracy"] = _rate([contains_match(p, r.meta["old_answer"])
                                                    for p, r in zip(replies, records)])
        samples[name] = [[question(r), r.answer, p, h] for r, p, h in list(zip(records, replies, hits))[:8]]
    return scores, samples


def _rate(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else 0.0


@register("knowledge")
class Knowledge(Diagnostic):
    """Memorisation vs generalisation vs update of injected facts (builtin:facts)."""

    Config = KnowledgeConfig

    @classmethod
    def makes_sense(cls, run_cfg) -> bool:
        return run_cfg.data.train.startswith("builtin:facts")

    def run(self, ctx) -> Findings:
        c = self.cfg
        world = world_spec(c.facts, ctx.cfg.data.train)
        sets = probe_sets(world, c.num_probes)
        tuned, samples = knowledge_scores(ctx.answerer("tuned", c.answer_tokens), sets)
        summary = tuned | {"generalisation_gap": tuned["verbatim_accuracy"] - tuned["rephrased_accuracy"]}
        if c.compare_base:
            base, _ = knowledge_scores(ctx.answerer("base", c.answer_tokens), sets)
            summary |= {f"base_{k}": v for k, v in base.items()}
        columns = ["question", "answer", "tuned_reply", "correct"]
        return Findings(summary, {"world": world, "num_probes": {k: len(v) for k, v in sets.items()},
                                  "samples": {k: {"columns": columns, "rows": v} for k, v in samples.items()}})
