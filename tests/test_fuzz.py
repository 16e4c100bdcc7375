"""Bad data, fuzzed: JSONL and CSV files whose rows are good or carry one known defect each. Every
failure must be a DataError naming the file and a line (the first bad one, in the order tunelab
reads); with data.on_bad_rows=skip the bad rows are skipped and counted instead. Also: a 10 MB
line, and empty files. Counts are printed as `[reliability] ...` lines (pytest -s); the config
fuzz is in test_fuzz_config.py."""
from __future__ import annotations

import collections
import csv
import functools
import io
import json
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tunelab.data import DataConfig, encode, load_records
from faultlab import report
from tunelab.errors import DataError, TunelabError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def figures():
    """After this file's tests: print what the fuzzing tried (quoted in docs/reliability.md)."""
    yield
    for name, tally in TALLY.items():
        report(name, **dict(sorted(tally.items())))


@functools.lru_cache(maxsize=1)
def tokenizer():
    from tiny import tiny_tokenizer
    return tiny_tokenizer()


# ----------------------------------------------------------------------------- rows with one known defect

text = st.text(min_size=1, max_size=20).filter(str.strip)
blank = st.sampled_from(["", " ", "\n\t ", "\u3000"])


@st.composite
def good_row(draw) -> dict:
    turns = [("system", draw(text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns += [("user", draw(text)), ("assistant", draw(text))]
    row = {"messages": [{"role": r, "content": c} for r, c in turns]}
    if draw(st.booleans()):
        row["answer"] = draw(st.one_of(text, st.integers()))
    return row


def _msg(row: dict, draw) -> tuple[int, dict]:
    i = draw(st.integers(0, len(row["messages"]) - 1))
    return i, row["messages"][i]


UNREADABLE, UNDETECTABLE = "<unreadable>", "<no format>"


@st.composite
def bad_row(draw) -> tuple[bytes, str | None, str]:
    """(the JSONL line, the field its error must name, its kind) for a good row with one defect.
    Kinds: `bad` (a messages row with a defect), `undetectable` (no `messages` key at all) and
    `unreadable` (not JSON or not UTF-8: rejected while reading, before any row is parsed)."""
    row = draw(good_row())
    field = draw(st.sampled_from(DEFECTS))(row, draw)
    if field == "<bad json>":
        return json.dumps(row)[: -draw(st.integers(1, 5))].encode(), None, UNREADABLE
    if field == "<bad utf-8>":
        line = json.dumps(row).encode()
        cut = draw(st.integers(0, len(line)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]))  # stray, cut, surrogate
        return line[:cut] + junk + line[cut:], None, UNREADABLE
    if field == "<not an object>":
        value = draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=3), text))
        return json.dumps(value).encode(), None, UNDETECTABLE
    return json.dumps(row).encode(), field, UNDETECTABLE if "messages" not in row else "bad"


def _drop_messages(row, draw):
    del row["messages"]
    row["msgs"] = []
    return "messages"


def _messages_type(row, draw):
    row["messages"] = draw(st.one_of(st.integers(), text, st.dictionaries(text, text, max_size=2), st.booleans()))
    return "messages"


def _messages_empty(row, draw):
    row["messages"] = []
    return "messages"


def _item_type(row, draw):
    i, _ = _msg(row, draw)
    row["messages"][i] = draw(st.one_of(st.integers(), text, st.lists(text, max_size=2)))
    return f"messages[{i}]"


def _role(row, draw):
    i, m = _msg(row, draw)
    how = draw(st.sampled_from(["missing", "type", "unknown", "blank"]))
    if how == "missing":
        del m["role"]
    else:
        m["role"] = {"type": draw(st.one_of(st.integers(), st.lists(text, max_size=1))),
                     "unknown": draw(text.filter(lambda r: r not in ("system", "user", "assistant"))),
                     "blank": draw(blank)}[how]
    return f"messages[{i}].role"


def _content(row, draw):
    i, m = _msg(row, draw)
    how = draw(st.sampled_from(["missing", "type", "blank", "surrogate"]))
    if how == "missing":
        del m["content"]
    else:
        m["content"] = {"type": draw(st.one_of(st.integers(), st.none(), st.lists(text, max_size=2))),
                        "blank": draw(blank), "surrogate": draw(text) + "\ud800"}[how]
    return f"messages[{i}].content"


def _order(row, draw):
    """Break the system?, user, assistant, user, ... order at one body turn."""
    msgs = row["messages"]
    first = 1 if msgs[0]["role"] == "system" else 0
    i = draw(st.integers(first, len(msgs) - 1))
    wrong = {"user": ["assistant", "system"], "assistant": ["user", "system"]}[msgs[i]["role"]]
    wrong = wrong[:1] if i == 0 else wrong  # a system turn first is allowed
    msgs[i]["role"] = draw(st.sampled_from(wrong))
    return f"messages[{i}].role"


def _answer(row, draw):
    row["answer"] = draw(st.one_of(st.booleans(), st.lists(st.integers(), max_size=2), st.just({})))
    return "answer"


DEFECTS = [_drop_messages, _messages_type, _messages_empty, _item_type, _role, _content, _order, _answer,
           lambda row, draw: "<bad json>", lambda row, draw: "<bad utf-8>", lambda row, draw: "<not an object>"]


@st.composite
def jsonl_file(draw) -> list[tuple[bytes, str | None, str]]:
    """Lines of a file: (bytes, expected field, kind: good / bad / undetectable / unreadable /
    blank); blank lines are ignored by the reader but still count for line numbers."""
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 5)) == 0:
            lines.append((draw(st.sampled_from([b"", b"  ", b"\t"])), None, "blank"))
        if draw(st.booleans()):
            lines.append((json.dumps(draw(good_row())).encode(), None, "good"))
        else:
            lines.append(draw(bad_row()))
    return lines


def expected_jsonl(lines, mode: str):
    """What loading must do: ("ok", num_good) or ("error", line, field, message fragment).
    Reading comes first (an unreadable line stops an `error` load wherever it is), then the
    format is detected from the first row that has one, then rows are parsed in order."""
    rows = [(n, field, kind) for n, (_, field, kind) in enumerate(lines, start=1) if kind != "blank"]
    unreadable = [n for n, _, kind in rows if kind == UNREADABLE]
    readable = [r for r in rows if r[2] != UNREADABLE]
    if not rows:
        return "error", None, None, "no rows"
    if unreadable and mode == "error":
        return "error", unreadable[0], None, "invalid"
    if not readable:
        return "error", None, None, f"all {len(unreadable)} rows were skipped"
    if not any(kind in ("good", "bad") for _, _, kind in readable):
        return "error", readable[0][0], None, "cannot detect the format"
    bad = [(n, field) for n, field, kind in readable if kind != "good"]
    if mode == "error" and bad:
        return "error", *bad[0], ""
    good = sum(kind == "good" for _, _, kind in readable)
    return ("ok", good) if good else ("error", None, None, f"all {len(rows)} rows were skipped")


def check_failure(err: TunelabError, path, tally: collections.Counter) -> None:
    """The fuzz contract: a TunelabError (never a bare exception) naming the file and a line."""
    assert isinstance(err, TunelabError), repr(err)
    assert str(path) in str(err), str(err)
    tally["failed_with_clear_error"] += 1
    tally["error_names_a_line"] += bool(re.search(re.escape(str(path)) + r":\d+", str(err)))


@pytest.mark.parametrize("mode", ["error", "skip"])
@FUZZ
@given(lines=jsonl_file())
def test_fuzzed_jsonl_rows_fail_clearly_or_are_skipped(tmp_path, mode, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line for line, _, _ in lines) + b"\n")
    tally = TALLY["fuzzed jsonl rows"]
    tally["files_tried"] += 1
    tally["rows_tried"] += sum(kind != "blank" for _, _, kind in lines)
    tally["bad_rows_tried"] += sum(kind not in ("good", "blank") for _, _, kind in lines)
    cfg = DataConfig(train=str(path), max_length=32, on_bad_rows=mode)
    expected = expected_jsonl(lines, mode)
    try:
        records = load_records(str(path), cfg)
        examples = encode(records, tokenizer(), cfg)
    except DataError as e:
        check_failure(e, path, tally)
        assert expected[0] == "error", (str(e), expected)
        _, line, field, fragment = expected
        assert fragment in str(e), (str(e), expected)
        if line is not None:
            assert (e.line, e.field) == (line, field) and str(e).startswith(f"{path}:{line}"), (str(e), expected)
        return
    assert expected[0] == "ok", expected
    assert len(records) == expected[1] and records.num_skipped == sum(k not in ("good", "blank") for _, _, k in lines)
    assert examples.num_bad_rows == records.num_skipped
    assert all(r.startswith(f"{path}:") for r in records.skip_reasons)
    tally["rows_skipped"] += records.num_skipped


@st.composite
def csv_file(draw) -> tuple[bytes, list[tuple[int, str | None]]]:
    """A prompt,completion CSV whose rows are good or have one defect (a blank cell, a missing
    cell, a byte that is not UTF-8). Returns (bytes, [(start line, defect or None)])."""
    out, rows, line = io.StringIO(), [], 2
    writer = csv.writer(out)  # rows end in "\r\n", so cells holding "\r" or "\n" are quoted
    writer.writerow(["prompt", "completion"])
    cell = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=15).filter(str.strip)
    for _ in range(draw(st.integers(1, 6))):
        cells = [draw(cell), draw(cell)]
        defect = draw(st.sampled_from([None, None, "blank", "short", "utf8"]))
        if defect == "blank":
            cells[draw(st.integers(0, 1))] = draw(blank)
        elif defect == "short":
            cells = cells[:1]
        elif defect == "utf8":
            cells[draw(st.integers(0, 1))] += "\x01BADBYTE\x01"
        start = out.tell()
        writer.writerow(cells)
        rows.append((line, defect))
        line += out.getvalue()[start:].count("\n")
    return out.getvalue().encode().replace(b"\x01BADBYTE\x01", b"\xff"), rows


@pytest.mark.parametrize("mode", ["error", "skip"])
@FUZZ
@given(file=csv_file())
def test_fuzzed_csv_rows_fail_clearly_or_are_skipped(tmp_path, mode, file):
    data, rows = file
    path = tmp_path / "fuzz.csv"
    path.write_bytes(data)
    tally = TALLY["fuzzed csv rows"]
    tally["files_tried"] += 1
    tally["rows_tried"] += len(rows)
    tally["bad_rows_tried"] += sum(d is not None for _, d in rows)
    cfg = DataConfig(train=str(path), max_length=32, on_bad_rows=mode, format="prompt_completion")
    # bytes that are not UTF-8 are found while reading, before any row is parsed
    first_bad = next((n for n, d in rows if d == "utf8"), None) or next((n for n, d in rows if d), None)
    num_good = sum(d is None for _, d in rows)
    try:
        records = load_records(str(path), cfg)
        encode(records, tokenizer(), cfg)
    except DataError as e:
        check_failure(e, path, tally)
        assert first_bad is not None and (mode == "error" or num_good == 0), str(e)
        named = [n for n, d in rows if d and f"{path}:{n}:" in str(e)]  # skip: the first reasons
        assert (named[:1] == [first_bad]) if mode == "error" else named, (str(e), rows)
        return
    assert mode == "skip" or first_bad is None
    assert len(records) == num_good and records.num_skipped == len(rows) - num_good
    tally["rows_skipped"] += records.num_skipped


# ----------------------------------------------------------------------------- long rows and empty files

def test_a_10mb_line_is_truncated_without_tokenizing_it_all(tmp_path, monkeypatch):
    """Bounded work, counted rather than timed (tokenizing all of it took ~100 s on one machine, a
    few on another): the tokenizer sees only a short prefix of the 10 MB turn."""
    from transformers import PreTrainedTokenizerBase

    path = tmp_path / "big.jsonl"
    huge = "seven plus twelve " * 600_000  # ~10 MB in one assistant turn, on one line
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Count."},
                                             {"role": "assistant", "content": huge}]}) + "\n")
    cfg = DataConfig(train=str(path), max_length=64)
    seen: list[int] = []
    call = PreTrainedTokenizerBase.__call__

    def counting(self, text=None, *args, **kwargs):
        seen.append(len(text) if isinstance(text, str) else sum(map(len, text or [])))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
    examples = encode(load_records(str(path), cfg), tokenizer(), cfg)
    assert len(examples) == 1 and len(examples[0]) == 64 and examples.num_truncated == 1
    assert seen and sum(seen) < len(huge) // 100, seen  # a prefix, not the whole turn


@FUZZ
@given(words=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=200), max_length=st.integers(8, 40))
def test_prefix_tokenization_keeps_exactly_what_truncation_keeps(words, max_length):
    """Tokenizing only a prefix of a long row gives the same first max_length tokens and labels."""
    from tunelab.data.records import Record
    from tunelab.data.render import _truncate, encode_one

    rec = Record(messages=[{"role": "user", "content": "Say it."}, {"role": "assistant", "content": " ".join(words)}])
    assume(rec.messages[1]["content"].strip())
    full = _truncate(encode_one(rec, tokenizer()), max_length)
    fast = _truncate(encode_one(rec, tokenizer(), max_length=max_length), max_length)
    assert (fast.input_ids, fast.labels, fast.truncated) == (full.input_ids, full.labels, full.truncated)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_empty_jsonl_names_the_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path}: no rows"):
        load_records(str(path), DataConfig(train=str(path)))
