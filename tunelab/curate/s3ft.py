"""S3FT: Gupta et al., "Selective Self-to-Supervised Fine-Tuning for Generalization in Large Language
Models" (NAACL Findings 2025; arXiv 2502.08130). No public code; the pipeline is fully specified.

Before training, the base model answers every training prompt. Where a judge accepts its answer,
that answer becomes the target (the model's own words, nothing to unlearn); else the model rewrites
the gold answer in its own words and that paraphrase is the target if the judge accepts it; else
the gold answer stays. Then standard SFT on the new targets. The paper reports in-domain gains over
SFT with about half of SFT's drop on general benchmarks (forgetting).

    for (x, y) in D:
        y_hat = M0(x);                     if judge(x, y_hat, y): target = y_hat     (self)
        y_par = M0(paraphrase(x, y));      elif judge(x, y_par, y): target = y_par   (paraphrase)
        else: target = y                                                              (gold)

Readings chosen (the brief marks them unverified): greedy decoding; the paraphrase prompt below
(configurable); the judge is pluggable (`final_answer` for tasks with a final answer line, see
tunelab.curate._judges). The paraphrase is generated only for rejected answers. Each row's
provenance records `self`, `paraphrase` or `gold`; generation is resumable chunk by chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tunelab.curate import DataStage, Workspace, derived, provenance, register
from tunelab.curate._io import load_input, prompt_messages
from tunelab.curate._judges import get_judge, judged
from tunelab.data.records import Record
from tunelab.data.render import encode_prompt
from tunelab.errors import TunelabError
from tunelab.options import Options, require

PARAPHRASE = ("Here is a question and a correct answer to it. Rewrite the answer in your own words. Keep every "
              "step and keep the same final result, in the same format.\n\nQuestion: {question}\n\nAnswer:\n{answer}")


@dataclass(kw_only=True)
class S3FTConfig(Options):
    ranges: ClassVar = {"max_new_tokens": ">= 1", "batch_size": ">= 1", "chunk": ">= 1"}
    input: str = "builtin:arith?n=300&split=train"
    """The labeled training rows (their last assistant turn is the gold answer)."""
    judge: str = "final_answer"
    """Accepts a candidate answer: final_answer, contains, or your own as module:function."""
    paraphrase_prompt: str = PARAPHRASE
    """Asks the model to rewrite the gold answer; {question} and {answer} are filled in."""
    max_new_tokens: int = 128
    """Length of each generated answer."""
    batch_size: int = 16
    """Prompts generated together."""
    chunk: int = 64
    """Rows per resumable chunk (a killed stage redoes at most one chunk)."""

    def validate(self) -> None:
        require("{question}" in self.paraphrase_prompt and "{answer}" in self.paraphrase_prompt,
                "paraphrase_prompt", "must contain {question} and {answer}")
        get_judge(self.judge)  # an unknown judge fails now, not after an hour of generation


@register("s3ft")
class S3FT(DataStage):
    """Targets: the model's own accepted answer, else its accepted paraphrase of the gold, else gold."""

    verb: ClassVar[str] = "relabel"
    uses_model: ClassVar[bool] = True
    Config = S3FTConfig

    def run(self, ws: Workspace) -> list[Record]:
        rows = load_input(self.cfg.input)
        for r in rows:
            if not r.messages or r.messages[-1]["role"] != "assistant":
                raise TunelabError(f"{r.source}: S3FT needs labeled rows (a gold assistant turn last)")
        decisions = ws.map_chunks("s3ft", rows, lambda chunk: self._decide(ws, chunk), self.cfg.chunk)
        out = []
        for r, d in zip(rows, decisions):
            msgs = r.messages[:-1] + [{"role": "assistant", "content": d["target"]}]
            out.append(derived(r, msgs, r.answer, provenance(self.name, d["kind"], r, gold=r.messages[-1]["content"])))
        return out

    def _decide(self, ws: Workspace, rows: list[Record]) -> list[dict]:
        """{kind, target} per row: self, else paraphrase, else gold."""
        judge, name, c = get_judge(self.cfg.judge), self.cfg.judge, self.cfg
        gold = [r.messages[-1]["content"] for r in rows]
        own = ws.generate([encode_prompt(r, ws.tokenizer) for r in rows], c.max_new_tokens, c.batch_size)
        ok = [judged(judge, name, r, y, g) for r, y, g in zip(rows, own, gold)]
        redo = [i for i, accepted in enumerate(ok) if not accepted]
        para = ws.generate([self._paraphrase_prompt(rows[i], gold[i], ws) for i in redo],
                           c.max_new_tokens, c.batch_size) if redo else []
        out = [{"kind": "self", "target": y} if accepted else None for y, accepted in zip(own, ok)]
        for i, text in zip(redo, para):
            keep = judged(judge, name, rows[i], text, gold[i])
            out[i] = {"kind": "paraphrase", "target": text} if keep else {"kind": "gold", "target": gold[i]}
        return out

    def _paraphrase_prompt(self, record: Record, gold: str, ws: Workspace) -> list[int]:
        question = "\n\n".join(m["content"] for m in prompt_messages(record) if m["role"] == "user")
        text = self.cfg.paraphrase_prompt.format(question=question, answer=gold)
        return encode_prompt(Record(messages=[{"role": "user", "content": text}]), ws.tokenizer)
