"""The table of docs/results/side-effects.md, from committed JSON only: a `tunelab compare` over the kept
LoRA r=8, LoRA r=64 and full fine-tuning runs of bench/methods_table.sh (each with the forgetting, TuCo
and intruder diagnostics), and their OOD accuracy (bench/compare_ood.py).

    tunelab compare bench/results/methods-runs/{lora_r8,lora_r64,full} --out runs/side-effects
    cp runs/side-effects/compare.json bench/results/side-effects-compare-<date>.json
    python bench/side_effects.py bench/results/side-effects-compare-<date>.json bench/results/methods-ood.json

Prints one row per figure and one column per run; accuracies with 95% Wilson intervals.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives_docs import acc  # noqa: E402

SECTIONS = ("target", "forgetting", "tuco", "intruder")
SKIP = {"accuracy_before", "accuracy_change", "eval_loss_before", "eval_loss_change", "perplexity_before",
        "perplexity_after", "perplexity_change"}


def cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def main(compare: str, ood: str) -> None:
    c = json.loads(Path(compare).read_text())
    names = [r["name"] for r in c["runs"]]
    n = c["reference"]["eval.num_examples"]
    o = json.loads(Path(ood).read_text())["runs"]
    print("| figure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in c["rows"]:
        if row["section"] not in SECTIONS or row["figure"] in SKIP:
            continue
        if row["figure"] == "accuracy_after":
            print("| target: exact match, in-dist. | " + " | ".join(acc(v, n) for v in row["values"]) + " |")
            print("| target: exact match, OOD | " + " | ".join(
                acc(o[k]["accuracy"], o[k]["num_examples"]) if k in o else "-" for k in names) + " |")
            continue
        print(f"| {row['section']}: {row['figure']} | " + " | ".join(cell(v) for v in row["values"]) + " |")
    print("| intruder: lowest best-cosine of a top singular vector (matrix) | " +
          " | ".join(lowest_cosine(Path(r["dir"])) for r in c["runs"]) + " |")


def lowest_cosine(run: Path) -> str:
    """The matrix whose top singular vectors moved furthest from the base's (from its intruder.json)."""
    path = run / "diagnostics" / "intruder.json"
    if not path.is_file():
        return "-"
    table = json.loads(path.read_text())["details"]["per_matrix"]
    i, name = table["columns"].index("min_best_cos"), table["columns"].index("name")
    row = min(table["rows"], key=lambda r: r[i])
    return f"{row[i]:.3f} ({row[name].removeprefix('model.')})"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
