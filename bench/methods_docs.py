"""The methods table of docs/results/methods.md, from committed JSON only: a `tunelab compare` of the
method recipes (its compare.json, over the runs kept by bench/keep_runs.py), the out-of-distribution
accuracy of the same runs and of the base (bench/compare_ood.py), and the base model's in-distribution
accuracy (bench/compare_ood.py --base-only on the eval split).

    python bench/methods_docs.py bench/results/methods-compare-<date>.json \
        bench/results/methods-ood.json bench/results/methods-base-id.json \
        [--seed1 bench/results/methods-compare-seed1-<date>.json]

Prints the markdown table; accuracies get 95% Wilson intervals (n = the problems scored). With --seed1
(the compare.json of the rows trained again with train.seed=1), two more columns: their in-distribution
accuracy at seed 1, and both seeds pooled (2 x 200 answers, "—" for the rows not trained again); then,
for the rows with both seeds, which of them the two seeds rank (`ranked`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives_docs import acc, figures, wilson  # noqa: E402


def ranked(a: tuple[int, int], b: tuple[int, int], n: int) -> bool:
    """Does a (its correct answers at seeds 0 and 1, of n problems each) rank above b? Only when a is
    ahead at both seeds and the 95% Wilson intervals of the two seeds pooled (2n answers) are disjoint.
    The pooled interval counts each answer as independent; answers to the same problem at two seeds are
    correlated, so it is narrower than a problem-level one, hence also the both-seeds condition."""
    return a[0] > b[0] and a[1] > b[1] and wilson(sum(a), 2 * n)[0] > wilson(sum(b), 2 * n)[1]


def ranking(counts: dict[str, tuple[int, int]], n: int) -> list[str]:
    """One line per row (best pooled first): the rows it ranks above, and those it is not separated from."""
    order = sorted(counts, key=lambda r: -sum(counts[r]))
    lines = []
    for r in order:
        above = [s for s in order if ranked(counts[r], counts[s], n)]
        tied = [s for s in order if s != r and s not in above and not ranked(counts[s], counts[r], n)]
        lines.append(f"- {r} ({sum(counts[r]) / (2 * n):.1%}): above {', '.join(above) or 'none'}; "
                     f"not separated from {', '.join(tied) or 'none'}")
    return lines


def main(compare: str, ood: str, base_id: str, seed1: str | None = None) -> None:
    c = json.loads(Path(compare).read_text())
    n = c["reference"]["eval.num_examples"]
    f = figures(c)
    meta = {r["name"]: r for r in c["runs"]}
    o = json.loads(Path(ood).read_text())["runs"]
    b = json.loads(Path(base_id).read_text())["runs"]["base"]
    again = {}
    if seed1:
        c1 = json.loads(Path(seed1).read_text())
        if c1["reference"]["eval.num_examples"] != n:
            raise SystemExit(f"{seed1}: eval.num_examples {c1['reference']['eval.num_examples']}, not {n} as in {compare}")
        again = figures(c1)
    counts = {r: (round(f[r]["accuracy_after"] * n), round(again[r]["accuracy_after"] * n)) for r in again if r in f}

    def more(name: str) -> str:
        if not seed1:
            return ""
        if name not in counts:
            return " — | — |"
        return f" {acc(again[name]['accuracy_after'], n)} | {acc(sum(counts[name]) / (2 * n), 2 * n)} |"

    def scored(res: dict | None) -> str:
        return acc(res["accuracy"], res["num_examples"]) if res else "—"

    print("| method | lr | trainable params | exact match, in-dist. |" +
          (" in-dist., seed 1 | in-dist., both seeds |" if seed1 else "") +
          " exact match, OOD | held-out loss | step s | general probes retained | KL drift | TuCo (eval, median) |")
    print("|---|---|---|---|" + ("---|---|" if seed1 else "") + "---|---|---|---|---|---|")
    print(f"| base (no training) | — | 0 | {scored(b)} |" + (" — | — |" if seed1 else "") +
          f" {scored(o.get('base'))} | {b['eval_loss']:.3f} | — | — | — | — |")
    for name, g in f.items():
        m = meta[name]
        lr = yaml.safe_load((Path(m["dir"]) / "config.yaml").read_text())["train"]["lr"]  # the kept run's config
        print(f"| {name} | {lr:g} | {m['trainable_params']:,} | {acc(g['accuracy_after'], n)} |{more(name)} {scored(o.get(name))} "
              f"| {g['eval_loss_after']:.3f} | {g['step_s']:.2f} | {g['retained_accuracy']:.0%} of {g['num_probes_kept']:.0f} "
              f"| {g['kl_drift']:.3f} | {g['tuco_eval_median']:.3f} |")
    if counts:
        print(f"\nRanked by two seeds (ahead at both, pooled intervals disjoint; {len(counts)} rows with both):")
        print("\n".join(ranking(counts, n)))


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare", help="compare.json over the kept seed-0 runs")
    ap.add_argument("ood", help="bench/compare_ood.py's JSON for them")
    ap.add_argument("base_id", help="bench/compare_ood.py --base-only's JSON (base, in distribution)")
    ap.add_argument("--seed1", help="compare.json over the rows trained again with train.seed=1")
    a = ap.parse_args()
    main(a.compare, a.ood, a.base_id, a.seed1)
