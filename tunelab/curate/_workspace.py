"""What a data stage works with: its model (loaded once, on first use), generation and embedding
through it, and a progress file that makes long generation resumable.

Progress: `map_chunks` cuts the work into fixed chunks (the same cut on every start, so each chunk
is generated in the same batches and gives the same result) and appends each finished chunk's
results to PROGRESS as one JSON line, flushed and fsynced. A killed stage restarts from its first
unfinished chunk; a torn last line (the kill landed inside the write) is simply redone.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from tunelab.data.records import Record
from tunelab.errors import TunelabError
from tunelab.run.signals import pause_point

PROGRESS = "progress.jsonl"


@dataclass
class Workspace:
    model_name: str | None = None
    """The model a stage that uses one loads: a built-in name, a local HF directory or a hub id."""
    work_dir: Path | None = None
    """Where progress is kept (a pipeline stage's directory); None: nothing is kept."""
    precision: str = "fp32"
    """Compute precision of generation and embeddings (fp32, bf16 or auto)."""
    device: str = "auto"
    """Where the model runs: auto (cuda when available), cpu or cuda."""
    say: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr, flush=True))
    """Where progress messages go."""
    loaded: tuple | None = None
    """(model, tokenizer) already in memory (the Python API); used instead of loading `model_name`."""

    @cached_property
    def _model_tok(self) -> tuple:
        if self.loaded is not None:
            return self.loaded
        if not self.model_name:
            raise TunelabError("this data stage needs a model: give one (--model, or `model:` in the stage)")
        from tunelab.models import load_model
        from tunelab.models.config import ModelConfig
        from tunelab.run.device import pick_device

        model, tok = load_model(ModelConfig(name=self.model_name))
        return model.to(pick_device(self.device)).eval(), tok

    @property
    def model(self):
        return self._model_tok[0]

    @property
    def tokenizer(self):
        return self._model_tok[1]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
        """Greedy completions of token-id prompts (tunelab.eval.task.generate)."""
        from tunelab.eval.task import generate

        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, precision=self.precision)

    def map_chunks(self, key: str, items: list, fn: Callable[[list], list], size: int) -> list:
        """`fn` over `items` in chunks of `size` (fn returns one JSON value per item), resuming
        from the chunks PROGRESS already holds for `key`."""
        done = self._progress(key)
        out: list = []
        for c, start in enumerate(range(0, len(items), size)):
            chunk = items[start:start + size]
            if c not in done or len(done[c]) != len(chunk):
                done[c] = fn(chunk)
                assert len(done[c]) == len(chunk), f"{key}: chunk {c} gave {len(done[c])} results for {len(chunk)} items"
                self._append(key, c, done[c])
                self.say(f"{key}: {min(start + size, len(items))} of {len(items)} rows")
            out += done[c]
        return out

    def _progress(self, key: str) -> dict[int, list]:
        path = self.work_dir / PROGRESS if self.work_dir else None
        if path is None or not path.exists():
            return {}
        done = {}
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line: that chunk is redone
            if isinstance(rec, dict) and rec.get("key") == key:
                done[rec["chunk"]] = rec["results"]
        return done

    def _append(self, key: str, chunk: int, results: list[Any]) -> None:
        if self.work_dir is None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.work_dir / PROGRESS, "a") as f:
            f.write(json.dumps({"key": key, "chunk": chunk, "results": results}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        pause_point(f"curate:{key}:chunk-{chunk}")

    @torch.no_grad()
    def embed(self, records: list[Record], batch_size: int, max_length: int) -> torch.Tensor:
        """(N, d) mean-pooled final hidden states of each row as the chat template renders it
        (text rows: their text), truncated to `max_length` tokens, in fp32."""
        from tunelab.data.render import render_chat
        from tunelab.run.device import autocast

        tok, model = self.tokenizer, self.model
        texts = [render_chat(r.messages, tok) if r.messages else r.text for r in records]
        device = next(model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length, add_special_tokens=False).to(device)
            with autocast(self.precision, device):
                hidden = model.get_decoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            out.append((hidden.float() * mask).sum(1) / mask.sum(1))  # (B, d)
        return torch.cat(out)
