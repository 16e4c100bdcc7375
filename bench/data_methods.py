"""Data-centric methods against their natural baselines, on the same footing: the built-in
SmolLM2-135M-Instruct, the same LoRA, steps, batch, seed and evaluation rows within each pair.

    python bench/data_methods.py                      # all four comparisons, one after the other
    python bench/data_methods.py --only got_d,s3ft    # some of them (each writes its own JSON part)

  got_d          GOT-D selection vs random selection of the same k from the same pool
  s3ft           S3FT targets vs SFT on the gold targets (+ the forgetting diagnostic)
  self_training  pseudo-label self-training vs the few labels alone (same total steps)
  edit_spans     edit-span targets vs full targets (target tokens per example, accuracy, OOD)

Each method arm is its recipe in examples/recipes/ (run as a pipeline); each baseline is the same
recipe with the method's data stage taken out. Every arm is scored here by greedy generation on the
same held-out rows (bf16 autocast where the CPU has native bf16), with 95% Wilson intervals, and by
the teacher-forced loss of the gold answers. Raw results (every prediction) go to
bench/results/data-methods-<comparison>.json; docs/results/data-methods.md quotes them.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
RECIPES = ROOT / "examples" / "recipes"
RUNS = ROOT / "runs" / "data-methods"
NO_EVAL = {"eval": None}
SMOKE: dict = {}
"""--smoke MODEL_DIR: every recipe on a tiny model with 2 steps and 8-row data (checks the code paths)."""
BUDGETS = {
    "recipe": {},
    "small": {"steps": 12,
              "got_d": {"select": {"pool": "builtin:pool?n=400&on_target=0.1&target=typos", "k": 40}},
              "s3ft": {"relabel": {"input": "builtin:arith?n=48&split=train", "max_new_tokens": 96, "chunk": 16,
                                   "batch_size": 16},
                       "forgetting": {"num_prompts": 8, "num_probes": 16}},
              "self_training": {"label": {"input": "builtin:arith?n=96&split=train&seed=1&answers=false",
                                          "max_new_tokens": 48}},
              "edit_spans": {}},
}
"""--budget: `recipe` runs the recipes as written; `small` fits a shared 2-core CPU (every training
stage's steps scaled so the recipe's top-level steps become `steps`, smaller data-stage inputs)."""
BUDGET: dict = {}


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return [0.0, 1.0]
    p = hits / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def recipe(name: str, out: str) -> dict:
    """An example recipe as a dict: paths made absolute, in-run evaluation off (scored here), and
    its output under runs/data-methods/."""
    from tunelab import pipeline

    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    pipeline.spec._anchor(raw, RECIPES)
    raw["data"] = {**raw.get("data", {}), **NO_EVAL}
    for stage in raw["stages"]:
        if "data" in stage:
            stage["data"] = {**stage["data"], **NO_EVAL}
    raw["output"] = str(RUNS / out)
    return shrink(raw) if SMOKE else with_budget(raw, name)


def with_budget(raw: dict, name: str) -> dict:
    """The recipe at the chosen --budget: steps scaled, data stages' options and the forgetting
    diagnostic's sizes replaced."""
    if "steps" in BUDGET:
        top = raw["train"]["steps"]
        raw["train"] = {**raw["train"], "steps": BUDGET["steps"]}
        for s in raw["stages"]:
            if "steps" in s.get("train", {}):
                s["train"] = {**s["train"], "steps": max(1, round(s["train"]["steps"] * BUDGET["steps"] / top))}
    mine = BUDGET.get(name, {})
    for s in raw["stages"]:
        if s["name"] in mine:
            s["with"] = {**s["with"], **mine[s["name"]]}
    if "forgetting" in mine:
        raw["diagnostics"]["options"]["forgetting"] = {**raw["diagnostics"]["options"]["forgetting"], **mine["forgetting"]}
    return raw


def shrink(raw: dict) -> dict:
    import re
    text = yaml.safe_dump(raw)
    text = re.sub(r"\bn=\d+", "n=16", text)
    raw = yaml.safe_load(text)
    raw["model"] = {"name": SMOKE["model"]}
    raw["train"] = {**raw["train"], "steps": 2, "precision": "fp32"}
    for s in raw["stages"]:
        if "train" in s:
            s["train"] = {**s["train"], "steps": 2}
        if "with" in s:
            s["with"] = {**s["with"], **({"k": 8} if "k" in s["with"] else {}),
                         **({"max_new_tokens": 8} if "max_new_tokens" in s["with"] else {}),
                         **({"drop_unanswered": False} if "drop_unanswered" in s["with"] else {})}
    if "options" in raw.get("diagnostics", {}):
        raw["diagnostics"]["options"] = {"forgetting": {"num_prompts": 2, "num_probes": 4, "drift_tokens": 4, "answer_tokens": 4}}
    return raw


def run(raw: dict) -> Path:
    """Run a pipeline dict from scratch (an earlier attempt in its directory is removed)."""
    from tunelab import pipeline

    shutil.rmtree(raw["output"], ignore_errors=True)
    t0 = time.perf_counter()
    out = pipeline.run(raw)
    print(f"[bench] {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def without(raw: dict, stage: str, feed: dict) -> dict:
    """The recipe with data stage `stage` taken out and its consumers fed `feed` (data section) instead."""
    raw = copy.deepcopy(raw)
    raw["stages"] = [s for s in raw["stages"] if s["name"] != stage]
    for s in raw["stages"]:
        if s.get("data", {}).get("train") == f"@{stage}":
            s["data"] = {**s["data"], **feed}
    return raw


# ----------------------------------------------------------------------------- scoring

def score(run_dir: Path, records: list, check, max_new_tokens: int, batch_size: int = 25, gold: list | None = None) -> dict:
    """Greedy generation on `records` with the run's final model; `check(record, prediction)` says
    right or wrong. Also the mean teacher-forced loss of the gold answers (of `gold`, the same rows
    in the form this arm was trained on, when given)."""
    import tunelab
    from tunelab.data import encode, encode_prompt
    from tunelab.data.config import DataConfig
    from tunelab.eval.task import eval_loss, generate

    cfg, model, tok, _ = tunelab.load_run(run_dir)
    t0 = time.perf_counter()
    preds = generate(model, tok, [encode_prompt(r, tok) for r in records], max_new_tokens=max_new_tokens,
                     batch_size=batch_size, precision=cfg.train.precision)
    seconds = time.perf_counter() - t0
    hits = [bool(check(r, p)) for r, p in zip(records, preds)]
    loss = eval_loss(model, encode(gold or records, tok, DataConfig(max_length=256)), batch_size=batch_size,
                     pad_id=tok.pad_token_id, precision=cfg.train.precision)
    return {"accuracy": sum(hits) / len(hits), "hits": sum(hits), "n": len(hits), "wilson95": wilson(sum(hits), len(hits)),
            "gold_loss": round(loss, 4), "generation_s": round(seconds, 1),
            "generated_tokens_mean": round(sum(len(tok(p)["input_ids"]) for p in preds) / len(preds), 2),
            "predictions": [{"source": r.source, "prediction": p, "correct": h} for r, p, h in zip(records, preds, hits)]}


def arith_check(record, prediction: str) -> bool:
    from tunelab.eval.metrics import exact_match
    return exact_match(prediction, record.answer)


def sentence_check(record, prediction: str) -> bool:
    return " ".join(prediction.split()) == " ".join(record.answer.split())


def edits_check(record, prediction: str) -> bool:
    from tunelab.curate.edit_spans import apply_model_output
    return apply_model_output(record.meta["source_text"], prediction) == " ".join(record.answer.split())


def load(spec: str) -> list:
    from tunelab.data.builtin import load_builtin
    return load_builtin(spec)


def summary(scored: dict) -> dict:
    return {k: v for k, v in scored.items() if k != "predictions"}


# ----------------------------------------------------------------------------- the comparisons

def got_d(n_eval: int) -> dict:
    method = recipe("got_d", "got_d")
    sel = method["stages"][0]["with"]
    baseline = copy.deepcopy(method)
    baseline["output"] = str(RUNS / "random")
    baseline["stages"][0] = {"name": "select", "dataset": "random", "with": {"pool": sel["pool"], "k": sel["k"], "seed": 0}}
    test = load(f"builtin:typos?n={n_eval}&split=test")
    pool = load(sel["pool"])
    out = {"setup": {"pool": sel["pool"], "target": sel["target"], "k": sel["k"], "eval": f"builtin:typos?n={n_eval}&split=test",
                     "recipe": "examples/recipes/got_d.yaml"}}
    for arm, raw in (("got_d", method), ("random", baseline)):
        run_dir = run(raw)
        rows = [json.loads(x) for x in (run_dir / "stages/select/data.jsonl").read_text().splitlines()]
        picked = [pool[r["provenance"]["index"]].meta["domain"] for r in rows]
        out[arm] = {"selected_on_target": sum(d == "typos" for d in picked) / len(picked),
                    "selected_by_domain": {d: picked.count(d) for d in sorted(set(picked))},
                    **score(run_dir, test, sentence_check, 48)}
    return out


def s3ft(n_eval: int) -> dict:
    method = recipe("s3ft", "s3ft")
    relabel = method["stages"][0]["with"]
    baseline = without(method, "relabel", {"train": relabel["input"]})
    baseline["output"] = str(RUNS / "sft_gold")
    test = load(f"builtin:arith?n={n_eval}&split=test")
    out = {"setup": {"train": relabel["input"], "judge": relabel["judge"], "eval": f"builtin:arith?n={n_eval}&split=test",
                     "recipe": "examples/recipes/s3ft.yaml"}}
    for arm, raw in (("s3ft", method), ("sft_gold", baseline)):
        run_dir = run(raw)
        tune = run_dir / "stages/tune"
        forgetting = json.loads((tune / "diagnostics/forgetting.json").read_text())["summary"]
        out[arm] = {"forgetting": forgetting, **score(run_dir, test, arith_check, 64)}
        if arm == "s3ft":
            out[arm]["provenance"] = json.loads((run_dir / "stages/relabel/stage.json").read_text())["summary"]["kinds"]
    return out


def self_training(n_eval: int) -> dict:
    method = recipe("self_training", "self_training")
    by_name = {s["name"]: s for s in method["stages"]}
    steps = [by_name[s].get("train", {}).get("steps", method["train"]["steps"]) for s in ("supervised", "pretrain", "finetune")]
    baseline = {**{k: v for k, v in method.items() if k != "stages"}, "output": str(RUNS / "labeled_only"),
                "stages": [{"name": "labeled", "data": {**by_name["supervised"]["data"]}, "train": {"steps": sum(steps)}}]}
    test = load(f"builtin:arith?n={n_eval}&split=test")
    out = {"setup": {"labeled": by_name["supervised"]["data"]["train"], "pool": by_name["label"]["with"]["input"],
                     "steps": {"supervised": steps[0], "pretrain": steps[1], "finetune": steps[2], "labeled_only": sum(steps)},
                     "eval": f"builtin:arith?n={n_eval}&split=test", "recipe": "examples/recipes/self_training.yaml"}}
    run_dir = run(method)
    out["self_training"] = score(run_dir, test, arith_check, 64)
    out["after_stage_1"] = summary(score(run_dir / "stages/supervised", test, arith_check, 64))
    out["pseudo_labels"] = pseudo_label_quality(run_dir, by_name["label"]["with"]["input"])
    out["labeled_only"] = score(run(baseline), test, arith_check, 64)
    return out


def pseudo_label_quality(run_dir: Path, pool_spec: str) -> dict:
    """How many pseudo-labels are right (against the pool's hidden answers) and how many were kept."""
    gold = {r.source: r.answer for r in load(pool_spec.replace("&answers=false", ""))}
    rows = [json.loads(x) for x in (run_dir / "stages/label/data.jsonl").read_text().splitlines()]
    right = sum(r.get("answer") == gold[r["provenance"]["source"]] for r in rows)
    return {"pool": len(gold), "kept": len(rows), "correct_among_kept": right}


def edit_spans(n_eval: int) -> dict:
    from tunelab.curate.edit_spans import extract, format_edits
    from tunelab.models import load_tokenizer
    from tunelab.models.config import ModelConfig

    method = recipe("edit_spans", "edit_spans")
    train_spec = method["stages"][0]["with"]["input"]
    baseline = without(method, "edits", {"train": train_spec})
    baseline["stages"] = [s for s in baseline["stages"] if s["name"] != "edits_test"]
    baseline["output"] = str(RUNS / "full_targets")
    tok = load_tokenizer(ModelConfig(name=SMOKE.get("model", "smollm2-135m")))
    train = load(train_spec)
    full = [len(tok(r.answer, add_special_tokens=False)["input_ids"]) for r in train]
    edits = [len(tok(format_edits(extract(r.meta["source_text"], r.answer)), add_special_tokens=False)["input_ids"]) for r in train]
    out = {"setup": {"train": train_spec, "recipe": "examples/recipes/edit_spans.yaml",
                     "target_tokens_per_example": {"full": sum(full) / len(full), "edits": sum(edits) / len(edits)}}}
    splits = {"test": load(f"builtin:typos?n={n_eval}&split=test"), "ood": load(f"builtin:typos?n={n_eval}&split=ood")}
    for arm, raw, check in (("edit_spans", method, edits_check), ("full_targets", baseline, sentence_check)):
        run_dir = run(raw)
        out[arm] = {split: score(run_dir, recs, check, 48, gold=as_edits(recs) if arm == "edit_spans" else None)
                    for split, recs in splits.items()}
    return out


def as_edits(records: list) -> list:
    """The rows with their target written as edit spans (what the edit-span arm is trained to write)."""
    from tunelab.curate.edit_spans import extract, format_edits
    from tunelab.data.records import Record

    return [Record(messages=r.messages[:-1] + [{"role": "assistant", "content": format_edits(extract(
        r.meta["source_text"], r.answer))}], source=r.source) for r in records]


COMPARISONS = {"got_d": got_d, "s3ft": s3ft, "self_training": self_training, "edit_spans": edit_spans}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(COMPARISONS), help="comma-separated: " + ", ".join(COMPARISONS))
    ap.add_argument("--num-eval", type=int, default=100, help="held-out rows scored per arm and split")
    ap.add_argument("--budget", choices=list(BUDGETS), default="recipe", help="recipe: the recipes as written; "
                    "small: fewer steps and smaller data stages (for a shared 2-core CPU)")
    ap.add_argument("--smoke", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--docs", action="store_true", help="only write the tables of the results there are into "
                    "docs/results/data-methods.md")
    a = ap.parse_args()
    if a.docs:
        from data_methods_docs import write_docs
        print(f"wrote {write_docs()}")
        return
    if a.smoke:
        global RUNS
        SMOKE["model"], RUNS = a.smoke, ROOT / "runs" / "data-methods-smoke"
    import torch

    from tunelab.run.device import cpu_isa, cpu_model, resolve_precision

    BUDGET.update(BUDGETS[a.budget])
    for name in a.only.split(","):
        t0 = time.perf_counter()
        res = COMPARISONS[name](a.num_eval)
        res["meta"] = {"comparison": name, "date": datetime.date.today().isoformat(), "model": "smollm2-135m",
                       "num_eval": a.num_eval, "wall_s": round(time.perf_counter() - t0), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "machine": platform.machine(),
                       "command": f"python bench/data_methods.py --only {name} --num-eval {a.num_eval} --budget {a.budget}",
                       "budget": {"name": a.budget, **BUDGETS[a.budget]}, "cpu": cpu_model(), "isa": cpu_isa(),
                       "precision": resolve_precision("fp32" if a.smoke else "auto", torch.device("cpu")),
                       "note": "timings on a shared 2-core machine (other sessions were running)"}
        path = HERE / "results" / f"data-methods-{name}.json" if not a.smoke else RUNS / f"{name}.json"
        path.write_text(json.dumps(res, indent=1))
        print(f"[bench] wrote {path}", flush=True)


if __name__ == "__main__":
    main()
