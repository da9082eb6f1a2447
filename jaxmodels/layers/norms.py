"""LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) over the feature (last) axis.

LayerNorm, "Layer Normalization" (Ba, Kiros & Hinton, 2016)::

    y = gamma * (x - mu) / sqrt(sigma^2 + eps) + beta,   mu = mean_i x_i,  sigma^2 = mean_i (x_i - mu)^2

RMSNorm, "Root Mean Square Layer Normalization" (Zhang & Sennrich, 2019)::

    y = gamma * x / sqrt(mean_i x_i^2 + eps)

Statistics are computed in float32 whatever the input dtype; the output has the input's dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["LayerNorm", "RMSNorm", "layer_norm", "rms_norm"]


def _check_eps(eps):
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """(x - mean(x)) / sqrt(var(x) + eps) over the last axis (no affine), in float32."""
    xf = x.astype(jnp.float32)
    mu = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mu).mean(-1, keepdims=True)
    return (xf - mu) * jax.lax.rsqrt(var + eps)


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis (no affine), in float32."""
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)


class LayerNorm(nn.Module):
    """Ba et al. (2016): ``y = gamma * (x - mu) / sqrt(sigma^2 + eps) + beta`` over the last axis."""

    eps: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        _check_eps(self.eps)
        d = x.shape[-1]
        y = layer_norm(x, self.eps)
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """Zhang & Sennrich (2019): ``y = gamma * x / sqrt(mean(x^2) + eps)`` over the last axis."""

    eps: float = 1e-6
    use_scale: bool = True

    @nn.compact
    def __call__(self, x):
        _check_eps(self.eps)
        y = rms_norm(x, self.eps)
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return y.astype(x.dtype)
