"""The training loop: one function, read top to bottom. It never asks which method or objective
is active; it calls their hooks."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from tunelab import config as C
from tunelab.data.collate import split_batch
from tunelab.errors import Interrupted, TunelabError
from tunelab.eval.task import answer_accuracy, eval_loss
from tunelab.training import checkpoint as ckpt
from tunelab.training.batches import BatchStream
from tunelab.training.config import max_tokens_per_forward_for
from tunelab.training.memory import tame_allocator
from tunelab.training.optim import build_optimizer
from tunelab.training.final import is_complete, save_final
from tunelab.training.progress import Progress
from tunelab.run.device import autocast, pick_device, resolve_precision
from tunelab.run.files import atomic_write_text, recover
from tunelab.run.rundir import MetricsLog, RunLock, fits, redact, write_config
from tunelab.run.context import StepContext
from tunelab.run.signals import GracefulStop, pause_point


def load_examples(cfg: C.RunConfig, tokenizer):
    from tunelab.data import encode, load_records

    train_records = load_records(cfg.data.train, cfg.data)
    eval_records = load_records(cfg.data.eval, cfg.data) if cfg.data.eval else []
    for spec, records in ((cfg.data.train, train_records), (cfg.data.eval, eval_records)):
        _check_chat_template(spec, records, tokenizer, cfg)
        if getattr(records, "num_skipped", 0):
            _warn(f"warning: {spec}: skipped {records.num_skipped} malformed rows (data.on_bad_rows=skip); "
                  f"first: {'; '.join(records.skip_reasons)}")
    return encode(train_records, tokenizer, cfg.data), eval_records, encode(eval_records, tokenizer, cfg.data)


def _check_chat_template(spec: str, records, tokenizer, cfg: C.RunConfig) -> None:
    if getattr(tokenizer, "chat_template", None) is None and any(r.messages for r in records):
        raise TunelabError(f"model.name={cfg.model.name}: its tokenizer has no chat template, but {spec} "
                           f"holds chat rows (format {getattr(records, 'format', '?')}); use a model "
                           "whose tokenizer has one, or `text` rows")


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate(model, tok, eval_records, eval_examples, cfg: C.RunConfig, step: int | None = None) -> dict:
    if not eval_records:
        return {}
    pad = tok.pad_token_id
    n = cfg.eval.num_examples
    out = {"eval_loss": eval_loss(model, eval_examples[:n], batch_size=cfg.eval.batch_size, pad_id=pad,
                                  precision=cfg.train.precision)}
    pause_point(f"eval:{step}")
    return out | answer_accuracy(model, tok, eval_records, cfg.eval, precision=cfg.train.precision)


def forward_backward(model, objective, micro: list[dict], opt, tc, device,
                     ctx: StepContext) -> tuple[float, float, int, dict]:
    """One optimizer step's gradients. Each micro-batch's loss *sum* is back-propagated and the
    gradients are divided by the step's total token count afterwards, so the result does not depend
    on how the step is split, even when an objective decides its token count in the forward pass.
    Returns (mean loss, gradient norm before clipping, tokens counted, mean objective metrics)."""
    loss_sum, total, metrics = 0.0, 0, {}
    bound = max_tokens_per_forward_for(tc, device)
    pieces = [(i, b) for i, m in enumerate(micro)
              for b in (split_batch(m, bound) if bound and objective.per_token else [m])]
    for i, batch in pieces:
        with autocast(tc.precision, device):
            out = objective.loss(model, batch, ctx.at_micro_batch(i))
        out.loss_sum.backward()
        loss_sum += float(out.loss_sum.detach())
        total += out.num_tokens
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v / len(pieces)
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    for p in params:
        p.grad.div_(max(total, 1))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm or float("inf")))
    return loss_sum / max(total, 1), grad_norm, total, metrics


def optimizer_state_bytes(opt) -> int:
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def trainable_state(method, objective, model) -> dict:
    """What a checkpoint holds: the method's trained tensors and the objective's own."""
    return method.trainable_state(model) | {f"objective.{k}": v for k, v in objective.state_dict().items()}


def load_trainable_state(method, objective, model, state: dict) -> None:
    prefix = "objective."
    objective.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    method.load_trainable_state(model, {k: v for k, v in state.items() if not k.startswith(prefix)})


def train(cfg: C.RunConfig, run_dir: Path) -> Path:
    """Train `cfg` in `run_dir`, resuming from its newest valid checkpoint if there is one."""
    from tunelab.methods import METHODS
    from tunelab.models import load_model
    from tunelab.objectives import OBJECTIVES

    with RunLock(run_dir), ExitStack() as stack:
        write_config(cfg, run_dir)
        recover(run_dir)
        recover(run_dir / "checkpoints")
        t_start = time.perf_counter()
        tc = cfg.train
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        device = pick_device(tc.device)
        if device.type == "cpu" and tc.compact_host_memory:
            tame_allocator()
        print(f"device {device}, precision {resolve_precision(tc.precision, device)}")

        # ---- model, method, objective, data
        model, tok = load_model(cfg.model)
        method = METHODS.get(cfg.method.name)(cfg.method.options)
        model = method.apply(model).to(device)
        if tc.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tc.compile:
            from tunelab.training.compile import compile_blocks
            print(f"compiling {compile_blocks(model)} transformer blocks (train.compile)")
        objective = OBJECTIVES.get(cfg.objective.name)(cfg.objective.options)
        objective.setup(model, tok)
        train_ex, eval_records, eval_ex = load_examples(cfg, tok)
        groups = method.param_groups(model, tc.weight_decay) + objective.param_groups(tc.weight_decay)
        opt, sched = build_optimizer(groups, tc)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())

        # ---- resume
        log = MetricsLog(run_dir / "metrics.jsonl", tensorboard=tc.tensorboard)
        start, data_pos = 0, {"epoch": 0, "pos": 0}
        if (found := ckpt.load_latest(run_dir / "checkpoints", warn=_warn)) is not None:
            last, saved = found
            with fits(last, cfg):
                load_trainable_state(method, objective, model, saved["trainable"])
                ckpt.optimizer_from_flat(opt, saved["optimizer_tensors"], saved["state"]["optimizer"])
            sched.load_state_dict(saved["state"]["scheduler"])
            ckpt.set_rng_state(saved["rng_tensors"], saved["state"]["rng"])
            start, data_pos = saved["state"]["step"], saved["state"]["data"]
            print(f"resuming {run_dir} from {last.name}")
        elif ckpt.list_checkpoints(run_dir / "checkpoints"):
            _warn(f"warning: {run_dir / 'checkpoints'} holds no valid checkpoint; starting from step 0")
        log.truncate_after(start if start else -1)  # from scratch: an earlier attempt's lines go too
        stream = BatchStream(train_ex, tc.micro_batch_size, seed=tc.seed, packing=cfg.data.packing,
                             pad_id=tok.pad_token_id, **data_pos)

        if is_complete(run_dir, tc.steps, start, need_eval=bool(eval_records)):
            print(f"{run_dir} is already trained to step {start}; nothing to do")
            return run_dir
        results_path = run_dir / "eval.json"
        results = json.loads(results_path.read_text()) if results_path.exists() and start > 0 else {}
        if start == 0:
            log.write({"step": 0, "kind": "setup", "trainable_params": n_train, "total_params": n_total,
                       "train_examples": len(train_ex), "truncated": train_ex.num_truncated,
                       "dropped": train_ex.num_dropped, "bad_rows_skipped": train_ex.num_bad_rows,
                       "eval_bad_rows_skipped": eval_ex.num_bad_rows, "startup_s": time.perf_counter() - t_start})
            if cfg.eval.before and eval_records:
                results["before"] = evaluate(model, tok, eval_records, eval_ex, cfg, step=0)
                _report("before", results["before"])
                atomic_write_text(results_path, redact(json.dumps(results, indent=1)))

        def save(n: int) -> None:  # a resumable checkpoint of the first n steps
            ckpt.save_checkpoint(run_dir / "checkpoints" / f"step-{n}", optimizer=opt, scheduler=sched,
                                 trainable=trainable_state(method, objective, model),
                                 extra={"step": n, "data": stream.state()})
            ckpt.prune(run_dir / "checkpoints", tc.keep_checkpoints)

        # ---- steps
        model.train()
        bad_in_a_row, last_saved = 0, start
        stop = stack.enter_context(GracefulStop())
        stack.enter_context(_aborts_clearly(run_dir))
        bar = Progress(total=tc.steps, initial=start, enabled=tc.progress)
        for step in range(start, tc.steps):
            if stop.requested:  # a step boundary: save what is done, then leave
                _interrupt(stop, run_dir, step, save if step > last_saved else None)
            t0 = time.perf_counter()
            micro = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(tc.grad_accum)]
            ctx = StepContext(step=step + 1, total_steps=tc.steps, num_micro_batches=tc.grad_accum)
            loss, grad_norm, trained, metrics = forward_backward(model, objective, micro, opt, tc, device, ctx)
            pause_point(f"step:{step + 1}")
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                opt.zero_grad(set_to_none=True)
                bad_in_a_row += 1
                log.write({"step": step + 1, "kind": "skipped", "loss": loss, "grad_norm": grad_norm})
                _warn(f"warning: step {step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                      f"step skipped ({bad_in_a_row} in a row; the run stops at train.max_bad_steps="
                      f"{tc.max_bad_steps})")
                if bad_in_a_row >= tc.max_bad_steps:
                    raise TunelabError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient "
                                       f"(last at step {step + 1}); the last good checkpoint is intact in "
                                       f"{run_dir / 'checkpoints'}. Lower train.lr or check the data.")
                continue
            bad_in_a_row = 0
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            method.on_step(model, ctx, opt)

            dt = time.perf_counter() - t0
            tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                         for b in micro)
            bar.update(loss=loss, tokens=tokens, seconds=dt)
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                log.write({"step": step + 1, "kind": "train", "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens": tokens, "trained_tokens": trained, "tokens_per_s": tokens / dt,
                           "step_s": dt, "optimizer_state_bytes": optimizer_state_bytes(opt),
                           **metrics, **method.stats(model)})
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < tc.steps and eval_records:
                ev = evaluate(model, tok, eval_records, eval_ex, cfg, step=step + 1)
                log.write({"step": step + 1, "kind": "eval", **{k: v for k, v in ev.items() if k != "samples"}})
                model.train()
            if (tc.save_every and (step + 1) % tc.save_every == 0) or step + 1 == tc.steps:
                save(step + 1)
                last_saved = step + 1
        bar.close()
        if stop.requested:
            _interrupt(stop, run_dir, tc.steps, None)
        stop.release()  # no step boundary left: a signal during the final save/evaluation stops the run
        # at once (Ctrl-C: "aborted ... resume with"); the next start redoes only what is missing

        # ---- final output and evaluation
        model.eval()
        save_final(run_dir, model, tok, method, objective, cfg)
        if eval_records:
            results["after"] = evaluate(model, tok, eval_records, eval_ex, cfg, step=tc.steps)
            _report("after", results["after"])
            atomic_write_text(results_path, redact(json.dumps(results, indent=1)))
        return run_dir


def _interrupt(stop: GracefulStop, run_dir: Path, step: int, save) -> None:
    """Leave after a SIGINT/SIGTERM at a step boundary: checkpoint step `step` (unless `save` is
    None: it is saved already, or nothing has trained), then raise Interrupted with how to resume."""
    if save is not None and step > 0:
        save(step)
    done = f"checkpoint {run_dir / 'checkpoints' / f'step-{step}'} saved" if step else "nothing trained yet"
    raise Interrupted(f"interrupted at step {step} ({done}); resume with: tunelab train {run_dir}",
                      exit_code=stop.exit_code)


@contextmanager
def _aborts_clearly(run_dir: Path):
    """A second Ctrl-C aborts at once (KeyboardInterrupt); say that nothing was corrupted and how
    to resume from the newest complete checkpoint."""
    try:
        yield
    except KeyboardInterrupt:
        last = ckpt.latest_valid(run_dir / "checkpoints", warn=lambda m: None)
        raise Interrupted(f"aborted; the newest complete checkpoint is {last or 'none (starts over)'}; "
                          f"resume with: tunelab train {run_dir}") from None


def _report(when: str, res: dict) -> None:
    if "accuracy" in res:
        print(f"eval {when}: accuracy {res['accuracy']:.3f} on {res['num_examples']} held-out examples, "
              f"loss {res['eval_loss']:.4f}")
