"""Weight Standardization: Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel Normalization
and Weight Standardization" (2019/2020), and Scaled Weight Standardization (Brock, De & Smith, "Characterizing
signal propagation to close the performance gap in unnormalized ResNets", ICLR 2021; Brock et al., NFNets, 2021),
the reparameterization FedWon (Zhuang & Lyu, ICLR 2024) puts in place of every normalization layer.

Each output unit's incoming weights are standardized over its fan-in (all kernel axes but the last)::

    W_hat[..., o] = (W[..., o] - mean(W[..., o])) / sqrt(var(W[..., o]) + eps)

:func:`weight_standardize` is a plain parameter transform usable on any Dense/Conv kernel (with
:class:`jaxmodels.layers.ReparamDense` / :class:`jaxmodels.layers.ReparamConv`, or on a params tree with
``jaxmodels.map_with_path``); :class:`WSConv` is a convolution whose kernel always goes through it.

Scaled WS (:func:`scaled_weight_standardize`; FedWon's Eq. 1 with NFNets' learnable gain)::

    W_hat[..., o] = gamma * g[o] * (W[..., o] - mean(W[..., o])) / sqrt(max(N * var(W[..., o]), eps))

with ``N`` the fan-in (the product of all kernel axes but the last), ``g`` a learnable per-output gain (init 1) and
``gamma`` a fixed gain of the nonlinearity that follows, chosen so that a unit-variance input keeps unit variance
through ``nonlinearity(conv(x, W_hat))`` (Brock et al. 2021a: ``gamma = sqrt(2 / (1 - 1/pi))`` for ReLU;
:data:`NF_GAINS` holds the NFNets reference code's empirical values). The form (the ``max(N var, eps)`` floor,
``eps = 1e-4``, gain initialized to ones) is that of ``WSConv2D.standardize_weight`` in the NFNets reference code,
github.com/deepmind/deepmind-research ``nfnets/base.py``. FedWon's own code was not found; its paper and reviews
describe WSConv from NF-ResNets / NFNets used as is (together with NFNets' adaptive gradient clipping, which optax
provides as ``optax.adaptive_grad_clip``). :class:`ScaledWS` is the transform as a linen module (the gain is its
parameter ``gain``); :class:`ScaledWSConv` / :class:`ScaledWSDense` are :class:`ReparamConv` /
:class:`ReparamDense` with it (parameters ``kernel``, ``bias``, ``transform/gain``).
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.layers.reparam import ReparamConv, ReparamDense

__all__ = ["weight_standardize", "WSConv", "scaled_weight_standardize", "ScaledWS", "ScaledWSConv", "ScaledWSDense",
           "NF_GAINS", "RELU_GAIN"]

#: Brock et al. 2021a's analytic ReLU gain ``sqrt(2 / (1 - 1/pi))`` (~1.7129).
RELU_GAIN = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))

#: Nonlinearity gains of the NFNets reference code (``nfnets/base.py``: the empirical std of ``f(x)``, ``x ~ N(0,1)``,
#: inverted), to pass as ``gamma`` for a scaled-WS layer followed by that nonlinearity.
NF_GAINS = {
    "identity": 1.0,
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
    "silu": 1.7881293296813965,
    "tanh": 1.5939117670059204,
    "leaky_relu": 1.70590341091156,
}


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


def scaled_weight_standardize(kernel: jax.Array, gain: jax.Array | None = None, gamma: float = 1.0,
                              eps: float = 1e-4) -> jax.Array:
    """Scaled WS (module docstring): ``gamma * gain * (W - mean) / sqrt(max(N * var, eps))`` over all axes but the
    last (output) axis, ``N`` = the fan-in; ``gain``: None (ones), a scalar or one value per output unit. Float32
    statistics; the result has the kernel's dtype."""
    if kernel.ndim < 2:
        raise ValueError(f"scaled_weight_standardize expects a kernel with >= 2 axes, got shape {kernel.shape}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if isinstance(gamma, bool) or not (isinstance(gamma, numbers.Real) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a positive number, got {gamma!r}")
    if gain is not None and jnp.shape(gain) not in ((), (kernel.shape[-1],)):
        raise ValueError(f"gain must be a scalar or have shape ({kernel.shape[-1]},), got {jnp.shape(gain)}")
    k = kernel.astype(jnp.float32)
    axes = tuple(range(kernel.ndim - 1))
    fan_in = math.prod(kernel.shape[:-1])
    mu = k.mean(axes, keepdims=True)
    var = k.var(axes, keepdims=True)
    scale = gamma * jax.lax.rsqrt(jnp.maximum(var * fan_in, eps))
    if gain is not None:
        scale = scale * jnp.asarray(gain, jnp.float32)
    return ((k - mu) * scale).astype(kernel.dtype)


class ScaledWS(nn.Module):
    """Scaled WS as a kernel transform with a learnable per-output gain ``gain`` (init ones, float32):
    ``ReparamConv(f, transform=ScaledWS(gamma=NF_GAINS["relu"]))``. ``use_gain=False``: no parameter, gain 1."""

    gamma: float = 1.0
    eps: float = 1e-4
    use_gain: bool = True

    @nn.compact
    def __call__(self, kernel: jax.Array) -> jax.Array:
        gain = self.param("gain", nn.initializers.ones, (kernel.shape[-1],), jnp.float32) if self.use_gain else None
        return scaled_weight_standardize(kernel, gain, self.gamma, self.eps)


def _default_scaled_ws(module) -> None:
    # A module-valued default must be a fresh, unbound instance per layer, adopted as the child "transform" (a
    # shared default instance would bind to the first layer; a default_factory would bind to the enclosing module).
    if module.transform is None:
        object.__setattr__(module, "transform", ScaledWS(module.gamma, module.eps, module.use_gain, parent=None))


class ScaledWSConv(ReparamConv):
    """Convolution with a scaled-WS kernel (FedWon's WSConv): ``y = conv(x, gamma * g * (W - mu) / (sigma sqrt(N)))
    + b``; parameters ``kernel`` (the unstandardized ``W``), ``bias``, ``transform/gain``. ``gamma``: the gain of
    the nonlinearity that follows (:data:`NF_GAINS`)."""

    transform: Callable | None = None
    gamma: float = 1.0
    eps: float = 1e-4
    use_gain: bool = True
    kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

    def __post_init__(self):
        _default_scaled_ws(self)
        super().__post_init__()


class ScaledWSDense(ReparamDense):
    """Dense layer with a scaled-WS kernel: ``y = x (gamma * g * (W - mu) / (sigma sqrt(N))) + b``, the
    standardization over the input axis of each output column; parameters as :class:`ScaledWSConv`'s."""

    transform: Callable | None = None
    gamma: float = 1.0
    eps: float = 1e-4
    use_gain: bool = True
    kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

    def __post_init__(self):
        _default_scaled_ws(self)
        super().__post_init__()
