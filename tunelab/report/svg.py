"""Inline SVG charts, generated as strings: line charts, bar charts, histograms, scatter plots.

No JavaScript and no external resources: a chart is one `<svg>` element whose hover text is a
native `<title>`. Every function returns markup ready to drop into an HTML page.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MUTED = "#9aa5b1"


@dataclass(kw_only=True)
class Series:
    """One named set of (x, y) points, drawn as a line or as dots."""
    name: str
    """Legend label."""
    points: list[tuple[float, float]]
    """(x, y) pairs; non-finite y values are dropped."""
    style: str = "line"
    """`line` (a polyline) or `dots` (a marker per point)."""
    color: str | None = None
    """CSS colour; None picks the next palette colour."""
    dashed: bool = False
    """Draw the line dashed (e.g. a second quantity on the same axes)."""
    labels: list[str] = field(default_factory=list)
    """Hover text per point (defaults to 'name: x, y')."""


def fmt_num(v: float) -> str:
    """A short label: 4 significant digits, thousands separators for big numbers."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return f"{int(v):,}"
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.3e}"
    return f"{v:.4g}"


def tick(v: float) -> str:
    """An axis label: at most 3 significant digits, short."""
    return f"{int(v):,}" if float(v).is_integer() and abs(v) < 1e6 else f"{v:.3g}"


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]; a flat range gets a band.
    `integer` (an axis of steps): whole-number ticks only (steps 1, 2, 5 x 10^k, at least 1)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if not math.isfinite(hi - lo):  # a span beyond float range: its ends are the only ticks
        return [lo, hi]
    if hi - lo <= max(1e-9 * max(abs(lo), abs(hi)), 1e-200):  # flat, or below float resolution
        pad = abs(lo) * 0.5 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count - 1, 1)
    if integer:
        raw = max(raw, 1.0)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in ((1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)) if m * mag >= raw)
    first = math.floor(lo / step) * step
    n = int(math.ceil((hi - first) / step - 1e-9)) + 1
    digits = max(0, 2 - math.floor(math.log10(step)))  # drop float noise below the step's precision
    return [round(first + i * step, digits) for i in range(n)]


class _Frame:
    """Maps data coordinates to pixels inside the plot area of a `width` x `height` chart."""

    def __init__(self, width: int, height: int, xs: list[float], ys: list[float], left: int = 58):
        self.w, self.h, self.left, self.top, self.right, self.bottom = width, height, left, 28, 14, 34
        self.xt = nice_ticks(min(xs), max(xs), integer=all(float(x).is_integer() for x in xs))
        self.yt = nice_ticks(min(ys), max(ys))

    def x(self, v: float) -> float:
        lo, hi = self.xt[0], self.xt[-1]
        return self.left + (v - lo) / ((hi - lo) or 1) * (self.w - self.left - self.right)

    def y(self, v: float) -> float:
        lo, hi = self.yt[0], self.yt[-1]
        return self.h - self.bottom - (v - lo) / ((hi - lo) or 1) * (self.h - self.top - self.bottom)

    def axes(self, x_label: str, y_label: str, x_ticks: bool = True) -> list[str]:
        out = [f'<line x1="{self.left}" y1="{self.y(self.yt[0]):.1f}" x2="{self.w - self.right}" '
               f'y2="{self.y(self.yt[0]):.1f}" class="axis"/>']
        for t in self.yt:
            out.append(f'<line x1="{self.left}" x2="{self.w - self.right}" y1="{self.y(t):.1f}" '
                       f'y2="{self.y(t):.1f}" class="grid"/><text x="{self.left - 6}" y="{self.y(t) + 4:.1f}" '
                       f'text-anchor="end">{tick(t)}</text>')
        for t in self.xt if x_ticks else []:
            out.append(f'<text x="{self.x(t):.1f}" y="{self.h - self.bottom + 16}" text-anchor="middle">'
                       f'{tick(t)}</text>')
        out.append(f'<text x="{(self.left + self.w - self.right) / 2:.0f}" y="{self.h - 3}" '
                   f'text-anchor="middle" class="label">{escape(x_label)}</text>')
        out.append(f'<text x="12" y="{self.top - 10}" class="label">{escape(y_label)}</text>')
        return out


def _svg(width: int, height: int, title: str, parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
            f'<title>{escape(title)}</title>{"".join(parts)}</svg>')


def _empty(width: int, height: int, title: str) -> str:
    return _svg(width, height, title, [f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
                                       f'class="label">no data</text>'])


def line_chart(series: list[Series], *, title: str, x_label: str = "step", y_label: str = "",
               width: int = 640, height: int = 260) -> str:
    """Several series on shared axes, with a legend; dots carry hover text."""
    series = [Series(name=s.name, points=[(x, y) for x, y in s.points if math.isfinite(y)], style=s.style,
                     color=s.color or PALETTE[i % len(PALETTE)], dashed=s.dashed, labels=s.labels)
              for i, s in enumerate(series)]
    pts = [p for s in series for p in s.points]
    if not pts:
        return _empty(width, height, title)
    f = _Frame(width, height, [p[0] for p in pts], [p[1] for p in pts])
    parts = f.axes(x_label, y_label)
    for s in series:
        parts += _draw_series(f, s)
    parts += _legend(series, width)
    return _svg(width, height, title, parts)


def _draw_series(f: _Frame, s: Series) -> list[str]:
    if s.style == "line" and len(s.points) > 1:
        coords = " ".join(f"{f.x(x):.1f},{f.y(y):.1f}" for x, y in s.points)
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        return [f'<polyline fill="none" stroke="{s.color}" stroke-width="1.8"{dash} points="{coords}">'
                f'<title>{escape(s.name)}</title></polyline>']
    out = []
    for i, (x, y) in enumerate(s.points):
        tip = s.labels[i] if i < len(s.labels) else f"{s.name}: step {fmt_num(x)}, {fmt_num(y)}"
        out.append(f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="4" fill="{s.color}" stroke="#fff">'
                   f'<title>{escape(tip)}</title></circle>')
    return out


def _legend(series: list[Series], width: int) -> list[str]:
    out, x = [], width - 14
    for s in reversed(series):
        label = escape(s.name)
        x -= 7 * len(s.name) + 26
        out.append(f'<rect x="{x}" y="8" width="12" height="12" fill="{s.color}"/>'
                   f'<text x="{x + 16}" y="18">{label}</text>')
    return out


def bar_chart(labels: list[str], values: list[float | None], *, title: str, y_label: str = "",
              highlight: int | None = None, colors: list[str] | None = None, width: int | None = None,
              height: int = 220) -> str:
    """Vertical bars, one per label (missing values leave a gap), in `colors` (one per bar; a run's
    colour elsewhere on the page) or all in the first palette colour; bar number `highlight` gets
    a dark outline and a "best" label (a colour of its own would be some other run's)."""
    n = len(labels)
    width = width or max(260, min(900, 70 + 34 * n))
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return _empty(width, height, title)
    f = _Frame(width, height, [0, 1], [0.0] + finite)
    slot = (width - f.left - f.right) / n
    parts = f.axes("", y_label, x_ticks=False)
    every = max(1, math.ceil(n * 7 * max(map(len, labels)) / (width - f.left)))  # label thinning
    for i, (lab, v) in enumerate(zip(labels, values)):
        x0 = f.left + i * slot + slot * 0.15
        if v is not None and math.isfinite(v):
            y0, y1 = f.y(max(v, 0)), f.y(min(v, 0))
            color = colors[i] if colors else PALETTE[0]
            outline = ' stroke="#111" stroke-width="2"' if i == highlight else ""
            parts.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{slot * 0.7:.1f}" '
                         f'height="{max(y1 - y0, 0.5):.1f}" fill="{color}"{outline}>'
                         f'<title>{escape(lab)}: {fmt_num(v)}{" (best)" if i == highlight else ""}</title></rect>')
            if i == highlight:
                parts.append(f'<text x="{x0 + slot * 0.35:.1f}" y="{y0 - 4:.1f}" text-anchor="middle" '
                             f'class="label">best</text>')
        if i % every == 0:
            parts.append(f'<text x="{x0 + slot * 0.35:.1f}" y="{height - f.bottom + 16}" '
                         f'text-anchor="middle">{escape(lab)}</text>')
    return _svg(width, height, title, parts)


def histogram(values: list[float], *, title: str, x_label: str = "", bins: int | None = None,
              marks: dict[str, float] | None = None, width: int = 640, height: int = 240) -> str:
    """Counts of `values` in equal-width bins; `marks` draws labelled vertical lines (quantiles)."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return _empty(width, height, title)
    lo, hi = min(vals), max(vals)
    bins = bins or max(1, min(30, math.ceil(math.sqrt(len(vals)))))
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in vals:
        counts[min(int((v - lo) / span * bins), bins - 1)] += 1
    f = _Frame(width, height, [lo, lo + span], [0, max(counts)])
    parts = f.axes(x_label, "count")
    for i, c in enumerate(counts):
        a, b = lo + i * span / bins, lo + (i + 1) * span / bins
        parts.append(f'<rect x="{f.x(a):.1f}" y="{f.y(c):.1f}" width="{max(f.x(b) - f.x(a) - 1, 0.5):.1f}" '
                     f'height="{f.y(0) - f.y(c):.1f}" fill="{PALETTE[0]}" opacity="0.8">'
                     f'<title>[{fmt_num(a)}, {fmt_num(b)}): {c}</title></rect>')
    for j, (name, v) in enumerate((marks or {}).items()):
        parts.append(f'<line x1="{f.x(v):.1f}" x2="{f.x(v):.1f}" y1="{f.top}" y2="{f.y(0):.1f}" '
                     f'stroke="{PALETTE[1 + j % 7]}" stroke-dasharray="4 3"/><text x="{f.x(v) + 3:.1f}" '
                     f'y="{f.top + 10 + 12 * j}">{escape(name)} {fmt_num(v)}</text>')
    return _svg(width, height, title, parts)


def scatter(points: list[tuple[str, float | None, float | None]], *, title: str, x_label: str, y_label: str,
            width: int = 440, height: int = 280) -> str:
    """One labelled dot per (name, x, y), coloured by its place in `points` (as line_chart colours
    its series); points with a missing or non-finite coordinate are left out."""
    pts = [(PALETTE[i % len(PALETTE)], n, x, y) for i, (n, x, y) in enumerate(points)
           if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return _empty(width, height, title)
    f = _Frame(width, height, [p[2] for p in pts], [p[3] for p in pts])
    parts = f.axes(x_label, y_label)
    for color, name, x, y in pts:
        parts.append(f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="5" fill="{color}" stroke="#fff">'
                     f'<title>{escape(name)}: {escape(x_label)} {fmt_num(x)}, {escape(y_label)} {fmt_num(y)}'
                     f'</title></circle><text x="{f.x(x) + 7:.1f}" y="{f.y(y) - 6:.1f}">{escape(name)}</text>')
    return _svg(width, height, title, parts)
