"""TL-Training PKT: up-weight key tokens of tool-use responses (arXiv 2412.15495, part 6b)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tunelab.errors import ConfigError
from tunelab.objectives import IGNORE, LossOutput, Objective, register, trained_logits
from tunelab.objectives._segments import segment_ids
from tunelab.options import Options
from tunelab.run.context import OUTSIDE_TRAINING, StepContext

CALL_NAME = r"[A-Za-z_][\w.]*(?=\s*\()"
"""The default key pattern: the name in a Python-style call `name(` (TL-Training's MAE format)."""


@dataclass(kw_only=True)
class TLWeightingConfig(Options):
    ranges: ClassVar = {"max_weight": ">= 1"}
    key_patterns: list[str] = (CALL_NAME,)
    """Regexes over each decoded response span; tokens overlapping a match are key tokens."""
    first_token_is_key: bool = True
    """The first token of each response span is a key token (as in the paper)."""
    max_weight: float = 9.0
    """Cap on the key-token weight min(n_other / n_key, max_weight); 1 gives plain SFT."""

    def validate(self) -> None:
        self.key_patterns = list(self.key_patterns)
        for i, pat in enumerate(self.key_patterns):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"key_patterns[{i}]: invalid regex {pat!r}: {e}") from None


def key_weight(num_key: int, num_other: int, max_weight: float) -> float:
    """w_key = min(n_other / n_key, max_weight) when 0 < n_key < n_other, else 1."""
    return min(num_other / num_key, max_weight) if 0 < num_key < num_other else 1.0


def token_offsets(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `ids` and each token's (start, end) character span in it.

    Re-encoding the decoded text with offsets is exact whenever it gives back the same ids (the
    usual case); otherwise each token is decoded on its own and the pieces concatenated (loses
    SentencePiece word-initial spaces and splits multi-byte characters, so patterns may then miss)."""
    text = tokenizer.decode(ids)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] == ids:
            return text, [tuple(o) for o in enc["offset_mapping"]]
    pieces = tokenizer.batch_decode([[i] for i in ids])
    ends = torch.tensor([len(p) for p in pieces], device="cpu").cumsum(0).tolist()
    return "".join(pieces), [(e - len(p), e) for p, e in zip(pieces, ends)]


def key_token_mask(text: str, offsets: list[tuple[int, int]], patterns: list[re.Pattern]) -> list[bool]:
    """Per token: does its character span overlap a match of any pattern?"""
    hit = bytearray(len(text) + 1)
    for pat in patterns:
        for m in pat.finditer(text):
            hit[m.start():m.end()] = b"\x01" * (m.end() - m.start())
    return [any(hit[s:e]) for s, e in offsets]


def spans(positions: list[int]) -> list[list[int]]:
    """Split sorted positions into runs of consecutive ones (one run per response turn)."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


@register("tl_weighting")
class TLWeighting(Objective):
    """TL-Training's prioritized key tokens (PKT), Ye et al. 2025, arXiv 2412.15495.

    Each response token is a key token or not; per example, with n_key key and n_other other
    trained tokens, key tokens get the weight w = min(n_other / n_key, max_weight) when
    n_key < n_other, else 1, and every other token 1 (the paper's "para" tokens weigh 1 too):
        L_example = sum_t w_t CE_t / sum_t w_t          (GCE with q = 0 is CE)
    The paper's key tokens are the first response token and the tool-name tokens where the gold
    name diverges from other candidate names, found through CodeLlama-specific strings.

    Readings we chose:
    - Classes come from regexes over the decoded response text (`key_patterns`), not hard-coded
      strings; the default marks the whole called function name (candidate tool names are not in
      the batch, so the divergence point cannot be found), plus each span's first token.
    - Weights are per example (the paper trains with batch size 1), so they do not depend on how
      examples are batched or packed. To fit the loop's sum / token-count normalisation, each
      example's weights are rescaled to sum to its token count: the example's loss is exactly the
      paper's, and examples combine like SFT (token-weighted). All weights 1 is exactly SFT.
    - Multi-turn examples: each trained span (assistant turn) has its own first token.
    - Cost: each step decodes every response span once and re-encodes it with offsets (fast
      tokenizers), CPU work linear in the response tokens, no extra forward.
    Needs setup(model, tokenizer) to decode. Metrics: `key_fraction`, `key_weight` (mean w over
    examples with key tokens)."""

    Config = TLWeightingConfig

    def __init__(self, cfg: TLWeightingConfig | None = None):
        super().__init__(cfg)
        self.tokenizer = None
        self.patterns = [re.compile(p) for p in self.cfg.key_patterns]

    def setup(self, model, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _is_key(self, ids: list[int]) -> list[bool]:
        """Key-token flags for one response span of token ids."""
        if self.patterns:
            if self.tokenizer is None:
                raise ConfigError("objective.key_patterns: tl_weighting needs setup(model, tokenizer) to decode")
            key = key_token_mask(*token_offsets(self.tokenizer, ids), self.patterns)
        else:
            key = [False] * len(ids)
        key[0] = key[0] or self.cfg.first_token_is_key
        return key

    def token_weights(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-position weights, (B, T) float, 0 where no loss; each example's sum = its token count."""
        targets = batch["targets"]
        seg = segment_ids(batch).flatten().tolist()
        flat_t = targets.flatten().tolist()
        weights = torch.zeros(targets.numel(), device="cpu")  # filled position by position on the host
        by_example: dict[int, list[int]] = {}
        for pos, (s, t) in enumerate(zip(seg, flat_t)):
            if t != IGNORE:
                by_example.setdefault(s, []).append(pos)
        num_key, ws = 0, []
        for positions in by_example.values():
            key = [k for run in spans(positions) for k in self._is_key([flat_t[p] for p in run])]
            n_key = sum(key)
            w = key_weight(n_key, len(key) - n_key, self.cfg.max_weight)
            raw = torch.tensor([w if k else 1.0 for k in key], device="cpu")
            weights[positions] = raw * (len(key) / raw.sum())
            num_key += n_key
            ws += [w] if n_key else []
        metrics = {"key_fraction": num_key / max(sum(map(len, by_example.values())), 1),
                   "key_weight": sum(ws) / len(ws) if ws else 1.0}
        return weights.view(targets.shape).to(targets.device), metrics

    def loss(self, model, batch, ctx: StepContext = OUTSIDE_TRAINING):
        weights, metrics = self.token_weights(batch)  # (B, T)
        logits, targets = trained_logits(model, batch)  # (N, V), (N,)
        ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
        w = weights[batch["targets"] != IGNORE]  # (N,), same row-major order as trained_logits
        return LossOutput((w * ce).sum(), targets.numel(), metrics)
