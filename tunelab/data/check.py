"""`tunelab data check`: what a data source turns into before any training is spent on it —
rows, format, skipped rows, token lengths, truncation, trained-token share, and one rendered
example with its trained tokens marked."""
from __future__ import annotations

import statistics
import sys
from typing import Any

from tunelab.data.config import DataConfig
from tunelab.data.load import load_records
from tunelab.data.records import Example
from tunelab.data.render import IGNORE, Examples, encode

MARKS = ("[[", "]]")
"""Plain-text markers around trained spans (when the output is not a terminal)."""
COLORS = ("\x1b[1;32m", "\x1b[0m")
"""Bold green around trained spans on a terminal."""


def check_data(spec: str, tokenizer: Any, cfg: DataConfig, color: bool | None = None,
               list_all: bool = False) -> str:
    """A text report on `spec` as it would be trained with `tokenizer` and `cfg`.
    `color=None` colours trained tokens only when stdout is a terminal. With `list_all`, bad rows
    are skipped and every one is listed with its reason (otherwise the first stops the check,
    unless cfg.on_bad_rows is skip)."""
    import dataclasses

    records = load_records(spec, dataclasses.replace(cfg, on_bad_rows="skip") if list_all else cfg)
    examples = encode(records, tokenizer, cfg)
    lengths = [len(ex) for ex in examples]
    lines = [
        f"data: {spec}",
        f"rows: {len(records)} loaded, {getattr(records, 'num_skipped', 0)} skipped as malformed",
        f"format: {getattr(records, 'format', '?')}",
        f"examples: {len(examples)} ({examples.num_dropped} dropped: no trained token after truncation)",
    ]
    lines += _meta_lines(records)
    if list_all and records.all_skipped:
        lines += [f"bad rows ({len(records.all_skipped)}):", *(f"  {e}" for e in records.all_skipped)]
    if not examples:
        return "\n".join(lines)
    lines += _length_lines(lengths, examples, cfg.max_length)
    lines += ["", "histogram of token lengths:", *histogram(lengths)]
    use_color = sys.stdout.isatty() if color is None else color
    lines += ["", f"example ({examples[0].source}), trained tokens marked "
              f"{'in green' if use_color else 'with ' + ' '.join(MARKS)}:",
              render_marked(examples[0], tokenizer, COLORS if use_color else MARKS)]
    return "\n".join(lines)


def _meta_lines(records) -> list[str]:
    """Counts by `task` (task sets) and by provenance `stage: kind` (what data stages wrote)."""
    from collections import Counter

    tasks = Counter(r.meta["task"] for r in records if "task" in r.meta)
    made = Counter(f"{p.get('stage', '?')}: {p.get('kind', '?')}" for r in records
                   if isinstance(p := r.meta.get("provenance"), dict))
    lines = [f"tasks: {', '.join(f'{t} {n}' for t, n in sorted(tasks.items()))}"] if tasks else []
    if made:
        lines.append(f"provenance ({sum(made.values())} of {len(records)} rows): "
                     + ", ".join(f"{k} {n}" for k, n in sorted(made.items())))
    return lines


def _length_lines(lengths: list[int], examples: Examples, max_length: int) -> list[str]:
    total = sum(lengths)
    trained = sum(sum(label != IGNORE for label in ex.labels[1:]) for ex in examples)
    return [
        f"tokens per example: min {min(lengths)}, median {statistics.median(lengths):g}, "
        f"mean {statistics.fmean(lengths):.1f}, max {max(lengths)}",
        f"truncated at max_length={max_length}: {examples.num_truncated}"
        + (f" (longest before truncation: {examples.longest_text()})" if examples.num_truncated else ""),
        f"tokens: {total} total, {trained} trained ({100 * trained / max(total, 1):.1f}%)",
    ]


def histogram(values: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """An ASCII histogram, one line per bin: `[lo, hi) count ####`."""
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))  # ceil, so `hi` falls in the last bin
    counts = [0] * (-(-(hi - lo + 1) // step))
    for v in values:
        counts[(v - lo) // step] += 1
    top = max(counts)
    return [f"{lo + i * step:>7}-{lo + (i + 1) * step - 1:<7} {c:>6} {'#' * round(width * c / top)}"
            for i, c in enumerate(counts)]


def render_marked(ex: Example, tokenizer: Any, marks: tuple[str, str] = MARKS) -> str:
    """Decode `ex` with each run of trained tokens wrapped in `marks`."""
    parts, run, trained = [], [], False
    for tid, label in zip(ex.input_ids, ex.labels):
        if (label != IGNORE) != trained and run:
            parts.append(_wrap(tokenizer.decode(run), trained, marks))
            run = []
        trained = label != IGNORE
        run.append(tid)
    parts.append(_wrap(tokenizer.decode(run), trained, marks))
    return "".join(parts)


def _wrap(text: str, trained: bool, marks: tuple[str, str]) -> str:
    return f"{marks[0]}{text}{marks[1]}" if trained else text
