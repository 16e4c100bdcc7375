"""A run's data: its training and evaluation records, checked against the tokenizer and encoded."""
from __future__ import annotations

import sys

from tunelab import config as C
from tunelab.errors import TunelabError


def load_examples(cfg: C.RunConfig, tokenizer, quiet: bool = False):
    """(training examples, eval records, eval examples) of `cfg.data`; eval ones are [] without eval
    data. `quiet`: no warnings (all processes read the data; one says what it found)."""
    from tunelab.data import encode, load_records

    train_records = load_records(cfg.data.train, cfg.data)
    eval_records = load_records(cfg.data.eval, cfg.data) if cfg.data.eval else []
    for spec, records in ((cfg.data.train, train_records), (cfg.data.eval, eval_records)):
        _check_chat_template(spec, records, tokenizer, cfg)
        if getattr(records, "num_skipped", 0) and not quiet:
            warn(f"warning: {spec}: skipped {records.num_skipped} malformed rows (data.on_bad_rows=skip); "
                 f"first: {'; '.join(records.skip_reasons)}")
    return encode(train_records, tokenizer, cfg.data), eval_records, encode(eval_records, tokenizer, cfg.data)


def _check_chat_template(spec: str, records, tokenizer, cfg: C.RunConfig) -> None:
    if getattr(tokenizer, "chat_template", None) is None and any(r.messages for r in records):
        raise TunelabError(f"model.name={cfg.model.name}: its tokenizer has no chat template, but {spec} "
                           f"holds chat rows (format {getattr(records, 'format', '?')}); use a model "
                           "whose tokenizer has one, or `text` rows")


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
