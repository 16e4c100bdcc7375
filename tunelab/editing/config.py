"""The options of a model edit (`tunelab edit`): an edit recipe's YAML is a serialisation of this."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from tunelab.options import Options


@dataclass(kw_only=True)
class EditConfig(Options):
    ranges: ClassVar = {"lr": "> 0", "weight_decay": ">= 0", "batch_size": ">= 1", "epochs": ">= 1",
                        "loss_threshold": ">= 0", "max_grad_norm": ">= 0", "max_new_tokens": ">= 1",
                        "eval_batch_size": ">= 1", "max_length": ">= 8", "sweep_requests": ">= 1",
                        "num_scored": ">= 0"}
    model: str = "smollm2-135m"
    """The model to edit: a built-in name, a local directory, a hub id or a .gguf file."""
    method: Literal["locft", "full"] = "locft"
    """What trains: `locft` one module (`layer`, `module`), `full` every weight (the FT baseline)."""
    layer: int | None = None
    """The block whose module trains (negative counts from the top); null: LocFT's default (3/4 of the depth)."""
    module: str = "mlp.down_proj"
    """The module inside the block that trains ('' for the whole block)."""
    schedule: Literal["breadth_first", "depth_first"] = "breadth_first"
    """breadth_first: epochs of shuffled mini-batches over all requests (LocFT-BF); depth_first: each
    request trained to convergence, one after another (the editing literature's pipeline)."""
    lr: float = 5e-4
    """Adam learning rate (LocFT's configs: 5e-4 for one MLP down-projection)."""
    weight_decay: float = 0.0
    """Adam (L2) weight decay."""
    batch_size: int = 100
    """Requests per mini-batch (breadth-first)."""
    epochs: int = 25
    """Breadth-first: at most this many epochs. Depth-first: at most this many steps per request."""
    loss_threshold: float = 1e-2
    """A mini-batch whose loss is below this takes no step; an epoch (breadth-first) or a request
    (depth-first) whose mean loss is below it ends training of it."""
    max_grad_norm: float = 0.0
    """Clip the gradient norm (0: no clipping, as LocFT)."""
    template: Literal["raw", "chat"] = "raw"
    """How a prompt is shown: `raw` text (LocFT: prompt, ' ' + target + EOS) or the model's chat template."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision (as train.precision)."""
    max_length: int = 128
    """Longest prompt + target in tokens (a longer request is an error naming it)."""
    max_new_tokens: int = 16
    """Reply length when scoring (cut at the first '.', newline or end of turn, as LocFT)."""
    eval_batch_size: int = 32
    """Prompts generated together when scoring."""
    num_scored: int = 0
    """Score a seeded random sample of this many requests (0: all of them); every request trains.
    Scoring generates for each request's prompt, rephrases and locality prompts, before and after:
    for thousands of edits a sample of a few hundred says as much for a fraction of the time."""
    seed: int = 0
    """Seeds the breadth-first shuffles."""
    sweep: list[int] = field(default_factory=list)
    """Layers to try before editing (`--sweep`; needs a method that edits one layer, checked by
    `edit.load_config`): each edits the first `sweep_requests` requests from the
    original weights; the layer with the best mean of reliability, generalization and locality is used."""
    sweep_requests: int = 50
    """Requests each sweep point edits."""
    output: str = "runs/edit"
    """The run directory (config.yaml, final/, edit.json)."""
