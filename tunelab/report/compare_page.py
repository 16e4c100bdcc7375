"""How a Comparison is shown: DIR/compare.html (table with the best per row highlighted, loss
curves overlaid, target gain against each side effect, a bar chart per figure), DIR/compare.md (the
table in Markdown, best in bold), DIR/compare.json (the same numbers), and a plain-text table for the
terminal."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

from tunelab.report import html as H
from tunelab.report import svg
from tunelab.report.compare import FORCED, ORDER_DEPENDENT, Comparison
from tunelab.report.rundata import headline
from tunelab.run.files import atomic_write_text


# (section, figure, axis label) of the side effects plotted against the target gain, when present
SIDE_EFFECTS = (("forgetting", "kl_drift", "KL drift from base"),
                ("forgetting", "retained_accuracy", "retained probe accuracy"),
                ("intruder", "intruders_total", "intruder dimensions"),
                ("tuco", "tuco_eval_mean", "TuCo (eval prompts)"))


def write_comparison(c: Comparison, out: Path) -> tuple[Path, Path, Path]:
    """Write compare.html, compare.json and compare.md under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "compare.html", out / "compare.json", out / "compare.md"
    texts = render_html(c), json.dumps(c.to_json(), indent=1), markdown(c)
    for path, text in zip(paths, texts):
        atomic_write_text(path, text)
    return paths


def render_html(c: Comparison) -> str:
    rows = c.rows()
    warn = "".join(H.note(escape(w), "warn") for w in c.warnings)
    body = (warn + runs_section(c) + table_section(c, rows) + curves_section(c) + tradeoff_section(c, rows) +
            bars_section(c, rows))
    return H.page(f"tunelab compare: {' vs '.join(c.names)}", f"{len(c.runs)} runs", body)


def runs_section(c: Comparison) -> str:
    rows = []
    for name, r in zip(c.names, c.runs):
        h = headline(r)
        rows.append([name, h["method"], h["objective"], h["model"], h["steps"], h["trainable_params"],
                     h["time_s"], str(r.dir)])
    forced = H.table(["shared field", "value"], [[k, H.fmt(c.reference.get(k))] for k in FORCED])
    return H.section("Runs", H.table(["run", "method", "objective", "model", "steps", "trainable params",
                                      "time (s)", "directory"], rows, css_id="runs-table") +
                     "<details><summary>fields forced equal across runs</summary>" + forced + "</details>", "runs")


def table_section(c: Comparison, rows: list[dict]) -> str:
    out = []
    for r in rows:
        cells = [H.cell(v, key=f"{r['section']}.{r['figure']}.{n}", best=i in r["best"])
                 for i, (n, v) in enumerate(zip(c.names, r["values"]))]
        arrow = {True: "↑", False: "↓", None: ""}[r["higher_is_better"]]
        out.append([r["section"], f"{r['figure']} {arrow}".strip(), *cells])
    diag = {r["section"] for r in rows} - {"target", "throughput"}
    missing = [f"{n}: {', '.join(sorted(diag - set(r.diagnostics)))}" for n, r in zip(c.names, c.runs)
               if diag - set(r.diagnostics)]
    note = H.note("↑ higher is better, ↓ lower is better; the best run in each row is highlighted. Start-up "
                  "time is not ranked: the first run trained in a process also pays for loading libraries.")
    if missing:
        note += H.note("not run (shown as —): " + escape("; ".join(missing)) +
                       ". Run <code>tunelab diagnose RUN</code> on those runs.")
    return H.section("Side by side", H.table(["section", "figure", *c.names], out, css_id="compare-table") + note,
                     "table")


def curves_section(c: Comparison) -> str:
    series = [svg.Series(name=n, points=[(t["step"], t["loss"]) for t in r.train if H.is_number(t.get("loss"))])
              for n, r in zip(c.names, c.runs)]
    chart = svg.line_chart(series, title="training loss", y_label="loss", width=900, height=320)
    return H.section("Loss curves", chart, "curves")


def tradeoff_section(c: Comparison, rows: list[dict]) -> str:
    """Target gain (accuracy change, else eval-loss change) against each side effect, one dot per run."""
    by_key = {(r["section"], r["figure"]): r["values"] for r in rows}
    gain_key = next((k for k in (("target", "accuracy_change"), ("target", "eval_loss_change"))
                     if sum(H.is_number(v) for v in by_key.get(k, [])) >= 1), None)
    if gain_key is None:
        return ""
    charts = []
    for section, fig, label in SIDE_EFFECTS:
        xs = by_key.get((section, fig))
        if not xs or sum(H.is_number(x) and H.is_number(y) for x, y in zip(xs, by_key[gain_key])) < 2:
            continue
        pts = [(n, x if H.is_number(x) else None, y if H.is_number(y) else None)
               for n, x, y in zip(c.names, xs, by_key[gain_key])]
        charts.append(svg.scatter(pts, title=f"{gain_key[1]} vs {section}.{fig}", x_label=label,
                                  y_label=gain_key[1].replace("_", " ")))
    if not charts:
        return ""
    return H.section("Gain vs side effects", '<div class="charts">' + "".join(charts) + "</div>", "tradeoff")


def bars_section(c: Comparison, rows: list[dict]) -> str:
    parts, section = [], None
    for r in rows:
        nums = [v for v in r["values"] if H.is_number(v)]
        if len(set(nums)) < 2 or r["figure"] in ORDER_DEPENDENT:
            continue  # nothing to tell apart (the table says it), or nothing a method decides
        if r["section"] != section:
            parts.append(("</div>" if section else "") + f'<h3>{escape(r["section"])}</h3><div class="charts">')
            section = r["section"]
        parts.append(svg.bar_chart(c.names, [v if H.is_number(v) else None for v in r["values"]],
                                   title=f"{r['section']}: {r['figure']}", y_label=r["figure"],
                                   highlight=r["best"][0] if len(r["best"]) == 1 else None,
                                   colors=[svg.PALETTE[i % len(svg.PALETTE)] for i in range(len(c.names))]))
    body = "".join(parts) + ("</div>" if section else "")
    return H.section("Per figure", body or H.note("every figure is the same for all runs"), "bars")


def text_table(c: Comparison) -> str:
    """The side-by-side table for a terminal; `*` marks the best run in a row."""
    lines = [["figure", *c.names]]
    for r in c.rows():
        vals = [H.fmt(v) + ("*" if i in r["best"] else "") for i, v in enumerate(r["values"])]
        lines.append([f"{r['section']}.{r['figure']}", *vals])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]

    def line(row: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
    out = [line(lines[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in lines[1:]]
    return "\n".join(out + [f"warning: {w}" for w in c.warnings])


def markdown(c: Comparison) -> str:
    """The comparison as Markdown: the runs, then one row per figure with the best run in bold."""
    def esc(v) -> str:
        return str(v).replace("|", "\\|")

    out = [f"# tunelab compare: {' vs '.join(c.names)}", ""]
    out += [f"> warning: {esc(w)}" for w in c.warnings] + ([""] if c.warnings else [])
    out += ["| run | method | objective | steps | trainable params | directory |", "|---|---|---|---:|---:|---|"]
    for name, r in zip(c.names, c.runs):
        h = headline(r)
        out.append(f"| {esc(name)} | {h['method']} | {h['objective']} | {h['steps']} | "
                   f"{H.fmt(h['trainable_params'])} | {esc(r.dir)} |")
    out += ["", "Shared by every run: " + ", ".join(f"`{k}` = {H.fmt(c.reference.get(k))}" for k in FORCED), "",
            "| section | figure | " + " | ".join(map(esc, c.names)) + " |", "|---|---|" + "---:|" * len(c.names)]
    for r in c.rows():
        arrow = {True: " ↑", False: " ↓", None: ""}[r["higher_is_better"]]
        vals = [(f"**{H.fmt(v)}**" if i in r["best"] else H.fmt(v)) for i, v in enumerate(r["values"])]
        out.append(f"| {r['section']} | {r['figure']}{arrow} | " + " | ".join(vals) + " |")
    out += ["", "↑ higher is better, ↓ lower is better; the best run in a row is in bold; — not measured."]
    return "\n".join(out) + "\n"
