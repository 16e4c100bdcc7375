"""`tunelab data select|relabel|edits|mix`: the data stages alone from the command line, in-process
on a tiny model; their output reads back with `tunelab data check`; user errors are one line."""
from __future__ import annotations

import json

import pytest

from tunelab.cli import main


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_select_relabel_edits_and_mix(tiny_dir, tmp_path, capsys):
    sel = tmp_path / "sel.jsonl"
    assert main(["data", "select", "builtin:pool?n=40", "--k", "6", "--model", str(tiny_dir),
                 "--target", "builtin:arith?n=5&split=test", "--precision", "fp32", "--out", str(sel)]) == 0
    assert len(rows(sel)) == 6 and {r["provenance"]["stage"] for r in rows(sel)} == {"got_d"}
    assert "(got_d: selected 6)" in capsys.readouterr().out

    lab = tmp_path / "lab.jsonl"
    assert main(["data", "relabel", "builtin:arith?n=4&answers=false", "--method", "pseudo_label", "--model",
                 str(tiny_dir), "--set", "max_new_tokens=3", "--out", str(lab)]) == 0
    assert [r["provenance"]["kind"] for r in rows(lab)] == ["pseudo"] * 4
    assert not (tmp_path / ".lab.jsonl.work").exists()  # the progress of a finished stage is gone

    ed = tmp_path / "ed.jsonl"
    assert main(["data", "edits", "builtin:typos?n=5", "--out", str(ed)]) == 0
    mix = tmp_path / "mix.jsonl"
    assert main(["data", "mix", "--set", f"tasks.edits={ed}", "--set", f"tasks.sel={sel}", "--out", str(mix)]) == 0
    assert sorted(r["task"] for r in rows(mix)) == ["edits"] * 5 + ["sel"] * 6
    capsys.readouterr()
    assert main(["data", "check", str(mix), "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "tasks: edits 5, sel 6" in out and "provenance (11 of 11 rows): task_mix: edits 5, task_mix: sel 6" in out


@pytest.mark.parametrize("argv, needle", [
    (["data", "select", "builtin:arith?n=3", "--method", "random", "--k", "4"], "k: 4 is larger than the pool (3 rows"),
    (["data", "select", "builtin:arith?n=3", "--method", "s3ft"], "--method: 's3ft' is not a `select` stage"),
    (["data", "relabel", "builtin:arith?n=3"], "name the stage with --method (s3ft or pseudo_label)"),
    (["data", "edits", "nothing.jsonl"], "nothing.jsonl: no such file or directory"),
    (["data", "select", "builtin:arith?n=3", "--method", "random", "--set", "colour=red"], "random.colour: unknown key"),
])
def test_data_stage_errors_are_one_line(tmp_path, argv, needle, capsys):
    assert main(argv + ["--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def broken_judge(record, candidate, gold):
    raise KeyError("score")


def test_a_judge_that_raises_or_an_empty_pool_is_one_line(tiny_dir, tmp_path, capsys):
    """The judge is user code: its exception is one line naming the judge and the row, as is an
    empty input file."""
    argv = ["data", "relabel", "builtin:arith?n=2", "--method", "s3ft", "--judge", f"{__name__}:broken_judge",
            "--model", str(tiny_dir), "--precision", "fp32", "--set", "max_new_tokens=2", "--out", str(tmp_path / "o.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err  # transformers' "Loading weights" progress bars come first
    assert "judge 'test_cli_data_stages:broken_judge' raised KeyError: 'score' (on row builtin:arith" in \
        err.strip().splitlines()[-1]
    assert "Traceback" not in err and "KeyError" not in "".join(err.strip().splitlines()[:-1])
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["data", "select", str(tmp_path / "empty.jsonl"), "--method", "random", "--k", "2",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"pool: {tmp_path}/empty.jsonl: no rows (the file is empty)" in err and len(err.strip().splitlines()) == 1
