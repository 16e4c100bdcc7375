"""The training loop, read top to bottom: `train` = build, resume, begin, the steps, finish.

It never asks which method or objective is active: it calls their hooks. Everything a checkpoint
holds lives in a `TrainState` (training/state.py); one optimizer step is `train_step`
(training/step.py).
"""
from __future__ import annotations

import json
import random
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab import config as C
from tunelab.errors import Interrupted, TunelabError
from tunelab.models.context import check_positions
from tunelab.run.context import StepContext
from tunelab.run.dist import SINGLE, Dist
from tunelab.run.device import pick_device, precision_warning, resolve_precision
from tunelab.run.files import atomic_write_text, recover
from tunelab.run.rundir import MetricsLog, RunLock, fits, redact, write_config
from tunelab.run.signals import GracefulStop
from tunelab.training import checkpoint as ckpt
from tunelab.training.batches import BatchStream
from tunelab.training.checkpoint import seed_rank
from tunelab.training.evaluation import evaluate, report
from tunelab.training.final import is_complete, save_final
from tunelab.training.inputs import load_examples, warn
from tunelab.training.lowp import store_frozen_in
from tunelab.training.memory import tame_allocator
from tunelab.training.optim import build_optimizer
from tunelab.training.parallel import OneProcess, choose
from tunelab.training.progress import Progress
from tunelab.training.state import TrainState
from tunelab.training.step import StepResult, optimizer_state_bytes, train_step


@dataclass
class Run:
    """A run being trained: its config and directory, what was built for it, and its state."""
    cfg: C.RunConfig
    run_dir: Path
    device: torch.device
    tok: object
    train_ex: list
    eval_records: list
    eval_ex: list
    state: TrainState
    log: MetricsLog
    t_start: float
    parallel: OneProcess = None
    """How the processes share the work (training/parallel.py)."""
    results: dict = field(default_factory=dict)
    """eval.json: task metrics before and after training."""
    last_saved: int = 0
    """The step of the newest checkpoint."""

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def dist(self) -> Dist:
        return self.state.dist

    def say(self, message: str) -> None:
        """Print once: on rank 0."""
        if self.dist.is_main:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        """A warning on stderr, once: on rank 0."""
        if self.dist.is_main:
            warn(message)


def train(cfg: C.RunConfig, run_dir: Path, dist: Dist = SINGLE) -> Path:
    """Train `cfg` in `run_dir`, resuming from its newest valid checkpoint if there is one. On
    several processes (`dist`), every rank calls this; rank 0 owns the run directory."""
    with (RunLock(run_dir) if dist.is_main else nullcontext()), ExitStack() as stack:
        run = build(cfg, run_dir, dist)
        resume(run)
        if dist.broadcast(is_complete(run_dir, cfg.train.steps, run.state.step, need_eval=bool(run.eval_records))):
            run.say(f"{run_dir} is already trained to step {run.state.step}; nothing to do")
            return run_dir
        begin(run)
        run_steps(run, stack)
        finish(run)
        return run_dir


def build(cfg: C.RunConfig, run_dir: Path, dist: Dist = SINGLE) -> Run:
    """Seed, then model, method, objective, data, optimizer and schedule, in this order (the
    global RNG draws of initialisations depend on it; every process draws the same)."""
    import transformers  # noqa: F401 -- imported before the clock starts: startup_s measures this run's
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  loading, not the process's imports

    from tunelab.models import load_model
    from tunelab.registry import METHODS, OBJECTIVES

    if dist.is_main:
        write_config(cfg, run_dir)
        recover(run_dir)
        recover(run_dir / "checkpoints")
    dist.barrier()
    t_start, tc = time.perf_counter(), cfg.train
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    device = pick_device(tc.device, dist.local_rank if dist.active else None)
    if device.type == "cpu" and tc.compact_host_memory:
        tame_allocator()
    _announce(dist, device, tc)
    model, tok = load_model(cfg.model)
    method = METHODS.get(cfg.method.name)(cfg.method.options)
    model = method.apply(model).to(device)
    if method.frozen_base and resolve_precision(tc.precision, device) == "bf16":
        store_frozen_in(model, torch.bfloat16)  # the same numbers as autocast's per-forward casts
    prepare_model(model, tc)
    objective = OBJECTIVES.get(cfg.objective.name)(cfg.objective.options)
    objective.setup(model, tok)
    parallel = choose(dist, device, tc.parallel, method, objective)
    parallel.wrap(model, objective)
    train_ex, eval_records, eval_ex = load_examples(cfg, tok, quiet=not dist.is_main)
    check_positions(model, {"data.train": train_ex, "eval data": eval_ex}, cfg.model.name)
    groups = method.param_groups(model, tc.weight_decay) + objective.param_groups(tc.weight_decay)
    opt, sched = build_optimizer(groups, tc)
    if dist.rank > 0:  # ranks drew the same initialisation; from here each draws its own (dropout, sampling)
        seed_rank(tc.seed, dist.rank)
    stream = BatchStream(train_ex, tc.micro_batch_size, seed=tc.seed, packing=cfg.data.packing,
                         pad_id=tok.pad_token_id, rank=dist.rank, world_size=dist.world_size)
    state = TrainState(model, method, objective, opt, sched, stream, grad_accum=tc.grad_accum, dist=dist,
                       seed=tc.seed, sharded_files=parallel.distributed,
                       private=private_gradients(cfg, method, objective, dist, len(train_ex)))
    log = MetricsLog(run_dir / "metrics.jsonl", tensorboard=tc.tensorboard, enabled=dist.is_main)
    return Run(cfg, run_dir, device, tok, train_ex, eval_records, eval_ex, state, log, t_start, parallel)


def private_gradients(cfg: C.RunConfig, method, objective, dist: Dist, num_examples: int):
    """DP-SGD's gradients when privacy.dp_sgd is on (None otherwise); an error, before training,
    when the method, objective or launch cannot run it."""
    from tunelab.privacy import PrivateGradients, check_supported

    check_supported(cfg.privacy, method, objective, dist.active)
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    return PrivateGradients(cfg.privacy, num_examples, per_step) if cfg.privacy.dp_sgd else None


def _announce(dist: Dist, device, tc) -> None:
    if not dist.is_main:
        return
    procs = f", {dist.world_size} processes (train.parallel: {tc.parallel})" if dist.active else ""
    if not dist.active and tc.parallel != "auto":
        warn(f"warning: train.parallel: {tc.parallel} does nothing on one process; launch with "
             "torchrun or `tunelab train ... --nproc N`")
    print(f"device {device}, precision {resolve_precision(tc.precision, device)}{procs}")
    for warning in [*tc.warnings(), precision_warning(tc.precision, device)]:
        if warning:
            warn(f"warning: {warning}")


def prepare_model(model, tc) -> None:
    """Gradient checkpointing and torch.compile, when asked for."""
    if tc.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.compile:
        from tunelab.training.compile import compile_blocks
        n = compile_blocks(model)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"compiling {n} transformer blocks (train.compile)")


def resume(run: Run) -> None:
    """Restore the newest valid checkpoint, if any; drop the log lines after it."""
    found = ckpt.load_latest(run.checkpoints, warn=warn) if run.dist.is_main else None
    name = run.dist.broadcast(found[0].name if found else None)  # every rank resumes from the same one
    if name is not None:
        last = run.checkpoints / name
        with fits(last, run.cfg):
            saved = found[1] if found else ckpt.load_checkpoint(last)
            relayout(run, saved.meta)
            run.state.restore(saved)
        run.say(f"resuming {run.run_dir} from {last.name}")
    elif ckpt.list_checkpoints(run.checkpoints):
        run.warn(f"warning: {run.checkpoints} holds no valid checkpoint; starting from step 0")
    run.last_saved = run.state.step
    run.log.truncate_after(run.state.step if run.state.step else -1)  # from scratch: earlier lines go too
    results_path = run.run_dir / "eval.json"
    if results_path.exists() and run.state.step > 0:
        run.results = json.loads(results_path.read_text())


def relayout(run: Run, meta: dict) -> None:
    """A run resumed on another number of processes keeps its examples per step (global batch):
    the accumulation (else the micro-batch) is changed to fit, and said."""
    saved_world, state = meta.get("world_size", 1), run.state
    if saved_world == run.dist.world_size:
        return
    world, micro, accum = run.dist.world_size, state.stream.size, state.grad_accum
    total = meta.get("global_batch", meta.get("micro_batch_size", micro) * meta.get("grad_accum", accum) * saved_world)
    if total % (micro * world) == 0:
        accum = total // (micro * world)
    elif total % (accum * world) == 0:
        micro = total // (accum * world)
    elif total % world == 0:
        micro, accum = total // world, 1
    else:
        raise TunelabError(f"{run.run_dir}: its steps take {total} examples, which {world} processes cannot "
                           f"share evenly; resume it on a number of processes that divides {total}")
    state.stream.size, state.grad_accum = micro, accum
    run.say(f"resuming on {world} process{'es' if world > 1 else ''} (was {saved_world}): micro_batch_size "
            f"{micro}, grad_accum {accum} keep the run's {total} examples per step")


def begin(run: Run) -> None:
    """A fresh run's setup line in metrics.jsonl, and the evaluation before training."""
    if run.state.step > 0:
        return
    model, ex = run.state.model, run.train_ex
    run.log.write({"step": 0, "kind": "setup",
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "total_params": sum(p.numel() for p in model.parameters()),
                   "train_examples": len(ex), "eval_examples": len(run.eval_records),
                   "truncated": ex.num_truncated, "longest_example": ex.longest, "dropped": ex.num_dropped,
                   "bad_rows_skipped": ex.num_bad_rows, "eval_bad_rows_skipped": run.eval_ex.num_bad_rows,
                   "startup_s": time.perf_counter() - run.t_start, "processes": run.dist.world_size,
                   "parallel": run.parallel.name})
    if run.cfg.eval.before and run.eval_records:
        run.results["before"] = _evaluate(run, step=0)
        if run.dist.is_main:
            report("before", run.results["before"])
            atomic_write_text(run.run_dir / "eval.json", redact(json.dumps(run.results, indent=1)))


def _evaluate(run: Run, step: int, full: tuple | None = None, gathered: bool = False) -> dict:
    """Task metrics on rank 0, on a model it can run alone: `full` when the caller has gathered it
    (`gathered`: every rank did, with `_consolidated`), else gathered here; the other ranks wait
    and get {}. Every rank calls this."""
    if not gathered:
        full = _consolidated(run)
    res = evaluate(full[0], run.tok, run.eval_records, run.eval_ex, run.cfg, step=step) if run.dist.is_main else {}
    run.dist.barrier()
    return res


def _consolidated(run: Run):
    """(model, method) holding the trained weights, on rank 0 (None elsewhere): a sharded model's
    full weights gathered into a fresh copy of the base model with the method applied."""
    if not run.parallel.sharded:
        return (run.state.model, run.state.method) if run.dist.is_main else None

    def fresh():
        from tunelab.models import load_model
        from tunelab.registry import METHODS

        model, _ = load_model(run.cfg.model)
        method = METHODS.get(run.cfg.method.name)(run.cfg.method.options)
        return method.apply(model).to(run.device), method
    return run.parallel.full_model(fresh)


def run_steps(run: Run, stack: ExitStack) -> None:
    """Steps from the state's step to train.steps: log, evaluate and checkpoint on schedule. A
    SIGINT/SIGTERM stops at the next step boundary after a checkpoint."""
    tc, state = run.cfg.train, run.state
    state.model.train()
    bad_in_a_row = 0
    stop = stack.enter_context(GracefulStop())
    stack.enter_context(_aborts_clearly(run.checkpoints, run.run_dir))
    bar = Progress(total=tc.steps, initial=state.step, enabled=tc.progress and run.dist.is_main)
    for step in range(state.step + 1, tc.steps + 1):
        if run.dist.any(stop.requested is not None):  # a step boundary: save what is done, then leave
            _interrupt(stop, run, save=state.step > run.last_saved)
        ctx = StepContext(step=step, total_steps=tc.steps, num_micro_batches=state.grad_accum,
                          rank=run.dist.rank, world_size=run.dist.world_size)
        res = train_step(state, run.parallel, tc, run.device, ctx)
        state.step = step
        if res.skipped:
            bad_in_a_row = _skipped(run, res, step, bad_in_a_row + 1)
            continue
        bad_in_a_row = 0
        bar.update(loss=res.loss, tokens=res.tokens, seconds=res.seconds)
        _after_step(run, res, step)
    bar.close()
    if run.dist.any(stop.requested is not None):
        _interrupt(stop, run, save=False)
    stop.release()  # no step boundary left: a signal during the final save/evaluation stops the run
    # at once (Ctrl-C: "aborted ... resume with"); the next start redoes only what is missing


def _after_step(run: Run, res: StepResult, step: int) -> None:
    """The step's metrics line, and the evaluation and checkpoint when they are due."""
    tc, cfg, state = run.cfg.train, run.cfg, run.state
    if step % tc.log_every == 0 or step == tc.steps:
        run.log.write({"step": step, "kind": "train", "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
                       "tokens": res.tokens, "trained_tokens": res.trained_tokens,
                       "tokens_per_s": res.tokens / res.seconds, "step_s": res.seconds,
                       "optimizer_state_bytes": optimizer_state_bytes(state.optimizer),
                       **res.metrics, **state.method.stats(state.model)})
    if cfg.eval.every and step % cfg.eval.every == 0 and step < tc.steps and run.eval_records:
        ev = _evaluate(run, step)
        run.log.write({"step": step, "kind": "eval", **{k: v for k, v in ev.items() if k != "samples"}})
        state.model.train()
    if (tc.save_every and step % tc.save_every == 0) or step == tc.steps:
        state.save(run.checkpoints, tc.keep_checkpoints)
        run.last_saved = step


def _skipped(run: Run, res: StepResult, step: int, bad_in_a_row: int) -> int:
    """Log and warn about a step skipped for a non-finite loss or gradient; stop the run after
    train.max_bad_steps of them in a row."""
    tc = run.cfg.train
    run.log.write({"step": step, "kind": "skipped", "loss": res.loss, "grad_norm": res.grad_norm})
    run.warn(f"warning: step {step}: non-finite loss ({res.loss}) or gradient norm ({res.grad_norm}); "
         f"step skipped ({bad_in_a_row} in a row; the run stops at train.max_bad_steps={tc.max_bad_steps})")
    if bad_in_a_row >= tc.max_bad_steps:
        raise TunelabError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient "
                           f"(last at step {step}); the last good checkpoint is intact in "
                           f"{run.checkpoints}. Lower train.lr or check the data.")
    return bad_in_a_row


def finish(run: Run) -> None:
    """final/ (written once, by rank 0, from the full model) and the evaluation after training."""
    run.state.model.eval()
    full = _consolidated(run)
    if run.dist.is_main:
        save_final(run.run_dir, full[0], run.tok, full[1], run.state.objective, run.cfg)
    run.dist.barrier()
    if run.eval_records:
        run.results["after"] = _evaluate(run, run.cfg.train.steps, full, gathered=True)
        if run.dist.is_main:
            report("after", run.results["after"])
            atomic_write_text(run.run_dir / "eval.json", redact(json.dumps(run.results, indent=1)))


def _interrupt(stop: GracefulStop, run: Run, save: bool) -> None:
    """Leave after a SIGINT/SIGTERM at a step boundary: checkpoint the steps done (when `save` and
    there are any), then raise Interrupted with how to resume."""
    step = run.state.step
    if save and step > 0:
        run.state.save(run.checkpoints, run.cfg.train.keep_checkpoints)
    done = f"checkpoint {run.checkpoints / f'step-{step}'} saved" if step else "nothing trained yet"
    raise Interrupted(f"interrupted at step {step} ({done}); resume with: tunelab train {run.run_dir}",
                      exit_code=stop.exit_code)


@contextmanager
def _aborts_clearly(checkpoints: Path, run_dir: Path):
    """A second Ctrl-C aborts at once (KeyboardInterrupt); say that nothing was corrupted and how
    to resume from the newest complete checkpoint."""
    try:
        yield
    except KeyboardInterrupt:
        last = ckpt.latest_valid(checkpoints, warn=lambda m: None)
        raise Interrupted(f"aborted; the newest complete checkpoint is {last or 'none (starts over)'}; "
                          f"resume with: tunelab train {run_dir}") from None
