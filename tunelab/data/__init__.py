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

from tunelab.data.check import check_data
from tunelab.data.collate import collate, model_inputs, shifted_targets
from tunelab.data.config import DataConfig
from tunelab.data.formats import FORMATS, Records, detect_format
from tunelab.data.load import BUILTIN, load_records
from tunelab.data.records import Example, Record
from tunelab.data.render import IGNORE, Examples, encode, encode_prompt, reference_answer

__all__ = ["BUILTIN", "DataConfig", "Example", "Examples", "FORMATS", "IGNORE", "Record", "Records",
           "check_data", "collate", "detect_format", "encode", "encode_prompt", "load_records",
           "model_inputs", "reference_answer", "shifted_targets"]
