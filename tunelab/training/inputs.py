"""A run's data: its training and evaluation records, checked against the tokenizer and encoded."""
from __future__ import annotations

import sys

from tunelab import config as C
from tunelab.errors import TunelabError


def load_examples(cfg: C.RunConfig, tokenizer, quiet: bool = False, say=print):
    """(training examples, eval records, eval examples) of `cfg.data`; eval ones are [] without eval
    data. `say` gets the line saying what is evaluated (data.eval, or a held-out slice of
    data.train: tunelab.data.split). `quiet`: no warnings and no line (all processes read the
    data; one says what it found)."""
    from tunelab.data import encode
    from tunelab.data.split import train_eval_records

    train_records, eval_records, what = train_eval_records(cfg.data)
    if not quiet:
        say(what)
    for spec, records in ((cfg.data.train, train_records), (cfg.data.eval or "eval data", eval_records)):
        _check_chat_template(spec, records, tokenizer, cfg)
        if getattr(records, "num_skipped", 0) and not quiet:
            warn(f"warning: {spec}: skipped {records.num_skipped} malformed rows (data.on_bad_rows=skip); "
                 f"first: {'; '.join(records.skip_reasons)}")
    train_ex, eval_ex = encode(train_records, tokenizer, cfg.data), encode(eval_records, tokenizer, cfg.data)
    for name, examples in (("data.train", train_ex), ("eval data", eval_ex)):
        if (cuts := examples.cuts(cfg.data.max_length)) is not None and not quiet:
            warn(f"warning: {name}: {cuts}")
    if not train_ex:
        raise TunelabError(f"data.train: no example left to train: all {train_ex.num_dropped} were dropped (no "
                           f"trained token after truncation at data.max_length={cfg.data.max_length}); raise "
                           "data.max_length or shorten the prompts")
    return train_ex, eval_records, eval_ex


def _check_chat_template(spec: str, records, tokenizer, cfg: C.RunConfig) -> None:
    if getattr(tokenizer, "chat_template", None) is None and any(r.messages for r in records):
        raise TunelabError(f"model.name={cfg.model.name}: its tokenizer has no chat template, but {spec} "
                           f"holds chat rows (format {getattr(records, 'format', '?')}); use a model "
                           "whose tokenizer has one, or `text` rows")


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
