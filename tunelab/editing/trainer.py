"""Training edits: requests -> token ids with the loss on the target, LocFT's loss, and the step
(tunelab.training.step.forward_backward, the loop's own) with the loss-threshold skip."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tunelab.data.collate import collate
from tunelab.data.records import Example
from tunelab.data.render import IGNORE
from tunelab.editing.config import EditConfig
from tunelab.editing.requests import EditRequest
from tunelab.editing.schedule import make_schedule
from tunelab.errors import DataError
from tunelab.objectives import LossOutput, Objective, trained_hidden
from tunelab.run.context import StepContext


def prompt_ids(tokenizer, prompt: str, template: str) -> list[int]:
    """The prompt as the model reads it: raw text (with the tokenizer's own start token, if any), or
    a user turn of the chat template with the generation prompt."""
    if template == "chat":
        from tunelab.data.render import render_chat
        text = render_chat([{"role": "user", "content": prompt}], tokenizer, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_request(req: EditRequest, tokenizer, cfg: EditConfig) -> Example:
    """prompt + target + EOS, the loss on ' target' + EOS only (LocFT: a leading space, EOS appended)."""
    target = (" " if cfg.template == "raw" else "") + req.target
    p = prompt_ids(tokenizer, req.prompt, cfg.template)
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) + len(t) > cfg.max_length:
        file, _, line = req.source.rpartition(":")
        raise DataError(f"prompt and target take {len(p) + len(t)} tokens, over max_length={cfg.max_length}",
                        file=file or req.source, line=int(line) if line.isdigit() else None, field="prompt")
    return Example(p + t, [IGNORE] * len(p) + t, source=req.source)


class EditLoss(Objective):
    """LocFT's loss: cross-entropy on the target tokens, the mean over each request's tokens, then
    the mean over the mini-batch (a request with a long target weighs as much as a short one).
    Returned as (sum of per-request means, number of requests): the step divides one by the other."""

    def loss(self, model, batch, ctx=None) -> LossOutput:
        hidden, targets = trained_hidden(model, batch)  # (N, d), (N,)
        rows = (batch["targets"] != IGNORE).nonzero()[:, 0]  # (N,): the request of each target token
        ce = F.cross_entropy(model.get_output_embeddings()(hidden).float(), targets, reduction="none")
        B = batch["targets"].shape[0]
        per_request = torch.zeros(B, device=ce.device).index_add(0, rows, ce)
        counts = torch.zeros(B, device=ce.device).index_add(0, rows, torch.ones_like(ce))
        return LossOutput((per_request / counts.clamp(min=1)).sum(), B)


@dataclass
class Stepper:
    """`step(indices)`: one mini-batch's loss and, unless it is below the threshold, an Adam step."""
    model: object
    examples: list[Example]
    cfg: EditConfig
    device: torch.device
    pad_id: int
    steps: int = 0
    skipped: int = 0
    visits: list[list[int]] = field(default_factory=list)

    def __post_init__(self):
        from tunelab.run.dist import SINGLE
        from tunelab.training.config import TrainConfig
        from tunelab.training.parallel import OneProcess

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.tc = TrainConfig(precision=self.cfg.precision, max_grad_norm=self.cfg.max_grad_norm,
                              max_tokens_per_forward=0)
        self.parallel = OneProcess(SINGLE, self.device)
        self.parallel.wrap(self.model, EditLoss())

    def __call__(self, indices: list[int]) -> float:
        from tunelab.training.step import forward_backward

        self.visits.append(list(indices))
        batch = collate([self.examples[i] for i in indices], packing=False, pad_id=self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ctx = StepContext(step=self.steps + 1, total_steps=max(self.steps + 1, 1))
        loss, *_ = forward_backward(self.parallel, self.parallel.root._objective, [batch], self.opt, self.tc,
                                    self.device, ctx)
        if loss < self.cfg.loss_threshold:
            self.skipped += 1
        else:
            self.opt.step()
            self.steps += 1
        self.opt.zero_grad(set_to_none=True)
        return loss


def train_edits(model, examples: list[Example], cfg: EditConfig, device, pad_id: int) -> tuple[list[dict], Stepper]:
    """Run the configured schedule over `examples` on `model` (whose trainable parameters are the
    method's); returns the schedule's log and the stepper (steps taken, batches skipped, visits)."""
    model.train()
    stepper = Stepper(model, examples, cfg, device, pad_id)
    log = make_schedule(cfg).run(len(examples), stepper)
    model.eval()
    return log, stepper
