"""The run report, RUN/report.html: what training bought on the target task and what it cost.

Sections, top to bottom: headline (method, model, data, steps, trainable parameters, time), target
task (accuracy and eval loss before -> after), loss curve with eval points, throughput, the other
per-step metrics the method and objective log, and side effects (every diagnostics/<name>.json; the
ones not run are named with the command that runs them).
"""
from __future__ import annotations

from html import escape
from pathlib import Path

import yaml

from tunelab.report import html as H
from tunelab.report import svg
from tunelab.report.diagviews import render_diagnostic
from tunelab.report.rundata import (RunData, extra_metrics, headline, load_run_data, steps_done,
                                    target_figures, throughput_figures)
from tunelab.run.files import atomic_write_text


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html from what the run wrote; returns its path."""
    run = load_run_data(run_dir)
    out = run.dir / "report.html"
    atomic_write_text(out, render_report(run))  # a browser never sees half a page
    return out


def render_report(run: RunData) -> str:
    h = headline(run)
    body = "".join([headline_section(run, h), target_section(run), loss_section(run), throughput_section(run),
                    metrics_section(run), side_effects_section(run)])
    sub = f"{h['method']} on {h['model']} · {run.dir}"
    return H.page(f"tunelab run report: {run.name}", sub, body)


def headline_section(run: RunData, h: dict) -> str:
    steps = f"{h['steps']} / {h['planned_steps']}" if h["steps"] != h["planned_steps"] else h["steps"]
    cards = H.cards([("method", h["method"], "method"), ("objective", h["objective"], "objective"),
                     ("model", h["model"], "model"), ("steps", steps, "steps"),
                     ("trainable params", h["trainable_params"], "trainable_params"),
                     ("trainable %", h["trainable_pct"], "trainable_pct"),
                     ("time (s)", h["time_s"], "time_s")] + _privacy_cards(run) + _federated_cards(run))
    data = H.table(["data", "source"], [["train", h["train_data"]], ["eval", h["eval_data"]],
                                        ["train examples", _examples_text(run, h)]])
    cfg = escape(yaml.safe_dump(run.config, sort_keys=False))
    time_note = H.note("time = start-up + optimizer steps (mean logged step time × steps); evaluation and "
                       "checkpoint writes are not included.", "note muted")
    return H.section("Run", cards + data + time_note +
                     f"<details><summary>full config</summary><pre>{cfg}</pre></details>", "headline")


def _privacy_cards(run: RunData) -> list:
    """DP-SGD's privacy spent, when the run trained with it: epsilon at delta after its last step."""
    last = next((x for x in reversed(run.train) if "dp_epsilon" in x), None)
    if last is None:
        return []
    return [(f"DP-SGD ε at δ={H.fmt(last['dp_delta'])}", last["dp_epsilon"], "dp_epsilon"),
            ("DP-SGD σ, C", f"{H.fmt(run.get('privacy.noise_multiplier'))}, {H.fmt(run.get('privacy.clip_norm'))}", None)]


def _federated_cards(run: RunData) -> list:
    """A federated run (`tunelab federate`): its rounds, algorithm and the most bytes a client moved
    in a round (the steps card counts centralized steps only)."""
    if not run.rounds:
        return []
    return [("federated rounds", f"{len(run.rounds)} / {H.fmt(run.get('federated.rounds'))}", "federated_rounds"),
            ("algorithm", run.get("federated.algorithm"), None),
            ("bytes / client / round", max(r["bytes_per_client"] for r in run.rounds), "bytes_per_client")]


def _examples_text(run: RunData, h: dict) -> str:
    """`120 (2 truncated at data.max_length=64, longest 90 tokens; 1 dropped: ...)`."""
    s, cuts = run.setup, []
    if s.get("truncated"):
        longest = f", longest {s['longest_example']} tokens" if s.get("longest_example") else ""
        cuts.append(f"{s['truncated']} truncated at data.max_length={run.get('data.max_length')}{longest}")
    if s.get("dropped"):
        cuts.append(f"{s['dropped']} dropped: no trained token left after truncation")
    return H.fmt(h["train_examples"]) + (f" ({'; '.join(cuts)})" if cuts else "")


def target_section(run: RunData) -> str:
    t = target_figures(run)
    if t["accuracy_after"] is None and t["eval_loss_after"] is None:
        return H.section("Target task", H.note("no evaluation yet (the run has no eval data, or it has not "
                                               "finished): set <code>data.eval</code> to measure the gain."),
                         "target")
    scored = t["accuracy_before"] is not None or t["accuracy_after"] is not None
    metrics = (("accuracy", "accuracy"), ("eval_loss", "eval loss")) if scored else \
        (("eval_loss", "eval loss"), ("perplexity", "perplexity"))
    rows = [[label, H.cell(t[f"{m}_before"], f"{m}_before"), H.cell(t[f"{m}_after"], f"{m}_after"),
             _change_cell(t[f"{m}_change"], f"{m}_change", higher_better=m == "accuracy")]
            for m, label in metrics]
    after = run.results.get("after") or {}
    body = H.table(["metric", "before", "after", "change"], rows, css_id="target-table")
    if scored:
        note = (f"{escape(run.get('eval.metric') or 'exact_match')} accuracy of the final answer on "
                f"{H.fmt(after.get('num_examples'))} held-out examples; eval loss over the eval data's trained tokens.")
    else:
        note = (f"The eval data has no gold final answer (an <code>answer</code> field or a line matching "
                f"<code>eval.answer_pattern</code>), so accuracy is not scored: eval loss and perplexity over "
                f"the trained tokens of {H.fmt(after.get('loss_examples'))} held-out examples show the gain.")
    body += H.note(note + f" Evaluated: {escape(str(headline(run)['eval_data']))}.") + task_table(run) + \
        accuracy_chart(run) + samples_table(run)
    return H.section("Target task", body, "target")


def task_table(run: RunData) -> str:
    """Accuracy per sub-task (rows with a `task` field: AnyTaskTune task sets), before and after."""
    before, after = ((run.results.get(k) or {}).get("by_task") or {} for k in ("before", "after"))
    if not after:
        return ""
    rows = [[t, H.fmt(a["num_examples"]), H.cell((before.get(t) or {}).get("accuracy"), f"task_{t}_before"),
             H.cell(a["accuracy"], f"task_{t}_after")] for t, a in after.items()]
    return H.table(["task", "examples", "accuracy before", "accuracy after"], rows, css_id="task-table")


def _change_cell(v, key: str, higher_better: bool) -> H.Cell:
    if v is None:
        return H.cell(None, key)
    good = (v > 0) == higher_better
    text = ("+" if v > 0 else "") + H.fmt(v)
    return H.Cell(text=text, value=v, key=key, css="up" if good and v else ("down" if v else ""))


def accuracy_chart(run: RunData) -> str:
    """Accuracy at step 0, at each evaluation during training, and at the end."""
    pts = _eval_points(run, "accuracy")
    if len(pts) < 3:  # before and after are already in the table
        return ""
    return svg.line_chart([svg.Series(name="accuracy", points=pts)], title="accuracy during training",
                          y_label="accuracy")


def _eval_points(run: RunData, key: str) -> list[tuple[float, float]]:
    before, after = run.results.get("before") or {}, run.results.get("after") or {}
    pts = [(0, before[key])] if H.is_number(before.get(key)) else []
    pts += [(r["step"], r[key]) for r in run.evals if H.is_number(r.get(key))]
    if H.is_number(after.get(key)):
        pts.append((steps_done(run), after[key]))
    return pts


def samples_table(run: RunData) -> str:
    samples = (run.results.get("after") or {}).get("samples") or []
    if not samples:
        return ""
    rows = [[s.get("source"), s.get("reference"), s.get("prediction"), "yes" if s.get("correct") else "no"]
            for s in samples]
    return ("<details><summary>sample predictions after training</summary>" +
            H.table(["example", "reference", "prediction", "correct"], rows) + "</details>")


def loss_section(run: RunData) -> str:
    train = [(r["step"], r["loss"]) for r in run.train if H.is_number(r.get("loss"))]
    series = [svg.Series(name="train loss", points=train)]
    evals = _eval_points(run, "eval_loss")
    if evals:
        series.append(svg.Series(name="eval loss", points=evals, style="dots"))
    chart = svg.line_chart(series, title="loss", y_label="loss", width=900, height=300)
    skipped = (H.note(f"{len(run.skipped)} steps were skipped (non-finite loss or gradient): steps "
                      f"{', '.join(str(r['step']) for r in run.skipped[:20])}", "warn") if run.skipped else "")
    return H.section("Loss", chart + skipped, "loss")


def throughput_section(run: RunData) -> str:
    labels = {"tokens_per_s": "tokens/s (median)", "step_s": "seconds per step (median)",
              "trained_tokens_per_step": "trained tokens per step (mean)",
              "optimizer_state_bytes": "optimizer state (bytes)", "startup_s": "start-up (s)",
              "train_s": "optimizer steps (s)", "skipped_steps": "skipped steps",
              "eval_examples_per_s": "eval examples/s (generation)"}
    rows = [[labels[k], H.cell(v, k)] for k, v in throughput_figures(run).items()]
    charts = [_step_chart(run, k, label) for k, label in (("tokens_per_s", "tokens/s"), ("lr", "learning rate"),
                                                            ("grad_norm", "gradient norm"))]
    return H.section("Throughput", H.table(["figure", "value"], rows, css_id="throughput-table") +
                     f'<div class="charts">{"".join(charts)}</div>', "throughput")


def _step_chart(run: RunData, key: str, label: str) -> str:
    pts = [(r["step"], r[key]) for r in run.train if H.is_number(r.get(key))]
    return svg.line_chart([svg.Series(name=label, points=pts)], title=label, y_label=label, width=440,
                          height=220) if pts else ""


def metrics_section(run: RunData) -> str:
    keys = extra_metrics(run)
    if not keys:
        return ""
    charts = "".join(_step_chart(run, k, k) for k in keys)
    return H.section("Method and objective metrics", f'<div class="charts">{charts}</div>', "metrics")


def side_effects_section(run: RunData) -> str:
    parts = [render_diagnostic(name, d) for name, d in run.diagnostics.items()]
    for name, err in run.diagnostic_errors.items():
        parts.append(H.note(f"<b>{escape(name)}</b>: unreadable ({escape(err)})", "warn"))
    missing = [n for n in known_diagnostics() if n not in run.diagnostics and n not in run.diagnostic_errors]
    cmd = f"tunelab diagnose {run.dir}"
    if not run.diagnostics and not run.diagnostic_errors:
        parts.insert(0, H.note(f"No diagnostics were run for this run. Run them with <code>{escape(cmd)}</code> "
                               f"(or list them under <code>diagnostics</code> in the config)."))
    for name in missing:
        parts.append(H.note(f'<b>{escape(name)}</b>: not run. Run it with <code>{escape(cmd)} --only '
                            f'{escape(name)}</code>', "note missing"))
    intro = ("<p>What training cost outside the target task: drift from the base model, retained general "
             "knowledge, how much of each response the fine-tuning contributes, and intruder dimensions "
             "in the weights.</p>")
    return H.section("Side effects", intro + "".join(parts), "side-effects")


def known_diagnostics() -> list[str]:
    """The registered diagnostic names."""
    from tunelab.registry import DIAGNOSTICS
    return DIAGNOSTICS.names()
