"""Tables and inline-SVG charts of bench/long_context.py's results, written into
docs/results/long-context.md (between the bench markers) and docs/results/long-context-*.svg."""
from __future__ import annotations

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
    for title, key, spec in (("step time, s", "step_s", ".1f"), ("activations saved for backward, MiB",
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


def accuracy_table(res: dict) -> str:
    rows = [x for x in res["accuracy"] if "buckets" in x]
    buckets = sorted({int(b) for x in rows for b in x["buckets"]})
    head = ("| model | " + " | ".join(f"{b:,}" for b in buckets) + " | answer CE (mean) | train step s (median) "
            "| train loss (last 4) |\n|---|" + "---|" * (len(buckets) + 3) + "\n")
    body = []
    for x in rows:
        acc = [x["buckets"].get(str(b), {}) for b in buckets]
        nll = sum(a["answer_nll"] for a in acc if a) / max(sum(1 for a in acc if a), 1)
        body.append(f"| {NAMES.get(x['row'], x['row'])} | " + " | ".join(
            f"{a['accuracy']:.0%} ({a['answer_nll']:.2f})" if a else "-" for a in acc) +
            f" | {nll:.2f} | {_fmt(x.get('step_s_median'), '.0f')} | {_fmt(x.get('final_loss'), '.3f')} |")
    failed = [f"| {NAMES.get(x['row'], x['row'])} | failed: {x['error'][:120]} |" for x in res["accuracy"] if "error" in x]
    return head + "\n".join(body + failed) + "\n"


def charts(res: dict) -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from tunelab.report.svg import Series, line_chart

    def series(key):
        return [Series(name=NAMES[r], points=sorted((p["length"], p[key]) for p in res["curve"]
                                                    if p["row"] == r and key in p)) for r in NAMES if r != "before"]
    out = {"time": line_chart(series("step_s"), title="Step time against sequence length", x_label="tokens",
                              y_label="seconds per step"),
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
    return out


def write(res: dict, sources: list[Path]) -> None:
    raw = ", ".join(f"`{p.resolve().relative_to(ROOT)}`" for p in sources)
    md = (f"Measured {res['date']} on {res['machine']} (2 cores shared with other sessions, which were running: "
          f"timings are noisy), {res.get('minutes', 0):.0f} min; command `{res['command']}`; raw results {raw}.\n\n")
    if res["curve"]:
        md += f"### Step time and memory against sequence length\n\n{curve_table(res)}\n"
    if res["accuracy"]:
        md += ("### Accuracy by context length\n\nExact answer (greedy, teacher-forced) on 6 held-out rows per bucket "
               "(2 passkey, 2 key-value, 2 two-hop); in brackets the answer tokens' mean cross-entropy.\n\n"
               f"{accuracy_table(res)}\n")
    for name, svg in charts(res).items():
        (DOC.parent / f"long-context-{name}.svg").write_text(svg + "\n")
        md += f"![{name}](long-context-{name}.svg)\n\n"
    text = DOC.read_text() if DOC.exists() else "# Long-context fine-tuning\n"
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    DOC.write_text(f"{head}{start}\n{md}{end}{rest.partition(end)[2]}")
