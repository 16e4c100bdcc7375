"""The methods table of docs/results/methods.md, from committed JSON only: a `tunelab compare` of the
method recipes (its compare.json, over the runs kept by bench/keep_runs.py), the out-of-distribution
accuracy of the same runs and of the base (bench/compare_ood.py), and the base model's in-distribution
accuracy (bench/compare_ood.py --base-only on the eval split).

    python bench/methods_docs.py bench/results/methods-compare-<date>.json \
        bench/results/methods-ood.json bench/results/methods-base-id.json

Prints the markdown table; accuracies get 95% Wilson intervals (n = the problems scored).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives_docs import acc, figures  # noqa: E402


def main(compare: str, ood: str, base_id: str) -> None:
    c = json.loads(Path(compare).read_text())
    n = c["reference"]["eval.num_examples"]
    f = figures(c)
    meta = {r["name"]: r for r in c["runs"]}
    o = json.loads(Path(ood).read_text())["runs"]
    b = json.loads(Path(base_id).read_text())["runs"]["base"]

    def scored(res: dict | None) -> str:
        return acc(res["accuracy"], res["num_examples"]) if res else "—"

    print("| method | lr | trainable params | exact match, in-dist. | exact match, OOD | held-out loss | step s | "
          "general probes retained | KL drift | TuCo (eval, median) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| base (no training) | — | 0 | {scored(b)} | {scored(o.get('base'))} | {b['eval_loss']:.3f} "
          "| — | — | — | — |")
    for name, g in f.items():
        m = meta[name]
        lr = yaml.safe_load((Path(m["dir"]) / "config.yaml").read_text())["train"]["lr"]  # the kept run's config
        print(f"| {name} | {lr:g} | {m['trainable_params']:,} | {acc(g['accuracy_after'], n)} | {scored(o.get(name))} "
              f"| {g['eval_loss_after']:.3f} | {g['step_s']:.2f} | {g['retained_accuracy']:.0%} of {g['num_probes_kept']:.0f} "
              f"| {g['kl_drift']:.3f} | {g['tuco_eval_median']:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
