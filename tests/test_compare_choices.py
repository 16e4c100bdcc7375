"""`tunelab compare` choices a new user tripped on (issue 16, point 11): a --set the reference run
directory would overwrite, start-up time (not ranked), one colour per run on every chart."""
import json
import re

import pytest
import yaml

from test_report import copy_run, fake_diagnostics, run_cfg, runs  # noqa: F401 -- `runs` is a fixture
from tunelab.errors import ConfigError
from tunelab.api import compare


def test_compare_set_that_a_run_directory_cannot_follow_is_refused(runs, tmp_path):
    """--set on a FORCED field would be overwritten by the reference run directory's value; --set
    with no recipe to apply it to does nothing. Both are refused, naming why."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(run_cfg(runs["tiny"], runs["data"], tmp_path / "ignored")))
    with pytest.raises(ConfigError) as e:
        compare([runs["a"], recipe], tmp_path / "cmp", overrides=["train.steps=5"])
    assert f"--set train.steps=5: the reference run directory {runs['a']} was trained with train.steps = 3" in str(e.value)
    with pytest.raises(ConfigError, match="--set applies to YAML recipes; every target is a run directory"):
        compare([runs["a"], runs["b"]], tmp_path / "cmp", overrides=["method.r=4"])
    assert not (tmp_path / "cmp" / "runs").exists()  # refused before training anything


def test_compare_does_not_rank_start_up_time(runs, tmp_path):
    """The first run a process trains pays for importing the libraries and reading the model from
    disk: start-up time says which ran first, not which method is faster."""
    a, b = copy_run(runs["a"], tmp_path / "a"), copy_run(runs["b"], tmp_path / "b")
    for run, s in ((a, 9.0), (b, 1.0)):
        lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        for rec in lines:
            if rec["kind"] == "setup":
                rec["startup_s"] = s
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    c, html, _, _ = compare([a, b], tmp_path / "cmp")
    row = next(r for r in c.rows() if r["figure"] == "startup_s")
    assert row["values"] == [9.0, 1.0] and row["higher_is_better"] is None and row["best"] == []
    assert "throughput: startup_s" not in html.read_text()  # no bar chart that reads as a ranking


def test_compare_charts_give_each_run_one_colour(runs, tmp_path):
    """A run has the same colour in the loss curves, the bar charts and the scatter plots; "best"
    is marked by a label, not by a colour that is another run's (green was run 3's curve)."""
    dirs = [copy_run(runs[k], tmp_path / n) for k, n in (("a", "a"), ("b", "b"), ("a", "c"))]
    for run, kl in zip(dirs, (0.25, 0.0625, 0.5)):
        fake_diagnostics(run)
        f = run / "diagnostics/forgetting.json"
        f.write_text(f.read_text().replace('"kl_drift": 0.125', f'"kl_drift": {kl}'))
    _, html, _, _ = compare(dirs, tmp_path / "cmp")
    page = html.read_text()
    curves = dict(re.findall(r'<polyline fill="none" stroke="([^"]+)"[^>]*><title>([^<]*)</title>', page))
    colour = {name: c for c, name in curves.items()}
    assert len(set(colour.values())) == 3
    bars = re.findall(r'<rect [^>]*fill="([^"]+)"[^>]*><title>([abc]): ', page)
    assert bars and all(fill == colour[name] for fill, name in bars)
    dots = re.findall(r'<circle [^>]*fill="([^"]+)"[^>]*><title>([abc]): KL', page)
    assert dots and all(fill == colour[name] for fill, name in dots)
    kl_chart = page[page.index("forgetting: kl_drift"):]
    assert ">best</text>" in kl_chart[:kl_chart.index("</svg>")]


def test_compare_shows_loss_and_perplexity_when_the_eval_data_has_no_gold_answers(runs, tmp_path):
    """Free-text eval data has no final answer to match: its runs' eval.json hold eval loss and
    perplexity only, and compare ranks those (lower is better) instead of showing an empty accuracy."""
    import math

    dirs = [copy_run(runs[k], tmp_path / n) for k, n in (("a", "a"), ("b", "b"))]
    for run, loss in zip(dirs, (0.5, 0.25)):
        found = json.loads((run / "eval.json").read_text())
        for when, value in (("before", 1.0), ("after", loss)):
            if isinstance(found.get(when), dict):
                found[when].pop("accuracy", None)
                found[when] |= {"eval_loss": value, "perplexity": math.exp(value)}
        (run / "eval.json").write_text(json.dumps(found))
    c, _, md, _ = compare(dirs, tmp_path / "cmp")
    rows = {r["figure"]: r for r in c.rows()}
    assert rows["perplexity_after"]["values"] == pytest.approx([math.exp(0.5), math.exp(0.25)])
    assert rows["perplexity_after"]["higher_is_better"] is False and rows["perplexity_after"]["best"] == [1]
    assert rows["eval_loss_after"]["values"] == pytest.approx([0.5, 0.25])
    assert all(v is None for v in rows.get("accuracy_after", {"values": [None]})["values"])
    assert "perplexity_after" in md.read_text()
