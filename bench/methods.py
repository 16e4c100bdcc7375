"""Every parameterization method on the same footing: SmolLM2-135M, `builtin:arith`, the same
steps, batch, seed and evaluation; each method's own options and learning rate come from its
example recipe (examples/methods/<name>.yaml; LoRA and full fine-tuning are defined here).

    python bench/methods.py [--steps N] [--num-eval N] [--only a,b]   (1-3 min per method on 2 CPU cores)
    python bench/methods.py --docs-from bench/results/methods-<machine>-<date>.json   (table only)

Each method runs in its own process (its own peak memory). Writes bench/results/methods-<machine>-
<date>.json and the table into docs/results/methods.md (between the bench markers). The runs stay
in runs/methods/<row>/ (docs/results/side-effects.md reuses the LoRA and full ones).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRAIN = "builtin:arith?n=2000&split=train"
SPLITS = {"in_dist": "builtin:arith?n=200&split=test", "ood": "builtin:arith?n=200&split=ood"}
BUILTIN_ROWS = {  # row -> (method section, lr)
    "full": ({"name": "full"}, 1e-4),
    "lora-r8": ({"name": "lora", "r": 8, "alpha": 16}, 1e-3),
    "lora-r64": ({"name": "lora", "r": 64, "alpha": 128}, 1e-3),
}

STEP_SCALED = {"full_ft_steps": 0.5, "num_decay_steps": 1.0}
"""Method options measured in steps, as a share of the run (the recipes assume 40 steps)."""


def rows() -> dict[str, tuple[dict, float]]:
    import yaml

    out = dict(BUILTIN_ROWS)
    for path in sorted((ROOT / "examples" / "methods").glob("*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        out[path.stem] = (recipe["method"], float(recipe.get("train", {}).get("lr", 1e-3)))
    return out


def run_one(name: str, steps: int, num_eval: int) -> dict:
    """Train one row and evaluate it in- and out-of-distribution (runs in a child process)."""
    import tunelab
    from tunelab.data import load_records
    from tunelab.eval.task import answer_accuracy

    method, lr = rows()[name]
    out = ROOT / "runs" / "methods" / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: an earlier attempt must not be resumed
    for key, share in STEP_SCALED.items():  # options counted in steps follow the shared budget
        if key in method:
            method = method | {key: max(1, int(share * steps))}
    run = tunelab.train({
        "model": {"name": "smollm2-135m"},
        "data": {"train": TRAIN, "eval": SPLITS["in_dist"], "max_length": 256},
        "method": method,
        "train": {"steps": steps, "micro_batch_size": 8, "lr": lr, "warmup_steps": 2, "seed": 0,
                  "save_every": 0, "progress": False},
        "eval": {"before": False, "num_examples": num_eval, "max_new_tokens": 48, "batch_size": 32},
        "diagnostics": {"after_train": []},
        "output": str(out),
    })
    cfg, model, tok, _ = tunelab.load_run(run)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    setup = next(x for x in lines if x["kind"] == "setup")
    train = [x for x in lines if x["kind"] == "train"]
    res = {"row": name, "method": method["name"], "lr": lr, "steps": steps,
           "trainable_params": setup["trainable_params"], "total_params": setup["total_params"],
           "step_s_median": statistics.median(x["step_s"] for x in train[2:] or train),
           "final_loss": statistics.mean(x["loss"] for x in train[-3:]),
           "optimizer_state_bytes": train[-1].get("optimizer_state_bytes")}
    after = json.loads((run / "eval.json").read_text())["after"]  # the run's own evaluation
    res["in_dist_accuracy"], res["eval_loss"] = after["accuracy"], after["eval_loss"]
    res["ood_accuracy"] = answer_accuracy(model, tok, load_records(SPLITS["ood"], cfg.data), cfg.eval)["accuracy"]
    res["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def base_row(num_eval: int) -> dict:
    from tunelab.data import load_records
    from tunelab.data.config import DataConfig
    from tunelab.eval.config import EvalConfig
    from tunelab.eval.task import answer_accuracy
    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig

    model, tok = load_model(ModelConfig(name="smollm2-135m"))
    ev = EvalConfig(num_examples=num_eval, max_new_tokens=48, batch_size=32)
    res = {"row": "base (no training)", "method": "-", "trainable_params": 0}
    for split, spec in SPLITS.items():
        res[f"{split}_accuracy"] = answer_accuracy(model.eval(), tok, load_records(spec, DataConfig()), ev)["accuracy"]
    return res


def child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, TQDM_DISABLE="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"row": args[1], "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:200]}
    return json.loads(lines[-1])


def markdown(res: dict) -> str:
    head = (f"SmolLM2-135M-Instruct, `{TRAIN}`, {res['steps']} steps x 8 examples, seed 0, on {res['machine']}; "
            f"exact match on {res['num_eval']} held-out (`split=test`) and {res['num_eval']} out-of-distribution "
            f"(`split=ood`) problems; {res['date']}; command `{res['command']}`; {res['minutes']:.0f} min"
            f"{'' if res.get('complete') else ' so far (run not finished: rows still missing)'}.\n\n"
            "| method | lr | trainable params | in-dist. exact match | OOD exact match | held-out loss "
            "| step s (median) | peak RSS MB | train loss (last 3) |\n|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in res["rows"]:
        if "error" in r:
            body.append(f"| {r['row']} | failed: {r['error']} | | | | | | | |")
            continue
        fmt = lambda k, f: format(r[k], f) if k in r else "-"  # noqa: E731
        body.append(f"| {r['row']} | {fmt('lr', 'g')} | {r['trainable_params']:,} | {fmt('in_dist_accuracy', '.1%')} "
                    f"| {fmt('ood_accuracy', '.1%')} | {fmt('eval_loss', '.4f')} | {fmt('step_s_median', '.2f')} "
                    f"| {fmt('peak_memory_mb', '.0f')} "
                    f"| {fmt('final_loss', '.3f')} |")
    return head + "\n".join(body) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--num-eval", type=int, default=24)
    ap.add_argument("--only", default="")
    ap.add_argument("--docs-from", metavar="JSON", help="only rewrite docs/results/methods.md from a results file")
    a = ap.parse_args()
    from report import write_docs

    if a.docs_from:
        write_docs(markdown(json.loads(Path(a.docs_from).read_text())), ROOT / "docs" / "results" / "methods.md")
        return

    names = [n for n in rows() if not a.only or n in a.only.split(",")]
    t0 = time.perf_counter()
    res = {"date": datetime.date.today().isoformat(), "machine": f"cpu{os.cpu_count()}", "steps": a.steps,
           "num_eval": a.num_eval, "command": f"python bench/methods.py --steps {a.steps} --num-eval {a.num_eval}",
           "rows": []}
    out = HERE / "results" / f"methods-{res['machine']}-{res['date']}.json"
    for i, (kind, name) in enumerate([("base", "-")] + [("one", n) for n in names]):
        print(f"methods: {name if kind == 'one' else 'base (no training)'}", flush=True)
        args = [kind, name, str(a.steps), str(a.num_eval)] if kind == "one" else [kind, name, str(a.num_eval)]
        res["rows"].append(child(args))
        print(json.dumps(res["rows"][-1]), flush=True)
        res["minutes"] = (time.perf_counter() - t0) / 60
        res["complete"] = i == len(names)
        out.write_text(json.dumps(res, indent=1))  # after every row: a cut-off run keeps what it measured
        write_docs(markdown(res), ROOT / "docs" / "results" / "methods.md")
    print(markdown(res))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    if len(sys.argv) > 1 and sys.argv[1] in ("one", "base"):
        kind, name, *rest = sys.argv[1:]
        r = run_one(name, int(rest[0]), int(rest[1])) if kind == "one" else base_row(int(rest[0]))
        print(json.dumps(r))
    else:
        main()
