"""The methods table of docs/results/methods.md, from committed JSON only: a `tunelab compare` of the
method recipes (its compare.json, over the runs kept by bench/keep_runs.py), the out-of-distribution
accuracy of the same runs and of the base (bench/compare_ood.py), and the base model's in-distribution
accuracy (bench/compare_ood.py --base-only on the eval split).

    python bench/methods_docs.py bench/results/methods-compare-<date>.json \
        bench/results/methods-ood.json bench/results/methods-base-id.json \
        [--seed1 bench/results/methods-compare-seed1-<date>.json]

Prints the markdown table; accuracies get 95% Wilson intervals (n = the problems scored). With --seed1
(the compare.json of the rows trained again with train.seed=1), a column of their in-distribution
accuracy, "—" for the rows not trained again.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives_docs import acc, figures  # noqa: E402


def main(compare: str, ood: str, base_id: str, seed1: str | None = None) -> None:
    c = json.loads(Path(compare).read_text())
    n = c["reference"]["eval.num_examples"]
    f = figures(c)
    meta = {r["name"]: r for r in c["runs"]}
    o = json.loads(Path(ood).read_text())["runs"]
    b = json.loads(Path(base_id).read_text())["runs"]["base"]
    again = figures(json.loads(Path(seed1).read_text())) if seed1 else None
    col = (lambda name: f" {acc(again[name]['accuracy_after'], n) if name in again else '—'} |") if again else (lambda name: "")

    def scored(res: dict | None) -> str:
        return acc(res["accuracy"], res["num_examples"]) if res else "—"

    print("| method | lr | trainable params | exact match, in-dist. |" + (" in-dist., seed 1 |" if again else "") +
          " exact match, OOD | held-out loss | step s | general probes retained | KL drift | TuCo (eval, median) |")
    print("|---|---|---|---|" + ("---|" if again else "") + "---|---|---|---|---|---|")
    print(f"| base (no training) | — | 0 | {scored(b)} |" + (" — |" if again else "") +
          f" {scored(o.get('base'))} | {b['eval_loss']:.3f} | — | — | — | — |")
    for name, g in f.items():
        m = meta[name]
        lr = yaml.safe_load((Path(m["dir"]) / "config.yaml").read_text())["train"]["lr"]  # the kept run's config
        print(f"| {name} | {lr:g} | {m['trainable_params']:,} | {acc(g['accuracy_after'], n)} |{col(name)} {scored(o.get(name))} "
              f"| {g['eval_loss_after']:.3f} | {g['step_s']:.2f} | {g['retained_accuracy']:.0%} of {g['num_probes_kept']:.0f} "
              f"| {g['kl_drift']:.3f} | {g['tuco_eval_median']:.3f} |")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare", help="compare.json over the kept seed-0 runs")
    ap.add_argument("ood", help="bench/compare_ood.py's JSON for them")
    ap.add_argument("base_id", help="bench/compare_ood.py --base-only's JSON (base, in distribution)")
    ap.add_argument("--seed1", help="compare.json over the rows trained again with train.seed=1")
    a = ap.parse_args()
    main(a.compare, a.ood, a.base_id, a.seed1)
