"""Mechanisms: what fine-tuning did to a model's circuits, by activation patching.

Public surface:
    Site, record_activations, patch_activations     patching on plain forward hooks (patching.py)
    entity_tracking                                  the boxes task's accuracy, head scores and
                                                     cross-model patching (CMAP) recovery
Importing this package is cheap: torch loads inside the modules.
"""
from __future__ import annotations

from tunelab.mechanisms.patching import Site, patch_activations, record_activations

__all__ = ["Site", "patch_activations", "record_activations"]
