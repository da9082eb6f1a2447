"""Small helpers shared by the batch-statistics layers."""

from __future__ import annotations

import flax.linen as nn


def check_positive(name, value):
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_momentum(momentum):
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")


def use_running(module_value, call_value):
    return nn.merge_param("use_running_average", module_value, call_value)
