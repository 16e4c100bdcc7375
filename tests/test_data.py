"""Data pipeline: readers, formats, chat rendering + loss masks, malformed input, `data check`
(collation and packed == padded: test_collate.py)."""
from __future__ import annotations

import json

import pytest

from tunelab.data import (IGNORE, DataConfig, Example, Record, check_data, encode, encode_prompt,
                          load_records, reference_answer)
from tunelab.errors import DataError, TunelabError

SYS, Q, A = "Be brief.", "What is 12 plus 7?", "19"
CHAT = [{"role": "system", "content": SYS}, {"role": "user", "content": Q},
        {"role": "assistant", "content": A}]
MULTI = CHAT + [{"role": "user", "content": "Then multiply by 3."}, {"role": "assistant", "content": "57"}]
SAME_IN_EACH_FORMAT = {
    "messages": {"messages": CHAT},
    "sharegpt": {"conversations": [{"from": "system", "value": SYS}, {"from": "human", "value": Q},
                                   {"from": "gpt", "value": A}]},
    "prompt_completion": {"prompt": CHAT[:2], "completion": A},
    "alpaca": {"system": SYS, "instruction": Q, "input": "", "output": A},
}


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trained_text(ex: Example, tok) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


# ---------------------------------------------------------------- formats and rendering

@pytest.mark.parametrize("fmt", sorted(SAME_IN_EACH_FORMAT))
def test_each_chat_format_detected_and_gives_same_example(fmt, tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [SAME_IN_EACH_FORMAT[fmt]])
    records = load_records(path, cfg())
    assert records.format == fmt and records[0].messages == CHAT
    assert records[0].source == f"{path}:1"
    ex = encode(records, tok, cfg())[0]
    ref = encode([Record(messages=CHAT)], tok, cfg())[0]
    assert (ex.input_ids, ex.labels) == (ref.input_ids, ref.labels)
    assert trained_text(ex, tok) == A + "<|im_end|>"


def test_only_assistant_turns_and_im_end_train(tok):
    ex = encode([Record(messages=MULTI)], tok, cfg())[0]
    assert trained_text(ex, tok) == "19<|im_end|>57<|im_end|>"
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(MULTI, tokenize=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(ex.input_ids) if t == im_end]
    assert [ex.labels[i] != IGNORE for i in ends] == [False, False, True, False, True]


def test_train_on_prompt_trains_every_token(tok):
    ex = encode([Record(messages=MULTI)], tok, cfg(train_on_prompt=True))[0]
    assert ex.labels == ex.input_ids


def test_text_records_train_all_and_end_with_eos(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello world!"}])
    records = load_records(path, cfg())
    ex = encode(records, tok, cfg())[0]
    assert records.format == "text" and ex.labels == ex.input_ids
    assert ex.input_ids[-1] == tok.eos_token_id and tok.decode(ex.input_ids[:-1]) == "Hello world!"


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT, "text": "raw"}])
    assert load_records(path, cfg()).format == "messages"
    assert load_records(path, cfg(format="text"))[0].text == "raw"


def test_alpaca_input_joins_instruction_and_answer_field(tmp_path):
    row = {"instruction": "Add.", "input": "2 and 3", "output": "5", "answer": 5}
    record = load_records(write_jsonl(tmp_path / "a.jsonl", [row]), cfg())[0]
    assert record.messages == [{"role": "user", "content": "Add.\n\n2 and 3"},
                               {"role": "assistant", "content": "5"}]
    assert record.answer == "5" and reference_answer(record) == "5"
    assert reference_answer(Record(messages=MULTI)) == "57"


def test_truncation_flags_and_drops_untrained(tok):
    long_answer = Record(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x " * 50}])
    cut_prompt = Record(messages=[{"role": "user", "content": "y " * 50}, {"role": "assistant", "content": "ok"}])
    out = encode([long_answer, cut_prompt], tok, cfg(max_length=24))
    assert len(out) == 1 and out.num_dropped == 1 and out.num_truncated == 1
    assert out[0].truncated and len(out[0]) == 24


def test_no_chat_template_is_a_clear_error():
    from tiny import tiny_tokenizer

    bare = tiny_tokenizer(chat_template=None)
    with pytest.raises(TunelabError, match="no chat template"):
        encode([Record(messages=CHAT)], bare, cfg())
    assert encode([Record(text="Hello")], bare, cfg())[0].labels  # text data still works


def test_encode_prompt_is_the_prefix_before_the_last_answer(tok):
    prompt = encode_prompt(Record(messages=MULTI), tok)
    full = encode([Record(messages=MULTI)], tok, cfg())[0].input_ids
    assert full[:len(prompt)] == prompt
    assert tok.decode(prompt).endswith("Then multiply by 3.<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(full[len(prompt):]) == "57<|im_end|>\n"


# ---------------------------------------------------------------- malformed input

def _msgs(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = json.dumps({"messages": CHAT})
UA = [("user", "q"), ("assistant", "a")]
BAD_ROWS = [  # (name, second line of a .jsonl file, field, message fragment)
    ("missing content", json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
     "messages[0].content", "missing"),
    ("missing messages field", json.dumps({"messages": None}), "messages", "missing"),
    ("content wrong type", json.dumps(_msgs(("user", 5), ("assistant", "a"))), "messages[0].content", "string"),
    ("messages not a list", json.dumps({"messages": "hi"}), "messages", "list"),
    ("message not object", json.dumps({"messages": ["hi"]}), "messages[0]", "object"),
    ("empty messages", json.dumps({"messages": []}), "messages", "empty"),
    ("empty content", json.dumps(_msgs(("user", "q"), ("assistant", ""))), "messages[1].content", "empty"),
    ("whitespace content", json.dumps(_msgs(("user", " \n\t"), ("assistant", "a"))), "messages[0].content", "whitespace"),
    ("unknown role", json.dumps(_msgs(("user", "q"), ("bot", "a"))), "messages[1].role", "unknown role"),
    ("user twice", json.dumps(_msgs(("user", "q"), ("user", "q"), ("assistant", "a"))), "messages[1].role", "alternate"),
    ("starts with assistant", json.dumps(_msgs(*UA[::-1], ("assistant", "a"))), "messages[0].role", "expected a user"),
    ("system in middle", json.dumps(_msgs(*UA, ("system", "s"), ("assistant", "a"))), "messages[2].role", "system"),
    ("ends with user", json.dumps(_msgs(*UA, ("user", "q"))), "messages", "end with an assistant"),
    ("role wrong type", json.dumps({"messages": [{"role": 1, "content": "q"}]}), "messages[0].role", "string"),
    ("answer wrong type", json.dumps({"messages": CHAT, "answer": [1]}), "answer", "string or number"),
    ("row not an object", "[1, 2]", None, "expected an object"),
    ("bad JSON", '{"messages": [', None, "invalid JSON"),
]


@pytest.mark.parametrize("line2,field,fragment", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_jsonl_row_names_file_line_field(line2, field, fragment, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + line2 + "\n")
    with pytest.raises(DataError, match=fragment) as err:
        load_records(str(path), cfg())
    assert str(err.value).startswith(f"{path}:2")
    assert (err.value.line, err.value.field) == (2, field)
    if field:
        assert f"field '{field}'" in str(err.value)


BAD_OTHER = [  # (name, file name, content, line, field, message fragment)
    ("invalid utf-8 jsonl", "u.jsonl", GOOD.encode() + b'\n{"text": "\xff\xfe"}\n', 2, None, "UTF-8"),
    ("invalid utf-8 csv", "u.csv", b"text\nok\n\xff\n", 3, None, "UTF-8"),
    ("csv missing column", "m.csv", b"instruction,input\nAdd.,2 and 3\n", 2, "output", "missing"),
    ("csv short row", "s.csv", b"instruction,input,output\nA,,B\nC\n", 3, "output", "missing"),
    ("sharegpt unknown from", "g.jsonl", b'{"conversations": [{"from": "bot", "value": "x"}]}\n', 1,
     "conversations[0].from", "unknown role"),
    ("alpaca empty output", "a.json", b'[\n {"instruction": "i", "output": "o"},\n {"instruction": "i",\n'
     b'  "output": "  "}\n]', 3, "output", "whitespace"),
    ("prompt_completion wrong type", "p.jsonl", b'{"prompt": "q", "completion": 3}\n', 1, "completion", "string"),
    ("prompt list ends with assistant", "p.jsonl", json.dumps({"prompt": CHAT, "completion": "x"}).encode(), 1,
     "completion", "expected a user"),
    ("text empty", "t.jsonl", b'{"text": ""}\n', 1, "text", "empty"),
    ("json not a list", "o.json", b'\n{"text": "a"}', 2, None, "list of objects"),
    ("json syntax", "s.json", b'[{"text": "a"},\n {"text": }]', 2, None, "invalid JSON"),
    ("undetectable", "x.jsonl", b'{"question": "q"}\n', 1, None, "cannot detect"),
]


@pytest.mark.parametrize("name,content,line,field,fragment", [c[1:] for c in BAD_OTHER], ids=[c[0] for c in BAD_OTHER])
def test_bad_files_name_file_line_field(name, content, line, field, fragment, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment) as err:
        load_records(str(path), cfg())
    assert str(err.value).startswith(f"{path}:{line}") and err.value.field == field


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.csv"])
def test_empty_file_has_no_rows(name, tmp_path):
    (tmp_path / name).write_text("" if name != "e.csv" else "text\n")
    with pytest.raises(DataError, match="no rows"):
        load_records(str(tmp_path / name), cfg())


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_records(str(tmp_path / "nope.jsonl"), cfg())
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type"):
        load_records(str(tmp_path / "d.txt"), cfg())


def test_skip_bad_rows_counts_them(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([GOOD, BAD_ROWS[0][1], "{oops", BAD_ROWS[8][1], GOOD]) + "\n")
    records = load_records(str(path), cfg(on_bad_rows="skip"))
    assert len(records) == 2 and records.num_skipped == 3
    assert [r.source for r in records] == [f"{path}:1", f"{path}:5"]
    path.write_text(BAD_ROWS[8][1] + "\n")
    with pytest.raises(DataError, match="all 1 rows were skipped"):
        load_records(str(path), cfg(on_bad_rows="skip"))


# ---------------------------------------------------------------- readers

ROWS = [{"instruction": "Add 2 and 3.", "output": "5"}, {"instruction": "Say hi,\nplease.", "output": "hi"}]


def test_json_reader_lines_are_object_starts(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "Add 2 and 3.",\n   "output": "5"},\n\n  '
                    + json.dumps(ROWS[1]) + "\n]\n")
    records = load_records(str(path), cfg())
    assert [r.source for r in records] == [f"{path}:2", f"{path}:5"] and records.format == "alpaca"


def test_csv_reader_lines_with_multiline_cells(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["instruction", "output"])
        writer.writeheader()
        writer.writerows(ROWS + ROWS[:1])
    records = load_records(str(path), cfg())
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["2", "3", "5"]
    assert records[1].messages[0]["content"] == "Say hi,\nplease."


def test_parquet_and_datasets_dir_readers(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "dir"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    expected = load_records(write_jsonl(tmp_path / "d.jsonl", ROWS), cfg())
    for name in ["d.parquet", "dir", "dict"]:
        records = load_records(str(tmp_path / name), cfg())
        assert [r.messages for r in records] == [r.messages for r in expected]
        assert records[1].source == f"{tmp_path / name}:2"  # row index + 1


def test_builtin_specs_go_to_load_builtin(monkeypatch):
    import tunelab.data.builtin as builtin

    monkeypatch.setattr(builtin, "load_builtin", lambda spec: [Record(text=spec)], raising=False)
    records = load_records("builtin:arith?n=3", cfg())
    assert records[0].text == "builtin:arith?n=3" and records.format == "builtin"


# ---------------------------------------------------------------- check

def test_check_data_report(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI}, {"messages": CHAT}, {"messages": "x"}])
    report = check_data(path, tok, cfg(on_bad_rows="skip", max_length=64), color=False)
    for part in ["rows: 2 loaded, 1 skipped", "format: messages", "truncated at max_length=64: 1",
                 "min 47", "max 64", "histogram", "[[19<|im_end|>]]", "trained ("]:
        assert part in report, part
