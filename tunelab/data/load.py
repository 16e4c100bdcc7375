"""Reading a data source (a file, a `datasets` directory or a builtin task) into Records."""
from __future__ import annotations

from pathlib import Path

from tunelab.data.config import DataConfig
from tunelab.data.formats import Records, to_records
from tunelab.data.readers import read_rows
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
