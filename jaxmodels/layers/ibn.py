"""IBN block: Pan, Luo, Shi & Tang, "Two at Once: Enhancing Learning and Generalization Capacities via IBN-Net"
(ECCV 2018).

The first ``floor(ratio * C)`` channels are instance-normalized, the rest batch-normalized::

    y[..., :k] = gamma_I * (x - mu_{h,w}(x)) / sqrt(sigma^2_{h,w}(x) + eps) + beta_I      (per sample, per channel)
    y[..., k:] = gamma_B * (x - mu_{b,h,w}) / sqrt(sigma^2_{b,h,w} + eps) + beta_B          (BatchNorm)

(IBN-a uses ``ratio = 0.5`` after the first convolution of a residual block.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.layers._common import check_momentum, check_positive, use_running

__all__ = ["IBN"]


class IBN(nn.Module):
    """Instance norm on the first ``int(ratio * C)`` channels, BatchNorm (``nn.BatchNorm``, running statistics in
    ``batch_stats``) on the rest. Inputs ``[B, H, W, C]`` (any number of spatial axes)."""

    ratio: float = 0.5
    use_running_average: bool | None = None
    momentum: float = 0.9
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_ra = use_running(self.use_running_average, use_running_average)
        check_momentum(self.momentum)
        check_positive("eps", self.eps)
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if x.ndim < 3:
            raise ValueError(f"IBN expects [B, ..., C] with spatial axes, got {x.shape}")
        c = x.shape[-1]
        k = int(self.ratio * c)
        if k < 1 or k >= c:
            raise ValueError(f"ratio={self.ratio} leaves an empty half for {c} channels")
        xi = x[..., :k].astype(jnp.float32)
        axes = tuple(range(1, x.ndim - 1))
        mu = xi.mean(axes, keepdims=True)
        var = xi.var(axes, keepdims=True)
        yi = (xi - mu) * jax.lax.rsqrt(var + self.eps)
        yi = yi * self.param("in_scale", nn.initializers.ones, (k,), jnp.float32) + self.param(
            "in_bias", nn.initializers.zeros, (k,), jnp.float32)
        yb = nn.BatchNorm(use_running_average=use_ra, momentum=self.momentum, epsilon=self.eps, name="bn")(
            x[..., k:].astype(jnp.float32))
        return jnp.concatenate([yi, yb], -1).astype(x.dtype)
