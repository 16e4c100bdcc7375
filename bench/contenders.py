"""The three contenders, each run in its own process (so peak memory is its own):

    python bench/contenders.py {hf,trl,tunelab} {lora,full} STEPS WARMUP

hf:      transformers Trainer + PEFT LoRA, padded batches (DataCollatorForSeq2Seq), SDPA, bf16 where
         the hardware has it natively -- what a careful user writes.
trl:     TRL SFTTrainer with packing (padding-free rows, position_ids), the strongest HF path.
tunelab: `tunelab.train` with default settings (post-train diagnostics off: the HF contenders
         have none, and they would load a second model into the measured process).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, Settings, examples, launched_at, model_path, native_bf16, report  # noqa: E402


class StepClock:
    """A TrainerCallback timing each optimizer step, plus a collator wrapper counting real tokens."""

    def __init__(self, collate, count):
        from transformers import TrainerCallback

        clock = self
        self.step_s, self.tokens, self.losses, self.first_end = [], [], [], None
        self.collate, self.count = collate, count

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock.step_s.append(time.perf_counter() - clock.t0)
                clock.first_end = clock.first_end or time.time()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    clock.losses.append(float(logs["loss"]))
        self.callback = CB()

    def __call__(self, features):
        batch = self.collate(features)
        self.tokens.append(self.count(batch))
        return batch


def hf_model(s: Settings):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32, attn_implementation="sdpa")
    if s.mode == "lora":
        model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model


def hf_args(s: Settings, out: str, **kw) -> dict:
    """TrainingArguments a careful user picks, shared by the hf and trl contenders."""
    import torch

    # use_cpu: without it, the Trainer refuses bf16 on a CPU ("Your setup doesn't support bf16/gpu")
    return dict(output_dir=out, per_device_train_batch_size=s.batch_size, learning_rate=s.lr,
                use_cpu=not torch.cuda.is_available(),
                max_steps=s.steps, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, optim="adamw_torch", bf16=native_bf16(), logging_steps=1,
                save_strategy="no", report_to=[], seed=s.seed, dataloader_num_workers=0,
                disable_tqdm=True, **kw)


def run_hf(s: Settings, out: str) -> None:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok, exs = examples(s)
    ds = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels,
                             "attention_mask": [1] * len(e)} for e in exs])
    clock = StepClock(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                      lambda b: int(b["attention_mask"].sum()))
    trainer = Trainer(model=hf_model(s), args=TrainingArguments(**hf_args(s, out)), train_dataset=ds,
                      data_collator=clock, callbacks=[clock.callback])
    trainer.train()
    report("hf", s, step_s=clock.step_s, tokens=clock.tokens, losses=clock.losses,
           launched=launched_at(), first_step_end=clock.first_end)


def run_trl(s: Settings, out: str) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok, exs = examples(s)
    ds = Dataset.from_list([{"input_ids": e.input_ids,
                             "completion_mask": [int(lab != -100) for lab in e.labels]} for e in exs])
    # One packed row per step holding about as many tokens as `batch_size` examples, so every
    # contender does the same work per optimizer step.
    row = int(s.batch_size * sum(map(len, exs)) / len(exs))
    args = SFTConfig(**(hf_args(s, out) | {"per_device_train_batch_size": 1}), packing=True, padding_free=True,
                     max_length=row, completion_only_loss=True)
    trainer = SFTTrainer(model=hf_model(s), args=args, train_dataset=ds, processing_class=tok)
    collate = trainer.data_collator if trainer.data_collator is not None else DataCollatorForLanguageModeling(tok.pad_token_id)
    clock = StepClock(collate, lambda b: int(b["input_ids"].numel()))
    trainer.data_collator = clock
    trainer.add_callback(clock.callback)
    trainer.train()
    report("trl", s, step_s=clock.step_s, tokens=clock.tokens, losses=clock.losses,
           launched=launched_at(), first_step_end=clock.first_end,
           extra={"packed_rows_tokens": clock.tokens[:3]})


def run_tunelab(s: Settings, out: str, overrides: tuple[str, ...] = ()) -> None:
    import json

    import tunelab

    t_call = time.time()
    method = {"name": "lora", "r": s.lora_r, "alpha": s.lora_alpha} if s.mode == "lora" else {"name": "full"}
    run = tunelab.train({
        "model": {"name": MODEL},
        "data": {"train": "builtin:arith?n=4000&split=train", "eval": None, "max_length": s.max_length},
        "method": method,
        "train": {"steps": s.steps, "micro_batch_size": s.batch_size, "lr": s.lr, "warmup_steps": 0,
                  "seed": s.seed, "save_every": 0, "progress": False},
        "diagnostics": {"after_train": []},  # training only, like the other contenders (peak memory!)
        "output": out,
    }, *overrides)
    lines = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    setup = next(x for x in lines if x["kind"] == "setup")
    steps = [x for x in lines if x["kind"] == "train"]
    report("tunelab", s, step_s=[x["step_s"] for x in steps], tokens=[x["tokens"] for x in steps],
           losses=[x["loss"] for x in steps], launched=launched_at(),
           first_step_end=t_call + setup["startup_s"] + steps[0]["step_s"])


if __name__ == "__main__":
    import os
    import tempfile

    name, mode, steps, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if name in os.environ.get("BENCH_BREAK", "").split(","):  # to check that a failing contender fails the bench
        raise SystemExit(f"{name}: deliberately broken (BENCH_BREAK={os.environ['BENCH_BREAK']})")
    overrides = tuple(sys.argv[5:])  # key.path=value, tunelab only (for ablations)
    runners = {"hf": run_hf, "trl": run_trl, "tunelab": lambda s, out: run_tunelab(s, out, overrides)}
    with tempfile.TemporaryDirectory() as out:
        runners[name](Settings(mode=mode, steps=steps, warmup=warmup), out + "/run")
