"""The tables of docs/results/data-methods.md from bench/results/data-methods-*.json (every figure
in that file comes from here): `python bench/data_methods.py --docs`."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def pct(x: dict) -> str:
    """`34.0% (17/50) [22.4, 48.1]`: accuracy, counts and the 95% Wilson interval."""
    lo, hi = x["wilson95"]
    return f"{100 * x['accuracy']:.1f}% ({x['hits']}/{x['n']}) [{100 * lo:.1f}, {100 * hi:.1f}]"


def measured(meta: dict) -> str:
    """One line: when, by which command, how long, on what CPU."""
    steps = meta.get("budget", {}).get("steps", "the recipe's")
    precision = (f"precision {meta['precision']}" if "precision" in meta else
                 "precision `auto`, its resolution not recorded")
    return (f"Measured {meta['date']} with `{meta['command']}` (train.steps {steps}, {precision}, "
            f"{meta['wall_s'] / 60:.0f} min wall on a shared {meta.get('cpu', '?')} with "
            f"{', '.join(meta.get('isa', []))}, {meta['threads']} thread{'s' if meta['threads'] != 1 else ''}, torch {meta.get('torch', '?')}).")


def tables(res: dict) -> list[str]:
    """Markdown tables of whatever comparison results are in `res` (by comparison name)."""
    out = []
    if "got_d" in res:
        r = res["got_d"]
        out += ["### GOT-D vs random selection", "", measured(r["meta"]), "", f"Pool `{r['setup']['pool']}`, target `{r['setup']['target']}`, "
                f"k = {r['setup']['k']}; scored on `{r['setup']['eval']}` (exact sentence).", "",
                "| selection | selected rows on target | accuracy [95% CI] | gold loss |", "|---|---|---|---|"]
        out += [f"| {a} | {100 * r[a]['selected_on_target']:.0f}% {r[a]['selected_by_domain']} | {pct(r[a])} | {r[a]['gold_loss']} |"
                for a in ("got_d", "random")]
    if "s3ft" in res:
        r = res["s3ft"]
        out += ["", "### S3FT vs SFT on gold", "", measured(r["meta"]), "", f"Train `{r['setup']['train']}`, judge `{r['setup']['judge']}`; scored on "
                f"`{r['setup']['eval']}`. S3FT targets: {r['s3ft']['provenance']}.", "",
                "| targets | accuracy [95% CI] | gold loss | KL drift | retained probes | conjugate retained |",
                "|---|---|---|---|---|---|"]
        for a in ("s3ft", "sft_gold"):
            f = r[a]["forgetting"]
            out.append(f"| {a} | {pct(r[a])} | {r[a]['gold_loss']} | {f['kl_drift']:.4f} | "
                       f"{100 * f['retained_accuracy']:.1f}% of {f['num_probes_kept']} | {100 * f['conjugate_tuned_accuracy']:.1f}% |")
    if "self_training" in res:
        r = res["self_training"]
        st, q = r["setup"]["steps"], r["pseudo_labels"]
        out += ["", "### Self-training vs labeled only", "", measured(r["meta"]), "", f"Labels `{r['setup']['labeled']}`, unlabeled pool "
                f"`{r['setup']['pool']}`: {q['kept']} of {q['pool']} pseudo-labels kept, {q['correct_among_kept']} of them "
                "right.", "", "| arm | optimizer steps | accuracy [95% CI] | gold loss |", "|---|---|---|---|",
                f"| self-training: labels; pseudo-labels (trained from the base); labels again | {st['supervised']} + {st['pretrain']} + "
                f"{st['finetune']} | {pct(r['self_training'])} | {r['self_training']['gold_loss']} |",
                f"| labeled only | {st['labeled_only']} | {pct(r['labeled_only'])} | {r['labeled_only']['gold_loss']} |",
                f"| (stage 1 of self-training: labeled only) | {st['supervised']} | {pct(r['after_stage_1'])} | "
                f"{r['after_stage_1']['gold_loss']} |"]
    if "edit_spans" in res:
        r = res["edit_spans"]
        tt = r["setup"]["target_tokens_per_example"]
        out += ["", "### Edit spans vs full targets", "", measured(r["meta"]), "", f"Train `{r['setup']['train']}`; target tokens per training example: "
                f"edit spans {tt['edits']:.1f}, full {tt['full']:.1f} ({100 * tt['edits'] / tt['full']:.0f}%).", "",
                "| targets | test accuracy [95% CI] | OOD accuracy [95% CI] | tokens generated (test) | gold loss (test) |",
                "|---|---|---|---|---|"]
        out += [f"| {a} | {pct(r[a]['test'])} | {pct(r[a]['ood'])} | {r[a]['test']['generated_tokens_mean']} | "
                f"{r[a]['test']['gold_loss']} |" for a in ("edit_spans", "full_targets")]
    return out


def write_docs() -> Path:
    """The tables of every bench/results/data-methods-*.json into docs/results/data-methods.md."""
    res = {p.stem.removeprefix("data-methods-"): json.loads(p.read_text())
           for p in sorted((HERE / "results").glob("data-methods-*.json"))}
    doc = ROOT / "docs" / "results" / "data-methods.md"
    text = doc.read_text()
    start, end = text.index("<!-- bench:start -->") + len("<!-- bench:start -->"), text.index("<!-- bench:end -->")
    doc.write_text(text[:start] + "\n" + "\n".join(tables(res)) + "\n" + text[end:])
    return doc
