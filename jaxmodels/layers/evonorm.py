"""EvoNorm-B0 and EvoNorm-S0: Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers" (NeurIPS 2020).

NHWC inputs (any number of spatial axes between batch and channels). Per channel ``v``, ``gamma``, ``beta``.

EvoNorm-B0 (batch-dependent)::

    y = x / max(sqrt(s^2_{b,w,h}(x) + eps), v * x + sqrt(s^2_{w,h}(x) + eps)) * gamma + beta

where ``s^2_{b,w,h}`` is the per-channel variance over batch and space (a running average replaces it at inference)
and ``s^2_{w,h}`` the per-sample, per-channel variance over space.

EvoNorm-S0 (sample-based, grouped)::

    y = x * sigmoid(v * x) / sqrt(s^2_{w,h,c/g}(x) + eps) * gamma + beta

where ``s^2_{w,h,c/g}`` is the per-sample variance over space and the channels of each of ``groups`` groups.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.layers._common import check_momentum, check_positive, use_running

__all__ = ["EvoNormB0", "EvoNormS0"]


def _affine_params(mod, c):
    v = mod.param("v", nn.initializers.ones, (c,), jnp.float32)
    g = mod.param("scale", nn.initializers.ones, (c,), jnp.float32)
    b = mod.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return v, g, b


class EvoNormB0(nn.Module):
    """EvoNorm-B0 (Liu et al. 2020): ``x / max(sqrt(var_bhw + eps), v x + sqrt(var_hw + eps)) * gamma + beta``.
    Running variance ``r <- momentum r + (1 - momentum) var_bhw`` in the ``batch_stats`` collection."""

    use_running_average: bool | None = None
    momentum: float = 0.9
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_ra = use_running(self.use_running_average, use_running_average)
        check_momentum(self.momentum)
        check_positive("eps", self.eps)
        if x.ndim < 3:
            raise ValueError(f"EvoNormB0 expects [B, ..., C] with spatial axes, got {x.shape}")
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        v, g, b = _affine_params(self, c)
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if use_ra:
            var = ra_var.value
        else:
            var = xf.var(axis=tuple(range(x.ndim - 1)))
            if not self.is_initializing():
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        spatial = tuple(range(1, x.ndim - 1))
        inst_std = jnp.sqrt(xf.var(axis=spatial, keepdims=True) + self.eps)
        den = jnp.maximum(jnp.sqrt(var + self.eps), v * xf + inst_std)
        return (xf / den * g + b).astype(x.dtype)


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu et al. 2020): ``x sigmoid(v x) / sqrt(var_{hw,c/g} + eps) * gamma + beta`` with ``groups``
    channel groups. No batch statistics."""

    groups: int = 8
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        check_positive("eps", self.eps)
        c = x.shape[-1]
        if x.ndim < 3:
            raise ValueError(f"EvoNormS0 expects [B, ..., C] with spatial axes, got {x.shape}")
        if self.groups < 1 or c % self.groups:
            raise ValueError(f"groups={self.groups} must divide channels={c}")
        xf = x.astype(jnp.float32)
        v, g, b = _affine_params(self, c)
        xg = xf.reshape(*x.shape[:-1], self.groups, c // self.groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        std = jnp.sqrt(xg.var(axis=axes, keepdims=True) + self.eps)
        std = jnp.broadcast_to(std, xg.shape).reshape(x.shape)
        return (xf * jax.nn.sigmoid(v * xf) / std * g + b).astype(x.dtype)
