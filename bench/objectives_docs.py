"""The objectives table of docs/results/objectives.md, from committed JSON only: a `tunelab compare`
of the seven objectives (compare.json), some of the recipes at a second seed (compare.json, one or more), and the
out-of-distribution accuracy of the first comparison's runs (bench/compare_ood.py).

    python bench/objectives_docs.py bench/results/objectives-compare-<date>.json \
        bench/results/objectives-ood-<date>.json --seed1 "bf16=bench/results/objectives-compare-seed1-<date>.json"

Prints the markdown tables; accuracies get 95% Wilson intervals (n = the problems scored).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

NAMES = {"quickstart": "sft"}
"""Run name -> objective shown (the quickstart recipe is plain SFT)."""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def acc(p: float, n: int) -> str:
    k = round(p * n)
    lo, hi = wilson(k, n)
    return f"{p:.1%} [{lo:.1%}, {hi:.1%}]"


def figures(compare: dict) -> dict[str, dict]:
    """run name -> {figure: value} of a compare.json."""
    names = [r["name"] for r in compare["runs"]]
    out = {n: {} for n in names}
    for row in compare["rows"]:
        for n, v in zip(names, row["values"]):
            out[n][row["figure"]] = v
    return out


def main(seed0: str, ood: str | None, seed1: list[tuple[str, str]]) -> None:
    c0 = json.loads(Path(seed0).read_text())
    n = c0["reference"]["eval.num_examples"]
    f0 = figures(c0)
    more = [(label, figures(json.loads(Path(path).read_text()))) for label, path in seed1]
    o = json.loads(Path(ood).read_text())["runs"] if ood else {}
    base = next(iter(f0.values()))
    print("| objective | exact match, seed 0 | " + "".join(f"exact match, seed 1 ({label}) | " for label, _ in more) +
          "OOD exact match (seed 0) | held-out loss | step s | trained tokens / step | general probes retained | "
          "KL drift | TuCo (eval, median) |")
    print("|---|---|" + "---|" * len(more) + "---|---|---|---|---|---|---|")
    ob = o.get("base")
    print(f"| base (no training) | {acc(base['accuracy_before'], n)} | " + "— | " * len(more) +
          f"{acc(ob['accuracy'], ob['num_examples']) if ob else '—'} | {base['eval_loss_before']:.3f} | — | — | — | — | — |")
    for name, f in f0.items():
        again = "".join(f"{acc(f1[name]['accuracy_after'], n) if name in f1 else '—'} | " for _, f1 in more)
        od = o.get(name)
        print(f"| {NAMES.get(name, name)} | {acc(f['accuracy_after'], n)} | {again}"
              f"{acc(od['accuracy'], od['num_examples']) if od else '—'} | {f['eval_loss_after']:.3f} | {f['step_s']:.2f} | "
              f"{f['trained_tokens_per_step']:.0f} | {f['retained_accuracy']:.0%} of {f['num_probes_kept']:.0f} | "
              f"{f['kl_drift']:.3f} | {f['tuco_eval_median']:.3f} |")
    for label, f1 in more:
        print(f"\nSeed 1 ({label}) held-out loss: " +
              ", ".join(f"{NAMES.get(k, k)} {v['eval_loss_after']:.3f}" for k, v in f1.items()))


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed0", help="compare.json of the seven objectives")
    ap.add_argument("ood", nargs="?", help="bench/compare_ood.py's JSON for the seed-0 runs")
    ap.add_argument("--seed1", action="append", default=[], metavar="LABEL=JSON",
                    help="a second-seed compare.json, shown as its own column 'seed 1 (LABEL)' (repeatable)")
    a = ap.parse_args()
    main(a.seed0, a.ood, [tuple(s.split("=", 1)) for s in a.seed1])
