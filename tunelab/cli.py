"""The command line. Each command is a small function; heavy imports happen inside them."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_train(a) -> int:
    from tunelab.run.dist import launched_by_torchrun, torchrun_command

    if a.nproc is not None and a.nproc < 1:
        from tunelab.errors import TunelabError
        raise TunelabError(f"--nproc: must be >= 1, got {a.nproc}")
    if a.nproc is not None and not launched_by_torchrun():  # a convenience: torchrun does the launching
        import os
        import subprocess
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // a.nproc))
        cmd = torchrun_command(a.nproc, ["train", a.config, *a.overrides])
        return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=threads)).returncode
    from tunelab.api import train
    from tunelab.run.dist import leave
    try:
        run_dir = train(a.config, *a.overrides)
    finally:
        leave()  # the process group of a torchrun launch (none otherwise)
    if os_rank() == 0:
        print(f"run directory: {run_dir}")
    return 0


def cmd_federate(a) -> None:
    from tunelab import config as C
    from tunelab.federated.flower.launch import federate

    cfg = C.load(a.config, a.overrides)
    print(f"run directory: {federate(cfg)}")


def os_rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    import os
    return int(os.environ.get("RANK", "0"))


def cmd_eval(a) -> None:
    import os

    from tunelab.errors import TunelabError
    from tunelab.training.evaluation import evaluate
    from tunelab.training.final import load_trained
    from tunelab.training.inputs import load_examples

    if a.num_examples is not None and a.num_examples < 1:
        raise TunelabError(f"--num-examples: must be >= 1, got {a.num_examples}")
    cfg, model, tok, _ = load_trained(a.run)
    if a.num_examples is not None:
        cfg.eval.num_examples = a.num_examples
    if a.data is not None:
        cfg.data.eval = a.data if a.data.startswith("builtin:") else os.path.abspath(a.data)
    _, records, examples = load_examples(cfg, tok, say=lambda line: print(line, file=sys.stderr))
    if not records:
        raise TunelabError(f"{a.run} has no eval data (data.eval: null, or data.eval_fraction=0); "
                           "evaluate it on a file with --data FILE")
    res = evaluate(model, tok, records, examples, cfg)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))


def cmd_diagnose(a) -> None:
    from tunelab.diagnostics import run_diagnostics
    results = run_diagnostics(a.run, only=a.only)
    if not results:
        print(f"no diagnostic applies to {a.run}; name one with --only")
        return
    print(f"wrote {len(results)} diagnostics to {a.run}/diagnostics/: {', '.join(results)}")


def cmd_edit(a) -> None:
    from tunelab.editing import edit, load_config
    sweep = [int(x) for x in a.sweep.split(",")] if a.sweep else None
    cfg = load_config(a.config, a.overrides, model=a.model, layer=a.layer, schedule=a.schedule, output=a.out,
                      sweep=sweep)
    out = edit(a.requests, cfg)
    print(f"run directory: {out} (edit.json: the figures; general ability: tunelab diagnose {out} --only forgetting)")


def cmd_report(a) -> None:
    from tunelab.report import write_report
    print(f"wrote {write_report(a.run)}")


def cmd_compare(a) -> None:
    from tunelab.api import compare
    from tunelab.report import text_table
    comparison, html, js, md = compare(a.targets, a.out, a.set, allow_mismatch=a.allow_mismatch)
    print(text_table(comparison))
    print(f"wrote {html}, {md} and {js}")


def cmd_generate(a) -> None:
    import torch

    from tunelab.data.records import Record
    from tunelab.data import encode_prompt
    from tunelab.eval.task import generate
    from tunelab.run.device import resolve_precision
    from tunelab.training.final import load_trained

    cfg, model, tok, _ = load_trained(a.run)
    rec = Record(messages=[{"role": "user", "content": a.prompt}, {"role": "assistant", "content": "."}])
    precision = resolve_precision(cfg.train.precision, torch.device("cpu")) if a.precision == "run" else a.precision
    why = "the run's train.precision" if a.precision == "run" else (
        "the exported model's, as AutoModelForCausalLM loads it" if precision == "fp32" else "--precision")
    print(f"generate: greedy, {precision} ({why})", file=sys.stderr)
    print(generate(model, tok, [encode_prompt(rec, tok)], max_new_tokens=a.max_new_tokens, batch_size=1,
                   precision=precision)[0])


def cmd_export(a) -> None:
    from tunelab.export import export
    print(f"wrote {export(a.run, a.out, merge=a.merge)}")


def cmd_data_check(a) -> None:
    from tunelab.data.check import check_data
    from tunelab.data.config import DataConfig
    from tunelab.models import load_tokenizer
    from tunelab.models.config import ModelConfig

    from tunelab.errors import DataError, TunelabError

    tok = load_tokenizer(ModelConfig(name=a.model))
    cfg = DataConfig(format=a.format, max_length=a.max_length, train_on_prompt=a.train_on_prompt)
    try:
        print(check_data(a.path, tok, cfg, list_all=a.all))
    except DataError as e:
        if e.line is None:  # not a row's fault (a missing file, an unknown format)
            raise
        raise TunelabError(f"{e}\n(the first bad row; `tunelab data check {a.path} --all` lists every one)") from None


DATA_STAGE_INPUT = {"select": "pool", "relabel": "input", "edits": "input", "mix": "input"}
"""The option of each `tunelab data VERB` stage that its positional INPUT sets."""
DATA_STAGE_DEFAULT = {"select": "got_d", "edits": "edit_spans", "mix": "task_mix"}


def cmd_data_stage(a) -> None:
    """`tunelab data select|relabel|edits|mix INPUT --out FILE`: one data stage, as in a pipeline."""
    import shutil
    from pathlib import Path

    from tunelab.config import parse_override, set_path
    from tunelab.curate import Workspace, build_stage, run_stage
    from tunelab.errors import TunelabError

    name = a.method or DATA_STAGE_DEFAULT.get(a.data_cmd)
    if name is None:
        raise TunelabError(f"tunelab data {a.data_cmd}: name the stage with --method (s3ft or pseudo_label)")
    options: dict = {}
    for keys, value in map(parse_override, a.set):  # nested keys: --set tasks.solve=FILE
        set_path(options, keys, value)
    options.update({k: v for k, v in (("k", getattr(a, "k", None)), ("target", getattr(a, "target", None)),
                                      ("judge", getattr(a, "judge", None)), ("seed", getattr(a, "seed", None)))
                    if v is not None})
    if a.input is not None:
        options[DATA_STAGE_INPUT[a.data_cmd]] = a.input
    stage = build_stage(name, options, verb=a.data_cmd)
    out = Path(a.out)
    work = out.parent / f".{out.name}.work"  # resumable progress of long generation, gone when done
    ws = Workspace(model_name=a.model, work_dir=work, precision=a.precision)
    if stage.uses_model and a.model and (Path(a.model) / "config.yaml").is_file():  # a trained run
        from tunelab.training.final import load_trained
        _, model, tok, method = load_trained(a.model)
        ws.loaded = (method.merge(model).eval(), tok)
    summary = run_stage(stage, ws, out)
    shutil.rmtree(work, ignore_errors=True)
    kinds = ", ".join(f"{k} {n}" for k, n in summary["kinds"].items())
    print(f"wrote {summary['rows']} rows to {out} ({name}: {kinds}); check them with `tunelab data check {out}`")


def cmd_models_pull(a) -> None:
    from tunelab.models import pull
    print(f"{a.name}: {pull(a.name)}")


def cmd_models_list(a) -> None:
    from tunelab.models import BUILTIN_MODELS
    for name, spec in BUILTIN_MODELS.items():
        print(f"{name:16s} {getattr(spec, 'description', '')}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tune LLMs: one YAML, one command.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config, or resume a run directory")
    t.add_argument("config", help="a YAML config file, or an existing run directory to resume")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=50 output=runs/x")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes of this machine: runs `torchrun --standalone --nproc-per-node N "
                        "-m tunelab train ...` (for several machines, run torchrun yourself; see the README)")
    t.set_defaults(fn=cmd_train)
    fd = sub.add_parser("federate", help="federated fine-tuning (FedKSeed or FedAvg of adapters) on Flower: a "
                        "SuperLink and federated.num_clients SuperNodes on this machine")
    fd.add_argument("config", help="a YAML config with a `federated` section")
    fd.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. federated.rounds=5")
    fd.set_defaults(fn=cmd_federate)
    e = sub.add_parser("eval", help="task metrics of a trained run on its eval data")
    e.add_argument("run")
    e.add_argument("--num-examples", type=int, default=None, help="score the first N eval examples (N >= 1)")
    e.add_argument("--data", metavar="FILE", help="evaluate on this file (or builtin:NAME?...) instead of the "
                   "run's eval data")
    e.set_defaults(fn=cmd_eval)
    dg = sub.add_parser("diagnose", help="side effects of a trained run: forgetting, knowledge, tuco, intruder")
    dg.add_argument("run")
    dg.add_argument("--only", nargs="+", metavar="NAME", help="run only these diagnostics (default: the run "
                    "config's diagnostics.after_train if it names any, else the cheap ones that fit its data)")
    dg.set_defaults(fn=cmd_diagnose)
    ed = sub.add_parser("edit", help="edit a model with requests (LocFT-BF: one module, breadth-first) and "
                        "score reliability, generalization and locality")
    ed.add_argument("requests", help="a JSONL/JSON/CSV of {prompt, target, rephrase?, locality?}, or "
                    "builtin:facts?n_entities=N for synthetic edits")
    ed.add_argument("overrides", nargs="*", help="key=value options of the edit (lr=1e-4 epochs=10 ...)")
    ed.add_argument("--model", help="the model to edit (default: the recipe's, else smollm2-135m)")
    ed.add_argument("--config", metavar="RECIPE", help="an edit recipe YAML (examples/editing/)")
    ed.add_argument("--layer", type=int, help="the block whose module trains")
    ed.add_argument("--sweep", metavar="L1,L2,...", help="try these layers on the first requests and edit at the best")
    ed.add_argument("--schedule", choices=["breadth_first", "depth_first"])
    ed.add_argument("--out", help="the run directory (default: the recipe's output, else runs/edit)")
    ed.set_defaults(fn=cmd_edit)
    r = sub.add_parser("report", help="write RUN/report.html: target gain, loss curve, throughput, side effects")
    r.add_argument("run")
    r.set_defaults(fn=cmd_report)
    cp = sub.add_parser("compare", help="runs side by side; YAML recipes are trained first with the same "
                        "data, steps, batch and seed")
    cp.add_argument("targets", nargs="+", help="run directories and/or YAML recipes")
    cp.add_argument("--out", default="runs/compare", help="where compare.html, compare.md, compare.json and trained recipes go")
    cp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every recipe, e.g. --set method.r=8 (repeatable; with a run directory as the "
                    "reference, the shared fields come from it)")
    cp.add_argument("--allow-mismatch", action="store_true",
                    help="compare run directories trained with different data/steps/batch/seed (with a warning)")
    cp.set_defaults(fn=cmd_compare)
    g = sub.add_parser("generate", help="generate a reply with a trained run")
    g.add_argument("run")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--precision", choices=["fp32", "bf16", "run"], default="fp32",
                   help="compute precision: fp32 (default: what the exported model computes in), bf16, or the "
                   "run's train.precision")
    g.set_defaults(fn=cmd_generate)
    x = sub.add_parser("export", help="write a run's model for the HF ecosystem")
    x.add_argument("run")
    x.add_argument("--out", required=True)
    x.add_argument("--merge", action="store_true", help="fold the trained change into a plain HF model")
    x.set_defaults(fn=cmd_export)
    d = sub.add_parser("data", help="inspect data").add_subparsers(dest="data_cmd", required=True)
    c = d.add_parser("check", help="counts, lengths, truncation and one rendered example")
    c.add_argument("path")
    c.add_argument("--model", default="smollm2-135m", help="whose tokenizer and chat template to use")
    c.add_argument("--format", default="auto")
    c.add_argument("--max-length", type=int, default=1024)
    c.add_argument("--train-on-prompt", action="store_true")
    c.add_argument("--all", action="store_true", help="skip bad rows and list every one with its reason "
                   "(default: stop at the first)")
    c.set_defaults(fn=cmd_data_check)
    add_data_stage_commands(d)
    m = sub.add_parser("models", help="built-in models").add_subparsers(dest="models_cmd", required=True)
    mp = m.add_parser("pull", help="fetch and cache a built-in model")
    mp.add_argument("name")
    mp.set_defaults(fn=cmd_models_pull)
    m.add_parser("list", help="list built-in models").set_defaults(fn=cmd_models_list)
    return p


def add_data_stage_commands(d) -> None:
    """`tunelab data select|relabel|edits|mix`: the data stages of tunelab.curate, one at a time."""
    helps = {"select": "choose k rows of a pool (got_d: toward a target set by optimal transport; random)",
             "relabel": "new targets from a model (s3ft: its own accepted answers; pseudo_label: unlabeled rows)",
             "edits": "rewrite (source, target) rows as edit spans over the source (edit_spans)",
             "mix": "mix sub-task datasets by weight into one task set (task_mix; rows get a `task` field)"}
    for verb, text in helps.items():
        c = d.add_parser(verb, help=text)
        c.add_argument("input", nargs="?" if verb == "mix" else None,
                       help=f"the rows to read (a file or builtin:NAME?opts): the stage's `{DATA_STAGE_INPUT[verb]}`")
        c.add_argument("--out", required=True, help="the JSONL to write (each row with its provenance)")
        c.add_argument("--method", default=None, help=f"which {verb} stage (default: {DATA_STAGE_DEFAULT.get(verb, 'none')})")
        c.add_argument("--model", default="smollm2-135m", help="the model a stage runs: a built-in name, a model "
                       "directory, or a trained run directory")
        c.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
        c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a stage option, e.g. "
                       "--set max_new_tokens=64 (repeatable; `tunelab data VERB --help` names the common ones)")
        if verb == "select":
            c.add_argument("--k", type=int, help="how many rows to keep")
            c.add_argument("--target", help="got_d: rows of the target distribution")
            c.add_argument("--seed", type=int)
        if verb == "relabel":
            c.add_argument("--judge", help="s3ft: final_answer, contains, or module:function")
        c.set_defaults(fn=cmd_data_stage)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `train`'s (and `edit`'s) key=value overrides may also follow its options
    (`tunelab train x.yaml --nproc 2 train.steps=5`)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from tunelab.errors import Interrupted, TunelabError
    try:
        code = args.fn(args)
    except Interrupted as e:  # a graceful stop on SIGINT/SIGTERM: 130 / 143, with how to resume
        _say(f"tunelab: {e}")
        return e.exit_code
    except TunelabError as e:
        _say(f"tunelab: error: {e}")
        return 2
    except KeyboardInterrupt:
        _say("tunelab: interrupted")
        return 130
    except OSError as e:  # the environment failed us (disk, permissions): say where, no traceback
        where = f"{e.filename}: " if e.filename else ""
        _say(f"tunelab: error: {where}{e.strerror or e}")
        return 2
    return code if isinstance(code, int) else 0


def _say(message: str) -> None:
    """Print to stderr with secrets redacted; bytes a terminal cannot show are escaped, not fatal.
    Under torchrun, the other ranks' messages say which rank they come from."""
    from tunelab.run.rundir import redact
    if os_rank():
        message = message.replace("tunelab:", f"tunelab [rank {os_rank()}]:", 1)
    print(redact(message).encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
