"""Render one diagnostic result (diagnostics/<name>.json) as HTML.

Every diagnostic renders generically from its documented shape: the summary as a figure table, then
each `details` entry by what it looks like: a table ({"columns", "rows"}; with a per-layer bar chart
when it has a `layer` column), a distribution ({"values"}; a histogram with quantiles), a list of
records (samples), or anything else as JSON. A diagnostic may add a specific view on top by
registering a function in VIEWS; the generic part never needs to know which diagnostic it shows.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from html import escape

from tunelab.report import html as H
from tunelab.report import svg

MAX_ROWS = 200  # longer tables are cut (the JSON file keeps them all)
VIEWS: dict[str, Callable[[dict], str]] = {}


def view(name: str):
    """Register an extra view for diagnostic `name`, shown between its summary and its details."""
    def deco(fn: Callable[[dict], str]) -> Callable[[dict], str]:
        VIEWS[name] = fn
        return fn
    return deco


def render_diagnostic(name: str, d: dict) -> str:
    details = d["details"]
    took = f' <span class="muted">({svg.fmt_num(details["seconds"])} s)</span>' \
        if H.is_number(details.get("seconds")) else ""
    parts = [f'<div class="diag" id="diag-{escape(name)}"><h3>{escape(name)}{took}</h3>']
    if details.get("not_applicable"):
        parts.append(H.note(f"not applicable: {escape(str(details['not_applicable']))}", "note not-applicable"))
    if d["summary"]:
        rows = [[k, H.cell(v, key=f"{name}.{k}")] for k, v in d["summary"].items()]
        parts.append(H.table(["figure", "value"], rows, css_id=f"summary-{name}"))
    if name in VIEWS:
        parts.append(VIEWS[name](d))
    scalars = {k: v for k, v in details.items() if _is_scalar(v) and k not in ("seconds", "not_applicable")}
    for key, item in details.items():
        if not _is_scalar(item):
            parts.append(render_detail(f"{name}: {key}", key, item))
    if scalars or d["config"]:
        info = H.table(["key", "value"], [[k, v] for k, v in scalars.items()]) if scalars else ""
        settings = f"<pre>{escape(json.dumps(d['config'], indent=1))}</pre>" if d["config"] else ""
        parts.append(f"<details><summary>settings and run info</summary>{settings}{info}</details>")
    return "".join(parts) + "</div>"


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _is_table(item) -> bool:
    return isinstance(item, dict) and isinstance(item.get("columns"), list) and isinstance(item.get("rows"), list)


def render_detail(title: str, key: str, item) -> str:
    """One `details` entry, by its shape; a mapping of such entries renders each under its key."""
    head = f"<h4>{escape(key)}</h4>"
    if _is_table(item):
        return head + render_table(title, item["columns"], item["rows"])
    if isinstance(item, dict) and isinstance(item.get("values"), list):
        return head + render_distribution(title, item["values"])
    if isinstance(item, dict) and item and all(_is_scalar(v) for v in item.values()):
        return head + H.table(["key", "value"], [[k, v] for k, v in item.items()])
    if isinstance(item, dict) and item and all(_is_table(v) or isinstance(v, dict) for v in item.values()):
        return head + "".join(render_detail(f"{title}: {k}", k, v) for k, v in item.items())
    if isinstance(item, list) and item and all(isinstance(r, dict) for r in item):
        cols = list(dict.fromkeys(k for r in item for k in r))
        return head + render_table(title, cols, [[r.get(c) for c in cols] for r in item])
    text = json.dumps(item, indent=1, default=str)
    return f"<details><summary>{escape(key)}</summary><pre>{escape(text[:20000])}</pre></details>"


def _cellify(v):
    return v if H.is_number(v) or v is None or isinstance(v, str) else json.dumps(v, default=str)


def render_table(title: str, columns: list, rows: list[list], open_rows: int = 12) -> str:
    """The table (collapsed when long), then per-layer bars when it has one row per layer."""
    shown = [[_cellify(v) for v in r] for r in rows[:MAX_ROWS]]
    out = H.table([str(c) for c in columns], shown)
    if len(rows) > MAX_ROWS:
        out += H.note(f"showing {MAX_ROWS} of {len(rows)} rows; the JSON file holds them all")
    if len(rows) > open_rows:
        out = f"<details><summary>{len(rows)} rows</summary>{out}</details>"
    if "layer" in columns:
        out += per_layer_charts(title, columns, rows)
    return out


def per_layer_charts(title: str, columns: list, rows: list[list], max_charts: int = 3) -> str:
    """Bars per layer for each numeric column of a table with one row per layer (a table with
    several rows per layer is left as it is: summing its columns may mean nothing)."""
    li = columns.index("layer")
    layers = [r[li] for r in rows]
    if not rows or len(set(map(str, layers))) != len(layers):
        return ""
    numeric = [i for i, c in enumerate(columns) if i != li and all(H.is_number(r[i]) for r in rows)]
    order = sorted(range(len(rows)), key=lambda k: (not H.is_number(layers[k]),
                                                    layers[k] if H.is_number(layers[k]) else 0, str(layers[k])))
    charts = [svg.bar_chart([str(layers[k]) for k in order], [rows[k][i] for k in order],
                            title=f"{title}: {columns[i]} per layer", y_label=f"{columns[i]} per layer")
              for i in numeric[:max_charts]]
    return f'<div class="charts">{"".join(charts)}</div>' if charts else ""


def quantiles(values: list[float]) -> dict[str, float]:
    vals = sorted(v for v in values if H.is_number(v))
    if not vals:
        return {}
    q = statistics.quantiles(vals, n=10, method="inclusive") if len(vals) > 1 else [vals[0]] * 9
    return {"n": len(vals), "mean": statistics.fmean(vals), "min": vals[0], "p10": q[0], "median": q[4],
            "p90": q[8], "max": vals[-1]}


def render_distribution(title: str, values: list) -> str:
    qs = quantiles(values)
    if not qs:
        return H.note("no values")
    marks = {k: qs[k] for k in ("p10", "median", "p90")}
    chart = svg.histogram(values, title=title, x_label=title.split(": ")[-1], marks=marks)
    return chart + H.table(list(qs), [list(qs.values())])


# ----------------------------------------------------------------------------- specific views

@view("tuco")
def tuco_view(d: dict) -> str:
    """A sentence per TuCo distribution (eval prompts, generic prompts): how large the fine-tuning
    component is against the whole, at the median prompt and at the extremes."""
    lines = []
    for key, item in d["details"].items():
        if isinstance(item, dict) and isinstance(item.get("values"), list) and (qs := quantiles(item["values"])):
            lines.append(f"<b>{escape(key)}</b> prompts ({qs['n']}): median {svg.fmt_num(qs['median'])}, "
                         f"10% below {svg.fmt_num(qs['p10'])}, 10% above {svg.fmt_num(qs['p90'])}.")
    if not lines:
        return ""
    return H.note("Tuning contribution per prompt. " + " ".join(lines) +
                  " 0 means the fine-tuned model computes what the base model computes on that prompt.")


@view("intruder")
def intruder_view(d: dict) -> str:
    """Intruder counts per module type, as bars, from a details table with a module column
    (`module_type`, `module` or `type`) and a count column (`count` or a name with `intruder`)."""
    for item in d["details"].values():
        if not (isinstance(item, dict) and isinstance(item.get("columns"), list)):
            continue
        cols, rows = item["columns"], item.get("rows") or []
        mod = next((c for c in ("module_type", "module", "type") if c in cols), None)
        num = next((c for c in cols if "intruder" in str(c) or c == "count"), None)
        if mod and num and rows:
            mi, ni = cols.index(mod), cols.index(num)
            totals: dict[str, float] = {}
            for r in rows:
                if H.is_number(r[ni]):
                    totals[str(r[mi])] = totals.get(str(r[mi]), 0) + r[ni]
            return svg.bar_chart(list(totals), list(totals.values()), title=f"intruder dimensions per {mod}",
                                 y_label=f"{num} per {mod}")
    return ""


@view("mechanisms")
def mechanisms_view(d: dict) -> str:
    """Entity-tracking accuracy of the base, the tuned model, and the base with the tuned model's
    top-k heads patched in (CMAP), as bars; a sentence on the share of the gap recovered."""
    s, rec = d["summary"], d["details"].get("recovery") or {}
    if not H.is_number(s.get("base_accuracy")) or not rec.get("rows"):
        return ""
    labels = ["base", "tuned"] + [f"base+{r[0]}" for r in rec["rows"]]
    values = [s["base_accuracy"], s["tuned_accuracy"]] + [r[1] for r in rec["rows"]]
    chart = svg.bar_chart(labels, values, title="entity tracking: base, tuned, base with the tuned model's top-k heads",
                          y_label="accuracy")
    share = s.get("recovered_share")
    said = (f"Patching the tuned model's top {s['top_k']} heads into the base recovers "
            f"{svg.fmt_num(100 * share)}% of the gap." if H.is_number(share) else
            "Base and tuned are equally accurate: there is no gap to recover.")
    return chart + H.note(said)
