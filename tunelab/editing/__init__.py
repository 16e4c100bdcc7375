"""Model editing by fine-tuning: LocFT-BF (Yang et al. 2025, arXiv 2509.22072).

Public surface:
    edit(requests, cfg) -> run dir       edit a model and score it (`tunelab edit`)
    EditConfig, load_config              the options (an edit recipe is their YAML)
    EditRequest, load_requests           the request format (prompt, target, rephrase, locality)
    BreadthFirst, DepthFirst             the two schedules
The one trained module is the `locft` method (tunelab/methods/locft.py); the step is the training
loop's own (tunelab.training.step.forward_backward).
"""
from __future__ import annotations

from tunelab.editing.config import EditConfig
from tunelab.editing.edit import edit, load_config
from tunelab.editing.requests import EditRequest, load_requests
from tunelab.editing.schedule import BreadthFirst, DepthFirst

__all__ = ["BreadthFirst", "DepthFirst", "EditConfig", "EditRequest", "edit", "load_config", "load_requests"]
