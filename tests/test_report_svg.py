"""Properties of the page building blocks (inline SVG charts, tables, the best-run rule), on
random inputs."""
import math
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from test_report import Page, _rect_titles
from tunelab.report import svg
from tunelab.report.compare import best_indices
from tunelab.report.html import cell, table

# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(st.floats(-1e6, 1e6), st.floats(0, 1e6))
def test_ticks_cover_the_range_evenly(lo, span):
    ticks = svg.nice_ticks(lo, lo + span)
    assert ticks[0] <= lo + 1e-9 * (1 + abs(lo)) and ticks[-1] >= lo + span - 1e-9 * (1 + abs(lo) + span)
    steps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert 2 <= len(ticks) <= 12 and all(math.isclose(s, steps[0], rel_tol=1e-6) for s in steps)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10**12, 10**12)),
                min_size=1, max_size=6))
def test_table_cells_carry_exact_values(values):
    page = Page(table(["x"], [[cell(v, key=f"k{i}")] for i, v in enumerate(values)]))
    assert [page.value(f"k{i}") for i in range(len(values))] == values


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(-100, 100)), min_size=1, max_size=6), st.booleans())
def test_best_is_the_extreme_and_only_it(values, higher):
    best = best_indices(values, higher)
    nums = [v for v in values if v is not None]
    if len(nums) < 2 or min(nums) == max(nums):
        assert best == []
    else:
        top = max(nums) if higher else min(nums)
        assert best and all(values[i] == top for i in best)
        assert all(v != top for i, v in enumerate(values) if i not in best)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40))
def test_histogram_counts_every_value_and_lines_stay_in_frame(values):
    counts = [int(t.rsplit(": ", 1)[1]) for t in _rect_titles(svg.histogram(values, title="h"))]
    assert sum(counts) == len(values)
    chart = svg.line_chart([svg.Series(name="s", points=list(enumerate(values)))], title="c", width=300, height=200)
    pts = [tuple(map(float, p.split(","))) for p in Page(chart).polylines[0]["points"]] if len(values) > 1 else []
    assert all(0 <= x <= 300 and 0 <= y <= 200 for x, y in pts)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.one_of(st.none(), st.floats(-1e3, 1e3))), min_size=1,
                max_size=8))
def test_scatter_draws_every_complete_point_inside_the_frame(pairs):
    chart = svg.scatter([(f"r{i}", x, y) for i, (x, y) in enumerate(pairs)], title="t", x_label="x", y_label="y",
                        width=300, height=200)
    dots = re.findall(r'<circle cx="([-\d.]+)" cy="([-\d.]+)"[^>]*><title>([^<]*)</title>', chart)
    assert [t.split(":")[0] for *_, t in dots] == [f"r{i}" for i, (_, y) in enumerate(pairs) if y is not None]
    assert all(0 <= float(x) <= 300 and 0 <= float(y) <= 200 for x, y, _ in dots)


@settings(max_examples=60, deadline=None)
@given(first=st.integers(0, 50), n=st.integers(1, 12), stride=st.integers(1, 40))
def test_step_axes_have_whole_number_ticks(first, n, stride):
    """A chart over training steps never labels step 0.5 (#16.11l)."""
    import re

    points = [(first + i * stride, 1.0 / (i + 1)) for i in range(n)]
    chart = svg.line_chart([svg.Series(name="loss", points=points)], title="loss", height=260)
    x_labels = re.findall(r'<text x="[\d.]+" y="242" text-anchor="middle">([^<]*)</text>', chart)
    assert x_labels and all(re.fullmatch(r"-?[\d,]+", t) for t in x_labels), x_labels
    values = [int(t.replace(",", "")) for t in x_labels]
    assert values[0] <= first and values[-1] >= first + (n - 1) * stride  # the ticks still cover the steps
