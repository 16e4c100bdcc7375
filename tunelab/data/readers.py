"""Read raw rows from a data file together with their 1-based line numbers, so that every later
error can point at `file:line`. One small reader per file kind, chosen from a table by suffix.

Line numbers mean:
- `.jsonl`: the file line of the row.
- `.json` (a list of objects): the file line where the object starts.
- `.csv`: the file line where the row starts (the header is line 1, the first row line 2).
- `.parquet` and a saved `datasets` directory: the row index + 1 (these have no lines).
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

Row = tuple[int, Any]
"""(line, value): the 1-based line (or row index + 1) and the decoded row."""
Reader = Callable[[Path, bool], tuple[list[Row], list[DataError]]]
"""(path, skip_bad) -> (rows, the error of each unreadable row skipped, in file order)."""


def read_rows(path: str | Path, skip_bad: bool = False) -> tuple[list[Row], list[DataError]]:
    """All rows of a file or `datasets` directory. With `skip_bad`, rows that cannot even be
    decoded (a bad JSONL line, invalid UTF-8 in a CSV row) are skipped, and their reasons returned,
    instead of raising."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", file=str(path))
    reader = _read_datasets_dir if path.is_dir() else _reader_for(path)
    try:
        rows, bad = reader(path, skip_bad)
    except (OSError, MemoryError) as e:  # a directory named *.jsonl, no permission, ...
        raise DataError(f"cannot read: {getattr(e, 'strerror', None) or type(e).__name__}", file=str(path)) from None
    if not rows and not bad:
        raise DataError("no rows (the file is empty)", file=str(path))
    return rows, bad


def _reader_for(path: Path) -> Reader:
    """The reader for this file's suffix; an unknown suffix is an error listing the known ones."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        known = ", ".join(sorted(READERS))
        raise DataError(f"unknown file type '{path.suffix}'; expected one of {known} "
                        "or a `datasets` directory", file=str(path))
    return reader


def _decode(path: Path) -> str:
    """The file as text; invalid UTF-8 names the line it occurs on."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"invalid UTF-8 (byte {e.start})", file=str(path), line=line) from None


def _read_jsonl(path: Path, skip_bad: bool) -> tuple[list[Row], list[DataError]]:
    """One JSON value per line; blank lines are ignored. Lines are decoded one by one so that
    a bad byte or bad JSON names its own line (and can be skipped alone)."""
    rows: list[Row] = []
    bad: list[DataError] = []
    for line, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            row = _parse_json_line(raw, path, line)
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(e)
            continue
        if row is not _BLANK:
            rows.append((line, row))
    return rows, bad


_BLANK = object()


def _parse_json_line(raw: bytes, path: Path, line: int) -> Any:
    """Decode one JSONL line; `_BLANK` for an empty line."""
    try:
        text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 (column {e.start + 1})", file=str(path), line=line) from None
    if not text.strip():
        return _BLANK
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", file=str(path), line=line) from None
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply", file=str(path), line=line) from None


def _read_json(path: Path, skip_bad: bool) -> tuple[list[Row], list[DataError]]:
    """A JSON list of objects. The list is walked element by element with `raw_decode`, which
    gives each object's start offset and hence its line for free."""
    text = _decode(path)
    decoder, ws = json.JSONDecoder(), " \t\r\n"
    pos = _skip(text, 0, ws)
    if pos == len(text):
        return [], []
    if text[pos] != "[":
        raise DataError("expected a JSON list of objects ('[' ... ']')", file=str(path),
                        line=_line_at(text, pos))
    rows: list[Row] = []
    pos = _skip(text, pos + 1, ws)
    while pos < len(text) and text[pos] != "]":
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno) from None
        rows.append((_line_at(text, pos), value))
        pos = _skip(text, end, ws)
        if pos < len(text) and text[pos] == ",":
            pos = _skip(text, pos + 1, ws)
        elif pos < len(text) and text[pos] != "]":
            raise DataError("invalid JSON: expected ',' or ']'", file=str(path), line=_line_at(text, pos))
    if pos >= len(text):
        raise DataError("invalid JSON: the list is not closed with ']'", file=str(path),
                        line=_line_at(text, pos))
    return rows, []


def _skip(text: str, pos: int, chars: str) -> int:
    """The first position at or after `pos` whose character is not in `chars`."""
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _line_at(text: str, pos: int) -> int:
    """1-based line of character offset `pos`."""
    return text.count("\n", 0, pos) + 1


def _read_csv(path: Path, skip_bad: bool) -> tuple[list[Row], list[DataError]]:
    """A CSV file with a header row. A row's line is where it starts (quoted fields may span
    lines). Missing trailing cells come through as None, which formats report as missing. Bytes
    that are not UTF-8 are kept as surrogate escapes so the row holding them can be named (and
    skipped alone); invalid UTF-8 in the header stops the read."""
    data = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    # split lines at "\n" only, so line numbers are an editor's even with a stray "\r" in a cell
    reader = csv.DictReader(io.StringIO(data, newline="\n"))
    rows: list[Row] = []
    bad: list[DataError] = []
    _check_utf8(dict.fromkeys(_csv_header(reader, path), ""), path, 1)
    start = 2
    while (record := _next_csv_row(reader, path, start, skip_bad, bad)) is not None:
        record.pop(None, None)  # cells beyond the header have no name; ignore them
        try:
            if record:
                _check_utf8(record, path, start)
                rows.append((start, {k: v for k, v in record.items() if v is not None}))
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(e)
        start = reader.line_num + 1
    return rows, bad


def _csv_header(reader: csv.DictReader, path: Path) -> list[str]:
    try:
        return reader.fieldnames or []
    except csv.Error as e:
        raise DataError(f"invalid CSV header: {e}", file=str(path), line=1) from None


def _next_csv_row(reader: csv.DictReader, path: Path, line: int, skip_bad: bool,
                  bad: list[DataError]) -> dict | None:
    """The next row; None at the end. A row the csv module cannot parse is an error naming its
    line, or with `skip_bad` is recorded in `bad` and comes back empty."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        error = DataError(f"invalid CSV: {e}", file=str(path), line=line)
        if not skip_bad:
            raise error from None
        bad.append(error)
        return {}


def _check_utf8(record: dict, path: Path, line: int) -> None:
    """Raise a DataError naming the column if a name or value holds undecodable bytes."""
    for name, value in record.items():
        if any("\udc80" <= ch <= "\udcff" for ch in f"{name}{value or ''}"):
            raise DataError(f"invalid UTF-8 in column {name!r}", file=str(path), line=line)


def _read_parquet(path: Path, skip_bad: bool) -> tuple[list[Row], list[DataError]]:
    """A parquet file; "line" is the row index + 1."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow: pip install pyarrow", file=str(path)) from None
    rows = pq.read_table(path).to_pylist()
    return [(i + 1, row) for i, row in enumerate(rows)], []


def _read_datasets_dir(path: Path, skip_bad: bool) -> tuple[list[Row], list[DataError]]:
    """A directory written by `Dataset.save_to_disk`; "line" is the row index + 1. A
    DatasetDict must hold a `train` split or exactly one split."""
    try:
        import datasets
    except ImportError:
        raise DataError("reading a datasets directory needs `datasets`: pip install datasets",
                        file=str(path)) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"not a saved `datasets` directory ({e})", file=str(path)) from None
    if isinstance(ds, datasets.DatasetDict):
        ds = _one_split(ds, path)
    return [(i + 1, row) for i, row in enumerate(ds)], []


def _one_split(ds: Any, path: Path) -> Any:
    """The `train` split of a DatasetDict, or its only split."""
    if "train" in ds:
        return ds["train"]
    if len(ds) == 1:
        return next(iter(ds.values()))
    raise DataError(f"the directory holds splits {sorted(ds)}; point at one split's directory "
                    "or provide a `train` split", file=str(path))


READERS: dict[str, Reader] = {
    ".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
    ".csv": _read_csv, ".parquet": _read_parquet,
}
"""Readers by lower-case file suffix; directories use `_read_datasets_dir`."""
