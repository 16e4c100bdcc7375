"""HTML building blocks for the report pages: one self-contained page (inline CSS, no scripts, no
network), escaped text, and tables whose numeric cells carry their exact value in `data-value` so
that tests and scripts can read the numbers back without parsing display strings."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape

from tunelab.report.svg import fmt_num

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;margin:0;
background:#f6f7f9}
main{max-width:1080px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #e3e6ea;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 8px}.sub{color:#5b6675;margin:0 0 16px}
table{border-collapse:collapse;margin:8px 0 12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #e3e6ea;padding:4px 10px;text-align:right;vertical-align:top}
td:first-child{text-align:left}th{background:#f1f3f6;font-weight:600;text-align:left}
td.text{text-align:left;max-width:420px;white-space:pre-wrap;word-break:break-word}
td.best{background:#dff3e3;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #e3e6ea;border-radius:6px;padding:8px 12px;min-width:120px}
.card .k{color:#5b6675;font-size:12px}.card .v{font-size:18px;font-weight:600}
.up{color:#1a7f37}.down{color:#c62828}.muted{color:#5b6675}
.note{background:#f1f3f6;border-left:4px solid #9aa5b1;padding:8px 12px;margin:10px 0}
.warn{background:#fff4e5;border-left:4px solid #ff9800;padding:8px 12px;margin:10px 0}
.charts{display:flex;flex-wrap:wrap;gap:14px}svg.chart{font-size:11px;background:#fff;max-width:100%}
svg .axis{stroke:#7a8491}svg .grid{stroke:#eef0f3}svg .label{fill:#5b6675}
code,pre{font:12px ui-monospace,Menlo,Consolas,monospace;background:#f1f3f6;border-radius:3px}
code{padding:1px 4px}pre{padding:8px;overflow-x:auto;max-height:420px}
details{margin:8px 0}summary{cursor:pointer;color:#33415c}
"""


@dataclass(kw_only=True)
class Cell:
    """A table cell: display text plus, for numbers, the exact value and an optional key."""
    text: str
    value: float | int | None = None
    """The exact number behind `text`, written to data-value."""
    key: str | None = None
    """A stable name for the cell (data-key), for tests and scripts."""
    best: bool = False
    """Highlight as the best in its row."""
    css: str = ""
    """Extra CSS class (e.g. `text` for left-aligned prose)."""


def fmt(v) -> str:
    """Display text of any scalar: numbers short, None as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, (int, float)):
        return fmt_num(v)
    return str(v)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def cell(v, key: str | None = None, best: bool = False) -> Cell:
    if isinstance(v, Cell):
        return v
    css = "" if is_number(v) or v is None else "text"
    return Cell(text=fmt(v), value=v if is_number(v) else None, key=key, best=best, css=css)


def _td(c: Cell) -> str:
    attrs = ""
    if c.value is not None:
        attrs += f' data-value="{json.dumps(c.value)}"'
    if c.key:
        attrs += f' data-key="{escape(c.key)}"'
    css = " ".join(x for x in (c.css, "best" if c.best else "") if x)
    if css:
        attrs += f' class="{css}"'
    return f"<td{attrs}>{escape(c.text)}</td>"


def table(columns: list[str], rows: list[list], *, css_id: str | None = None) -> str:
    """Rows of plain values or Cells under `columns`."""
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_td(cell(v)) for v in r) + "</tr>" for r in rows)
    ident = f' id="{escape(css_id)}"' if css_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cards(items: list[tuple[str, object, str | None]]) -> str:
    """Headline figures: (label, value, key) boxes."""
    out = []
    for label, value, key in items:
        attrs = f' data-key="{escape(key)}"' if key else ""
        if is_number(value):
            attrs += f' data-value="{json.dumps(value)}"'
        out.append(f'<div class="card"><div class="k">{escape(label)}</div>'
                   f'<div class="v"{attrs}>{escape(fmt(value))}</div></div>')
    return f'<div class="cards">{"".join(out)}</div>'


def section(title: str, body: str, ident: str) -> str:
    return f'<section id="{escape(ident)}"><h2>{escape(title)}</h2>{body}</section>'


def note(text: str, kind: str = "note") -> str:
    return f'<div class="{kind}">{text}</div>'


def page(title: str, subtitle: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)}</title><style>{CSS}</style></head><body><main>'
            f'<h1>{escape(title)}</h1><p class="sub">{escape(subtitle)}</p>{body}</main></body></html>')
