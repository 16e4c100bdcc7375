"""Out-of-distribution accuracy of every run of a `tunelab compare` directory, and of their base
model, on one eval set (default: `builtin:arith`'s `ood` split, 4-5-step problems):

    python bench/compare_ood.py runs/objectives --out bench/results/objectives-ood-<date>.json

Each run is scored exactly as `tunelab eval RUN --data DATA --num-examples N` scores it (same
loader, same generation settings from the run's config); the base model with the first run's
config and no training (with --base-only, nothing else). A rerun with the same --out scores only the runs it lacks. The JSON keeps each run's per-problem verdicts, so intervals and paired
comparisons can be computed from it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def score(cfg, model, tok, data: str, n: int) -> dict:
    from tunelab.training.evaluation import evaluate
    from tunelab.training.inputs import load_examples

    cfg.data.eval, cfg.eval.num_examples = data, n
    _, records, examples = load_examples(cfg, tok, say=lambda line: print(line, file=sys.stderr))
    res = evaluate(model, tok, records, examples, cfg)
    res["hits"] = [bool(s["correct"]) for s in res.pop("samples", [])]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("compare_dir", help="the --out of a tunelab compare (its runs/ holds the trained recipes)")
    ap.add_argument("--data", default="builtin:arith?n=200&split=ood")
    ap.add_argument("--num-examples", type=int, default=200)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base-only", action="store_true",
                    help="score only the base model (e.g. in-distribution, for a compare run with eval.before off)")
    a = ap.parse_args()
    from run import machine

    from tunelab import config as C
    from tunelab.models import load_model
    from tunelab.training.final import load_trained

    runs = sorted(p for p in (Path(a.compare_dir) / "runs").iterdir() if (p / "config.yaml").is_file())
    out = {"date": datetime.date.today().isoformat(), "command": "python bench/compare_ood.py " + " ".join(sys.argv[1:]),
           "data": a.data, "host": machine(), "runs": {}}
    done = json.loads(Path(a.out).read_text())["runs"] if Path(a.out).is_file() else {}
    out["runs"] = {k: v for k, v in done.items() if v.get("num_examples") == a.num_examples}  # a rerun continues
    cfg = C.load(runs[0] / "config.yaml")
    if "base" not in out["runs"]:
        out["runs"]["base"] = score(cfg, *load_model(cfg.model), a.data, a.num_examples)
        Path(a.out).write_text(json.dumps(out, indent=1))
    for run in [] if a.base_only else runs:
        if run.name in out["runs"]:
            continue
        cfg, model, tok, _ = load_trained(run)
        out["runs"][run.name] = score(cfg, model, tok, a.data, a.num_examples)
        print(f"{run.name}: {out['runs'][run.name]['accuracy']:.3f}", file=sys.stderr)
        Path(a.out).write_text(json.dumps(out, indent=1))
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
