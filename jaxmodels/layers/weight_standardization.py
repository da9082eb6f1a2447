"""Weight Standardization: Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel Normalization
and Weight Standardization" (2019/2020).

Each output unit's incoming weights are standardized over its fan-in (all kernel axes but the last)::

    W_hat[..., o] = (W[..., o] - mean(W[..., o])) / sqrt(var(W[..., o]) + eps)

:func:`weight_standardize` is a plain parameter transform usable on any Dense/Conv kernel (with
:class:`jaxmodels.layers.ReparamDense` / :class:`jaxmodels.layers.ReparamConv`, or on a params tree with
``jaxmodels.map_with_path``); :class:`WSConv` is a convolution whose kernel always goes through it.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from jaxmodels.layers.reparam import ReparamConv

__all__ = ["weight_standardize", "WSConv"]


def weight_standardize(kernel: jax.Array, eps: float = 1e-5) -> jax.Array:
    """``(W - mean) / sqrt(var + eps)`` over all axes but the last (output) axis; float32 statistics."""
    if kernel.ndim < 2:
        raise ValueError(f"weight_standardize expects a kernel with >= 2 axes, got shape {kernel.shape}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    k = kernel.astype(jnp.float32)
    axes = tuple(range(kernel.ndim - 1))
    mu = k.mean(axes, keepdims=True)
    var = k.var(axes, keepdims=True)
    return ((k - mu) * jax.lax.rsqrt(var + eps)).astype(kernel.dtype)


class WSConv(ReparamConv):
    """Convolution with a weight-standardized kernel (Qiao et al.): ``y = conv(x, W_hat) + b``; the stored
    parameter ``kernel`` is the unstandardized ``W``."""

    transform: Callable | None = partial(weight_standardize, eps=1e-5)
