"""Data: files or builtin tasks -> Records -> Examples (token ids + loss labels) -> batches.

Public surface:
- `load_records(spec, cfg) -> Records`: a list of Record with `.format` and `.num_skipped`.
- `encode(records, tokenizer, cfg) -> Examples`: a list of Example with `.num_dropped`, `.num_truncated`.
- `encode_prompt(record, tokenizer)`, `reference_answer(record)`: for generation-based eval.
- `collate(examples, packing, pad_id)`, `model_inputs(batch)`: model batches with shifted `targets`.
- `check_data(spec, tokenizer, cfg) -> str`: a human-readable report on a data source.
- `Record`, `Example`, `DataConfig`, `FORMATS`, `detect_format`.
"""
from __future__ import annotations

from pathlib import Path

from tunelab.data.check import check_data
from tunelab.data.collate import collate, model_inputs, shifted_targets
from tunelab.data.config import DataConfig
from tunelab.data.formats import FORMATS, Records, detect_format, to_records
from tunelab.data.readers import read_rows
from tunelab.data.records import Example, Record
from tunelab.data.render import IGNORE, Examples, encode, encode_prompt, reference_answer
from tunelab.errors import DataError

BUILTIN = "builtin:"


def load_records(spec: str, cfg: DataConfig) -> Records:
    """Records from `builtin:NAME?opts` or a file / `datasets` directory, in `cfg.format`
    (auto-detected by default). Malformed rows raise DataError(file, line, field), or with
    `cfg.on_bad_rows == "skip"` are skipped and counted in `.num_skipped`."""
    if spec.startswith(BUILTIN):
        from tunelab.data.builtin import load_builtin  # written separately; heavy tasks load lazily
        return Records(load_builtin(spec), format="builtin")
    skip = cfg.on_bad_rows == "skip"
    rows, unreadable = read_rows(spec, skip_bad=skip)
    records = to_records(rows, str(Path(spec)), cfg.format, skip_bad=skip) if rows else Records()
    records.skipped(unreadable)
    if not records:
        raise DataError(f"no valid rows: all {records.num_skipped} rows were skipped as malformed "
                        f"(first: {'; '.join(records.skip_reasons)})", file=spec)
    return records


__all__ = ["BUILTIN", "DataConfig", "Example", "Examples", "FORMATS", "IGNORE", "Record", "Records",
           "check_data", "collate", "detect_format", "encode", "encode_prompt", "load_records",
           "model_inputs", "reference_answer", "shifted_targets"]
