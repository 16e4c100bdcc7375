"""Differential privacy for training: DP-SGD and its accountant.

Public surface:
    PrivacyConfig                      the `privacy` section of the run config (privacy/config.py)
    PrivateGradients                   a step's gradients under DP-SGD (what TrainState.private holds)
    check_supported(cfg, method, objective, distributed)   the error, before training, when it cannot run
    epsilon(q, sigma, steps, delta)    RDP accountant of the subsampled Gaussian (privacy/accountant.py)
"""
from __future__ import annotations

from tunelab.privacy.accountant import epsilon
from tunelab.privacy.config import PrivacyConfig
from tunelab.privacy.dpsgd import PrivateGradients, check_supported

__all__ = ["PrivacyConfig", "PrivateGradients", "check_supported", "epsilon"]
