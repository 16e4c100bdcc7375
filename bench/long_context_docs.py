"""Tables and inline-SVG charts of bench/long_context.py's results, written into
docs/results/long-context.md (between the bench markers) and docs/results/long-context-*.svg."""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results" / "long-context.md"
NAMES = {"before": "base (no training)", "full": "full attention", "s2": "S2-Attn", "sf": "SF-Attn", "lemo": "LeMo (keep 0.5)"}


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def curve_table(res: dict) -> str:
    pts = {(p["row"], p["length"]): p for p in res["curve"]}
    lengths = sorted({p["length"] for p in res["curve"]})
    rows = [r for r in NAMES if any(k[0] == r for k in pts)]
    head = "| attention | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |\n|---|" + "---|" * len(lengths) + "\n"
    out = []
    for title, key, spec in (("step CPU time (all threads), s", "step_cpu_s", ".1f"), ("step wall time, s", "step_s", ".1f"),
                             ("activations saved for backward, MiB",
                                                                  "saved_activations_mib", ".0f"),
                             ("peak RSS of the step over the loaded model, MiB", "step_peak_rss_mib", ".0f")):
        body = []
        for r in rows:
            cells = []
            for n in lengths:
                p = pts.get((r, n), {})
                cells.append("failed: " + p["error"][:60] if "error" in p else _fmt(p.get(key), spec))
            body.append(f"| {NAMES[r]} | " + " | ".join(cells) + " |")
        out.append(f"**{title}**\n\n" + head + "\n".join(body) + "\n")
    return "\n".join(out)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion hits / n."""
    if n == 0:
        return 0.0, 1.0
    p, d = hits / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def paired_bootstrap(a: list[float], b: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over paired rows, and its 95% percentile bootstrap interval (rows resampled)."""
    rng, diff = random.Random(seed), [y - x for x, y in zip(a, b)]
    means = sorted(sum(rng.choices(diff, k=len(diff))) / len(diff) for _ in range(draws))
    return sum(diff) / len(diff), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def _acc_cell(a: dict) -> str:
    n = a["num_examples"]
    hits = round(a["accuracy"] * n)
    lo, hi = wilson(hits, n)
    return f"{hits}/{n} [{lo:.0%}, {hi:.0%}] ({a['answer_nll']:.2f})"


def accuracy_table(res: dict) -> str:
    rows = [x for x in res["accuracy"] if "buckets" in x]
    buckets = sorted({int(b) for x in rows for b in x["buckets"]})
    head = ("| model | " + " | ".join(f"{b:,}" for b in buckets) + " | all | train step s (median) "
            "| train loss (last 4) |\n|---|" + "---|" * (len(buckets) + 3) + "\n")
    body = []
    for x in rows:
        acc = [x["buckets"].get(str(b)) for b in buckets]
        n = sum(a["num_examples"] for a in acc if a)
        hits = sum(round(a["accuracy"] * a["num_examples"]) for a in acc if a)
        total = {"num_examples": n, "accuracy": hits / max(n, 1),
                 "answer_nll": sum(a["answer_nll"] * a["num_examples"] for a in acc if a) / max(n, 1)}
        body.append(f"| {NAMES.get(x['row'], x['row'])} | " + " | ".join(_acc_cell(a) if a else "-" for a in acc) +
                    f" | {_acc_cell(total)} | {_fmt(x.get('step_s_median'), '.1f')} | {_fmt(x.get('final_loss'), '.3f')} |")
    failed = [f"| {NAMES.get(x['row'], x['row'])} | failed: {x['error'][:120]} |" for x in res["accuracy"] if "error" in x]
    return head + "\n".join(body + failed) + "\n"


def nll_table(res: dict) -> str:
    """Paired differences of the answer CE: each fine-tuned model against the base and against
    full-attention fine-tuning, over the same eval rows."""
    per = {x["row"]: [e["nll"] for e in x["examples"]] for x in res["accuracy"] if "examples" in x}
    out = ["| model | answer CE (mean) | minus base [95% CI] | minus full attention [95% CI] |", "|---|---|---|---|"]
    for row, v in per.items():
        cells = []
        for ref in ("before", "full"):
            if ref in per and row not in (ref, "before") and len(per[ref]) == len(v):
                m, lo, hi = paired_bootstrap(per[ref], v)
                cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            else:
                cells.append("-")
        out.append(f"| {NAMES.get(row, row)} | {sum(v) / len(v):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n" if len(per) > 1 else ""


def ratio_table(res: dict) -> str:
    """Full attention's step CPU time and saved activations divided by each pattern's, per length."""
    pts = {(p["row"], p["length"]): p for p in res["curve"] if "error" not in p}
    lengths = sorted({n for r, n in pts if r == "full"})
    out = ["| pattern | " + " | ".join(f"{n:,}: time, activations" for n in lengths) + " |",
           "|---|" + "---|" * len(lengths)]
    for r in ("s2", "sf", "lemo"):
        cells = []
        for n in lengths:
            a, b = pts.get(("full", n)), pts.get((r, n))
            cells.append(f"{a['step_cpu_s'] / b['step_cpu_s']:.2f}x, {a['saved_activations_mib'] / b['saved_activations_mib']:.2f}x"
                         if a and b and "step_cpu_s" in a and "step_cpu_s" in b else "-")
        out.append(f"| {NAMES[r]} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def charts(res: dict) -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from tunelab.report.svg import Series, line_chart

    def series(key):
        return [Series(name=NAMES[r], points=sorted((p["length"], p[key]) for p in res["curve"]
                                                    if p["row"] == r and key in p)) for r in NAMES if r != "before"]
    out = {"time": line_chart(series("step_cpu_s"), title="Step CPU time against sequence length", x_label="tokens",
                              y_label="CPU seconds per step"),
           "memory": line_chart(series("saved_activations_mib"), title="Activations saved for backward",
                                x_label="tokens", y_label="MiB"),
           "rss": line_chart(series("step_peak_rss_mib"), title="Peak RSS of one step over the loaded model",
                             x_label="tokens", y_label="MiB")}
    rows = [x for x in res["accuracy"] if "buckets" in x]
    if rows:
        out["accuracy"] = line_chart(
            [Series(name=NAMES.get(x["row"], x["row"]), dashed=x["row"] == "before",
                    points=[(int(b), 100 * v["accuracy"]) for b, v in sorted(x["buckets"].items(), key=lambda kv: int(kv[0]))])
             for x in rows], title="Answer accuracy by context length", x_label="context tokens", y_label="% exact")
        out["answer_ce"] = line_chart(  # the finer signal where few rows per bucket tie the hit rates
            [Series(name=NAMES.get(x["row"], x["row"]), dashed=x["row"] == "before",
                    points=[(int(b), v["answer_nll"]) for b, v in sorted(x["buckets"].items(), key=lambda kv: int(kv[0]))])
             for x in rows], title="Answer cross-entropy by context length", x_label="context tokens",
            y_label="nats")
    return out


def budget_line(res: dict) -> str:
    """The budget in words, from the last call that ran the accuracy rows (else the last call)."""
    call = next((c for c in reversed(res["calls"]) if "--only curve" not in c["command"]), res["calls"][-1])
    b = call["budget"]
    lengths = sorted({p["length"] for p in res["curve"]})
    return (f"Curve: one optimizer step per length ({', '.join(f'{n:,}' for n in lengths)} tokens) after a warm-up "
            f"step. Accuracy: {b['train_steps']} fine-tuning steps of one {b['train_length']:,}-token row "
            f"(`builtin:longctx?n=64&length={b['train_length']}&split=train`), then {b['eval_rows']} test rows "
            f"(`{call['eval']}`). Method {res['settings']['method']['name']}, "
            f"lr {res['settings']['train_lr']:g}.")


def host_line(res: dict) -> str:
    """The machine as the results file records it (files from before it recorded one: nothing)."""
    h = res.get("host")
    if not h:
        return ""
    return (f"Host: {h['cpu_model']} ({', '.join(h['isa']) or 'no AVX2'}), GPU {h['gpu'] or 'none'}, torch {h['torch']}, "
            f"OMP_NUM_THREADS={h.get('omp_num_threads') or 'unset'}. ")


def _styled(svg: str) -> str:
    """A chart as a file of its own: the axis and grid strokes the HTML report's stylesheet gives it."""
    style = "<style>.axis{stroke:#444}.grid{stroke:#e5e5e5}text{font:11px sans-serif}</style>"
    head, sep, rest = svg.partition(">")
    return head + sep + style + rest


def _shown(path: Path) -> str:
    """`path` relative to the repository, or as given when it lies outside (a --out elsewhere)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write(res: dict, sources: list[Path]) -> None:
    raw = ", ".join(f"`{_shown(p)}`" for p in sources)
    md = (f"Measured {res['date']} on {res['machine']} (2 cores shared with other sessions, which were running: "
          f"timings are noisy), {res.get('minutes', 0):.0f} min; raw results {raw}; command(s):\n\n"
          + "".join(f"    {c['command']}\n" for c in res["calls"]) + "\n" + host_line(res) + budget_line(res) + "\n\n")
    if res["curve"]:
        md += (f"### Step time and memory against sequence length\n\n{curve_table(res)}\n"
               f"**Full attention's cost divided by each pattern's** (above 1: the pattern is cheaper)\n\n"
               f"{ratio_table(res)}\n")
    if res["accuracy"]:
        md += ("### Accuracy by context length\n\nExact answer (greedy, teacher-forced) on the held-out rows of each "
               "bucket (a third each passkey, key-value, two-hop): hits/rows [95% Wilson interval] (answer tokens' "
               f"mean cross-entropy).\n\n{accuracy_table(res)}\n")
        if nll := nll_table(res):
            md += ("**Answer cross-entropy, paired over the same eval rows** (negative: lower CE than the reference; "
                   f"95% bootstrap interval over rows, 10,000 draws)\n\n{nll}\n")
    for name, svg in charts(res).items():
        (DOC.parent / f"long-context-{name}.svg").write_text(_styled(svg) + "\n")
        md += f"![{name}](long-context-{name}.svg)\n\n"
    text = DOC.read_text() if DOC.exists() else "# Long-context fine-tuning\n"
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    DOC.write_text(f"{head}{start}\n{md}{end}{rest.partition(end)[2]}")
