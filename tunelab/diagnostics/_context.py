"""What a diagnostic reads: a trained run, its base model and its tuned model, loaded once, on
first use, and shared by every diagnostic of one `tunelab diagnose` call."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from tunelab.diagnostics._generation import Answerer, cached, chat_answerer

GENERATION_BATCH = 16
"""Prompts generated together when a diagnostic asks questions."""


class Context:
    """A run under diagnosis. `base` is the run's `model` loaded fresh (load_model); `tuned`,
    `tokenizer` and `method` come from `tunelab.training.final.load_trained`. Both models are in eval
    mode on the run's device. Replies are cached per (model, max_new_tokens, question)."""

    def __init__(self, run_dir: str | Path):
        from tunelab import config as C
        from tunelab.run.rundir import is_run_dir
        from tunelab.errors import TunelabError

        self.run_dir = Path(run_dir)
        if not is_run_dir(self.run_dir):
            raise TunelabError(f"{self.run_dir}: not a run directory (no config.yaml)")
        self.cfg = C.load(self.run_dir / "config.yaml")
        self._answerers: dict[tuple[str, int], Answerer] = {}

    @cached_property
    def device(self):
        """train.device, with `auto` meaning cuda when available."""
        from tunelab.run.device import pick_device
        return pick_device(self.cfg.train.device)

    @cached_property
    def _trained(self):
        from tunelab.training.final import load_trained
        return load_trained(self.run_dir, device=str(self.device))

    @property
    def tuned(self):
        return self._trained[1]

    @property
    def tokenizer(self):
        return self._trained[2]

    @property
    def method(self):
        return self._trained[3]

    def merged(self):
        """The tuned model with the method's change folded into plain weights (`method.merge`, in
        place: the same function, so later diagnostics may keep using it as `tuned`)."""
        if not getattr(self, "_is_merged", False):
            cfg, model, tok, method = self._trained
            self._trained = (cfg, method.merge(model).eval(), tok, method)
            self._is_merged = True
        return self.tuned

    @cached_property
    def base(self):
        from tunelab.models import load_model
        model, _ = load_model(self.cfg.model)
        return model.to(self.device).eval()

    def model(self, which: str):
        """`base` or `tuned`."""
        return {"base": lambda: self.base, "tuned": lambda: self.tuned}[which]()

    def answerer(self, which: str, max_new_tokens: int) -> Answerer:
        """Greedy replies of the `base` or `tuned` model, cached."""
        key = (which, max_new_tokens)
        if key not in self._answerers:
            self._answerers[key] = cached(chat_answerer(
                self.model(which), self.tokenizer, max_new_tokens=max_new_tokens, batch_size=GENERATION_BATCH,
                precision=self.cfg.train.precision))
        return self._answerers[key]

    def eval_prompts(self, n: int, max_length: int) -> list[list[int]]:
        """Token ids of the first `n` prompts of the run's eval data (data.eval, or the rows held
        out of data.train; the train data if it has none): chat records up to the generation
        prompt, text records' first `max_length` tokens."""
        from tunelab.data import encode_prompt
        from tunelab.data.split import train_eval_records

        train, evals, _ = train_eval_records(self.cfg.data)
        records = (evals or train)[:n]
        return [encode_prompt(r, self.tokenizer)[-max_length:] if r.messages
                else self.tokenizer(r.text, add_special_tokens=True)["input_ids"][:max_length] for r in records]
