"""AnyTaskTune task sets: the row schema (`task`, `provenance`), chat-template rendering, mixing by
weight (task_mix), per-task evaluation in eval results and the report; the built-in data the data
methods use (typos, pool, unlabeled arith)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.curate import Workspace, build_stage, run_stage
from tunelab.curate.task_mix import shares
from tunelab.data import DataConfig, encode, load_records
from tunelab.data.builtin import load_builtin
from tunelab.errors import ConfigError, DataError


def write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_task_row_renders_like_any_alpaca_row_and_keeps_its_task(tmp_path, tok):
    row = {"task": "triage", "instruction": "Classify the urgency.", "input": "Chest pain for an hour.", "output": "urgent"}
    rec = load_records(write(tmp_path, [row]), DataConfig())[0]
    plain = load_records(write(tmp_path, [{k: v for k, v in row.items() if k != "task"}], "plain.jsonl"), DataConfig())[0]
    assert rec.meta["task"] == "triage" and rec.messages == plain.messages
    text = tok.decode(encode([rec], tok, DataConfig())[0].input_ids)
    assert text == tok.apply_chat_template(plain.messages, tokenize=False) and "triage" not in text


@pytest.mark.parametrize("field, value, message", [("task", "  ", "field 'task': is whitespace only"),
                                                   ("task", 3, "field 'task': expected a string"),
                                                   ("provenance", "s3ft", "field 'provenance': expected an object")])
def test_a_bad_task_or_provenance_names_file_line_and_field(tmp_path, field, value, message):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "b", field: value}]
    with pytest.raises(DataError, match=f"rows.jsonl:2: {message}"):
        load_records(write(tmp_path, rows), DataConfig())


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.dictionaries(st.sampled_from("abcdef"), st.floats(0.01, 10), min_size=1))
def test_shares_sum_to_n_and_follow_the_weights(n, weights):
    got = shares(n, weights)
    assert sum(got.values()) == n
    total = sum(weights.values())
    assert all(abs(got[t] - n * w / total) < 1 for t, w in weights.items())


def test_task_mix_tags_rows_and_mixes_by_weight(tmp_path, tok):
    from tunelab.data.check import check_data

    stage = build_stage("task_mix", {"tasks": {"solve": "builtin:arith?n=10", "fix": "builtin:typos?n=50"},
                                     "weights": {"solve": 3, "fix": 1}, "n": 40}, verb="mix")
    summary = run_stage(stage, Workspace(), tmp_path / "mix.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "mix.jsonl").read_text().splitlines()]
    assert summary["kinds"] == {"fix": 10, "solve": 30} and Counter(r["task"] for r in rows) == {"solve": 30, "fix": 10}
    solve = Counter(r["provenance"]["source"] for r in rows if r["task"] == "solve")
    assert len(solve) == 10 and set(solve.values()) == {3}  # 30 from 10 rows: each three times
    assert [r["task"] for r in rows] != sorted(r["task"] for r in rows)  # shuffled
    report = check_data(str(tmp_path / "mix.jsonl"), tok, DataConfig())
    assert "tasks: fix 10, solve 30" in report


def test_task_mix_reads_rows_that_name_their_task(tmp_path):
    rows = [{"task": t, "prompt": f"q{i}", "completion": "a"} for i, t in enumerate("xxy")]
    stage = build_stage("task_mix", {"input": write(tmp_path, rows), "weights": {"y": 0}})
    run_stage(stage, Workspace(), tmp_path / "m.jsonl")
    assert [json.loads(x)["task"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == ["x", "x"]
    with pytest.raises(ConfigError, match="weights.z: no such task; the tasks are x, y"):
        run_stage(build_stage("task_mix", {"input": write(tmp_path, rows), "weights": {"z": 1}}), Workspace(), tmp_path / "m.jsonl")
    with pytest.raises(ConfigError, match="tasks: name at least one task source"):
        build_stage("task_mix", {})


def test_accuracy_is_scored_per_task(model, tok, monkeypatch):
    import tunelab.eval.task as task
    from tunelab.data.records import Record
    from tunelab.eval.config import EvalConfig

    recs = [Record(messages=[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"#### {i}"}],
                   answer=str(i), meta={"task": "ab"[i % 2]}) for i in range(6)]
    monkeypatch.setattr(task, "generate", lambda *a, **k: ["#### 0", "#### 1", "#### 9", "#### 9", "#### 4", "#### 9"])
    res = task.answer_accuracy(model, tok, recs, EvalConfig())
    assert res["by_task"] == {"a": {"accuracy": 2 / 3, "num_examples": 3}, "b": {"accuracy": 1 / 3, "num_examples": 3}}
    assert res["accuracy"] == 0.5


def test_the_report_shows_accuracy_per_task(tmp_path):
    from tunelab.report.run_page import task_table
    from tunelab.report.rundata import RunData

    run = RunData.__new__(RunData)
    run.results = {"before": {"by_task": {"solve": {"accuracy": 0.1, "num_examples": 30}}},
                   "after": {"by_task": {"solve": {"accuracy": 0.4, "num_examples": 30},
                                         "fix": {"accuracy": 0.7, "num_examples": 20}}}}
    html = task_table(run)
    assert 'id="task-table"' in html and "solve" in html and "fix" in html and "0.4" in html and "0.7" in html


# ----------------------------------------------------------------------------- built-in data

@pytest.mark.parametrize("spec", ["builtin:typos?n=50&split=test", "builtin:typos?n=20&split=ood",
                                  "builtin:pool?n=60&on_target=0.25", "builtin:arith?n=5&answers=false"])
def test_builtin_data_is_deterministic(spec):
    a, b = load_builtin(spec), load_builtin(spec)
    assert [(r.messages, r.answer, r.meta) for r in a] == [(r.messages, r.answer, r.meta) for r in b]


def test_typos_splits_are_disjoint_and_every_row_has_an_error():
    train = {r.answer for r in load_builtin("builtin:typos?n=2000&split=train")}
    test = load_builtin("builtin:typos?n=300&split=test")
    ood = load_builtin("builtin:typos?n=100&split=ood")
    assert not train & {r.answer for r in test}
    for r in test + ood:
        assert r.meta["source_text"] != r.answer and r.meta["source_text"] in r.messages[0]["content"]
    vocab = {w for s in train for w in s.split()}
    assert all(any(w not in vocab for w in r.answer.split()) for r in ood)  # OOD words never trained on
    assert min(len(r.answer.split()) for r in ood) > max(len(s.split()) for s in train)


def test_pool_mixes_on_and_off_target_rows():
    pool = load_builtin("builtin:pool?n=200&on_target=0.1&target=typos")
    domains = Counter(r.meta["domain"] for r in pool)
    assert domains == {"typos": 20, "arith": 90, "facts": 90}
    assert sum(r.meta["on_target"] for r in pool) == 20
    test = {r.answer for r in load_builtin("builtin:typos?n=100&split=test")}
    assert not test & {r.answer for r in pool if r.meta["domain"] == "typos"}  # pool rows are train rows


def test_unlabeled_arith_is_the_labeled_problems_without_answers():
    labeled, bare = load_builtin("builtin:arith?n=5&seed=3"), load_builtin("builtin:arith?n=5&seed=3&answers=false")
    assert [r.messages[:1] for r in labeled] == [r.messages for r in bare]
    assert all(r.answer is None and len(r.messages) == 1 for r in bare)
