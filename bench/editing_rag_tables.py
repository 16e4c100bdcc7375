"""The tables of docs/results/editing-and-rag.md, printed from the JSON that bench/editing_rag.py
wrote (every figure in the results file comes from here):

    python bench/editing_rag_tables.py [--results bench/results]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pct(x, ci=None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def retained(f: dict) -> str:
    from editing_rag import wilson  # bench/ is on the path when this file runs

    n = f["num_probes_kept"]
    return pct(f["retained_accuracy"], wilson(round(f["retained_accuracy"] * n), n)) if n else "-"


def recovery_svg(d: dict) -> str:
    """The patching recovery figure: the report's mechanisms chart from the committed JSON."""
    import re

    from tunelab.report.diagviews import mechanisms_view
    svg = re.search(r"<svg.*?</svg>", mechanisms_view(d), re.S).group(0)
    style = "<style>.axis{stroke:#444}.grid{stroke:#e5e5e5}text{font:11px sans-serif}</style>"
    return re.sub(r"(<svg[^>]*>)", lambda m: m.group(1) + style, svg, count=1)


def edit_rows(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        b, a, f = r["before"], r["after"], r["forgetting"]
        rows.append([r["name"], r["num_edits"], a["num_requests"], r["steps"], r["skipped_batches"],
                     f"{r['last_epoch_loss']:.3f}" if "last_epoch_loss" in r else "-",
                     f"{pct(b['reliability'])} -> {pct(a['reliability'], a.get('reliability_ci'))}",
                     f"{pct(b['generalization'])} -> {pct(a['generalization'], a.get('generalization_ci'))}",
                     pct(a["locality"], a.get("locality_ci")),
                     f"{retained(f)} of {f['num_probes_kept']}",
                     f"{f['kl_drift']:.4f}",
                     f"{r['seconds'] / 60:.1f}"])
    return table(["run", "edits", "scored", "steps", "skipped", "last epoch loss", "reliability (95% CI)",
                  "generalization", "locality", "general probes retained", "KL drift", "minutes"], rows)


def rag_tables(d: dict) -> str:
    head = (f"retrieval hit rate (the answer's document among the top {d['top_k']}): "
            f"{pct(d['retrieval_hit_rate'])} of {d['num_eval']} questions, {d['num_documents']} documents")
    main = table(["condition", "accuracy (95% Wilson)", "completeness", "precision"],
                 [[r[0], pct(r[1], r[2]), f"{r[3]:.3f}", f"{r[4]:.3f}"] for r in d["table"]["rows"]])
    diffs = table(["condition", "against", "metric", "difference", "95% paired bootstrap"],
                  [[r[0], r[1], r[2], f"{r[3]:+.3f}", f"[{r[4][0]:+.3f}, {r[4][1]:+.3f}]"]
                   for r in d.get("differences", {}).get("rows", [])])
    return "\n\n".join([head, main, diffs])


def mechanism_tables(d: dict) -> str:
    s = d["summary"]
    acc = table(["model", "entity-tracking accuracy (95% Wilson)"],
                [["base", pct(s["base_accuracy"], s.get("base_accuracy_ci"))],
                 ["tuned", pct(s["tuned_accuracy"], s.get("tuned_accuracy_ci"))],
                 [f"base + tuned top-{s['top_k']} heads", pct(s["patched_accuracy"], s.get("patched_accuracy_ci"))],
                 [f"tuned + base top-{s['top_k']} heads", pct(s["back_accuracy"], s.get("back_accuracy_ci"))]])
    rec = table(["k", "base with tuned top-k heads", "tuned with base top-k heads", "share of gap recovered"],
                [[r[0], pct(r[1]), pct(r[2]), "-" if r[3] is None else f"{r[3]:.2f}"]
                 for r in d["details"]["recovery"]["rows"]])
    top = table(["rank", "layer", "head", "score"], d["details"]["top_heads"]["rows"][:8])
    return "\n\n".join([f"{s['num_prompts']} prompts ({s['num_skipped']} skipped)", acc, rec, top])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--figure", type=Path, help="also write the recovery figure (SVG) here")
    a = ap.parse_args()
    if a.figure:
        a.figure.write_text(recovery_svg(json.loads((a.results / "editing-rag-mechanisms.json").read_text())))
    show = {"editing": lambda d: edit_rows(d["compare"]), "scale": lambda d: edit_rows(d["scale"]),
            "rag": rag_tables, "mechanisms": mechanism_tables,
            # the first measurement, under the raw template (kept: the file compares both protocols)
            "editing-raw-2026-12-05": lambda d: edit_rows(d["compare"]),
            "scale-raw-2026-12-05": lambda d: edit_rows(d["scale"])}
    for part, fn in show.items():
        path = a.results / f"editing-rag-{part}.json"
        if path.exists():
            d = json.loads(path.read_text())
            m = d["machine"]
            print(f"## {part} ({d['minutes']} min, {d['machine']['date']}, {m.get('cpu_model')}, "
                  f"precision auto = {m.get('precision_auto')})\n\n{fn(d)}\n")


if __name__ == "__main__":
    main()
