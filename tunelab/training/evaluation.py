"""Evaluating a run's model on its eval data: teacher-forced loss on the first eval.num_examples
examples, and answer accuracy by generation (tunelab.eval.task)."""
from __future__ import annotations

import math

from tunelab import config as C
from tunelab.eval.task import answer_accuracy, eval_loss
from tunelab.run.signals import pause_point


def evaluate(model, tok, eval_records, eval_examples, cfg: C.RunConfig, step: int | None = None) -> dict:
    if not eval_records:
        return {}
    pad = tok.pad_token_id
    scored = eval_examples[:cfg.eval.num_examples]
    out = {}
    if scored:  # no example, no loss (not a loss of 0)
        loss = eval_loss(model, scored, batch_size=cfg.eval.batch_size, pad_id=pad, precision=cfg.train.precision)
        out = {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "loss_examples": len(scored)}
    pause_point(f"eval:{step}")
    return out | answer_accuracy(model, tok, eval_records, cfg.eval, precision=cfg.train.precision)


def report(when: str, res: dict) -> None:
    """Print one line of task metrics (`when`: before / after), and accuracy per length bucket if any."""
    if "accuracy" in res:
        print(f"eval {when}: accuracy {res['accuracy']:.3f} on {res['num_examples']} held-out examples, "
              f"loss {res['eval_loss']:.4f}")
        if "by_length" in res:
            print("  by length: " + ", ".join(f"{b}: {v['accuracy']:.3f} ({v['num_examples']})"
                                             for b, v in res["by_length"].items()))
    elif "eval_loss" in res:
        print(f"eval {when}: loss {res['eval_loss']:.4f}, perplexity {res['perplexity']:.2f} on "
              f"{res['loss_examples']} held-out examples (no gold final answers: an `answer` field or a line "
              "matching eval.answer_pattern; accuracy not scored)")
