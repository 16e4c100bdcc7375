"""The command line. Each command is a small function; heavy imports happen inside them."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_train(a) -> None:
    import tunelab
    run_dir = tunelab.train(a.config, *a.overrides)
    print(f"run directory: {run_dir}")


def cmd_eval(a) -> None:
    from tunelab.training.loop import evaluate, load_examples
    from tunelab.training.run import load_trained

    cfg, model, tok, _ = load_trained(a.run)
    if a.num_examples is not None:
        cfg.eval.num_examples = a.num_examples
    _, records, examples = load_examples(cfg, tok)
    res = evaluate(model, tok, records, examples, cfg)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))


def cmd_generate(a) -> None:
    from tunelab.data.records import Record
    from tunelab.data import encode_prompt
    from tunelab.eval.task import generate
    from tunelab.training.run import load_trained

    cfg, model, tok, _ = load_trained(a.run)
    rec = Record(messages=[{"role": "user", "content": a.prompt}, {"role": "assistant", "content": "."}])
    print(generate(model, tok, [encode_prompt(rec, tok)], max_new_tokens=a.max_new_tokens, batch_size=1,
                   precision=cfg.train.precision)[0])


def cmd_export(a) -> None:
    from tunelab.export import export
    print(f"wrote {export(a.run, a.out, merge=a.merge)}")


def cmd_data_check(a) -> None:
    from tunelab.data.check import check_data
    from tunelab.data.config import DataConfig
    from tunelab.models import load_tokenizer
    from tunelab.models.config import ModelConfig

    tok = load_tokenizer(ModelConfig(name=a.model))
    print(check_data(a.path, tok, DataConfig(format=a.format, max_length=a.max_length,
                                             train_on_prompt=a.train_on_prompt)))


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
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="task metrics of a trained run on its eval data")
    e.add_argument("run")
    e.add_argument("--num-examples", type=int, default=None)
    e.set_defaults(fn=cmd_eval)
    g = sub.add_parser("generate", help="generate a reply with a trained run")
    g.add_argument("run")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
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
    c.set_defaults(fn=cmd_data_check)
    m = sub.add_parser("models", help="built-in models").add_subparsers(dest="models_cmd", required=True)
    mp = m.add_parser("pull", help="fetch and cache a built-in model")
    mp.add_argument("name")
    mp.set_defaults(fn=cmd_models_pull)
    m.add_parser("list", help="list built-in models").set_defaults(fn=cmd_models_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tunelab.errors import TunelabError
    try:
        args.fn(args)
    except TunelabError as e:
        print(f"tunelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130
    return 0
