"""Batch-Channel Normalization (BCN): Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization" (2019/2020).

BCN normalizes with batch (per-channel) statistics and then with channel (group) statistics::

    x_dot  = gamma_b * (x - mu_hat) / sqrt(sigma_hat^2 + eps) + beta_b          (batch step)
    x_ddot = gamma_g * (x_dot - mu_g(x_dot)) / sqrt(sigma_g^2(x_dot) + eps) + beta_g   (channel step, GroupNorm)

The channel step's affine ``gamma_g, beta_g`` is per group, as in the authors' ``BCNorm``.

Large-batch mode (``micro_batch=False``): ``mu_hat, sigma_hat^2`` are the batch statistics (BatchNorm); the running
estimates are updated for inference with the same rule as below.
Micro-batch mode (``micro_batch=True``, the paper's estimated BN): the estimates are updated first, with the batch
variance measured around the previous estimate (as in the authors' ``EstBN``)::

    mu_hat      <- mu_hat + r (mean(x) - mu_hat)
    sigma_hat^2 <- sigma_hat^2 + r (mean((x - mu_hat_old)^2) - sigma_hat^2)

and these (stop-gradient) estimates normalize the batch. At inference the estimates are used in both modes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.layers._common import check_positive, use_running

__all__ = ["BatchChannelNorm"]


class BatchChannelNorm(nn.Module):
    """BCN (Qiao et al.): per-channel batch normalization then GroupNorm with ``groups`` groups (per-group affine);
    see the module docstring for both modes. Inputs ``[B, ..., C]``; statistics in ``batch_stats`` (``mean``, ``var``)."""

    groups: int = 8
    micro_batch: bool = False
    rate: float = 0.1
    use_running_average: bool | None = None
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_ra = use_running(self.use_running_average, use_running_average)
        check_positive("eps", self.eps)
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {self.rate}")
        c = x.shape[-1]
        if self.groups < 1 or c % self.groups:
            raise ValueError(f"groups={self.groups} must divide channels={c}")
        xf = x.astype(jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if use_ra:
            mu, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            bmu = xf.mean(axes)
            bvar = xf.var(axes)
            est_var = jnp.square(jax.lax.stop_gradient(xf) - ra_mean.value).mean(axes)
            new_mu = ra_mean.value + self.rate * (jax.lax.stop_gradient(bmu) - ra_mean.value)
            new_var = ra_var.value + self.rate * (est_var - ra_var.value)
            if not self.is_initializing():
                ra_mean.value, ra_var.value = new_mu, new_var
            mu, var = (new_mu, new_var) if self.micro_batch else (bmu, bvar)
        gb = self.param("batch_scale", nn.initializers.ones, (c,), jnp.float32)
        bb = self.param("batch_bias", nn.initializers.zeros, (c,), jnp.float32)
        y = (xf - mu) * jax.lax.rsqrt(var + self.eps) * gb + bb
        yg = y.reshape(*x.shape[:-1], self.groups, c // self.groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        gmu = yg.mean(axes, keepdims=True)
        gvar = yg.var(axes, keepdims=True)
        y = (yg - gmu) * jax.lax.rsqrt(gvar + self.eps)
        gc = self.param("channel_scale", nn.initializers.ones, (self.groups, 1), jnp.float32)
        bc = self.param("channel_bias", nn.initializers.zeros, (self.groups, 1), jnp.float32)
        return (y * gc + bc).reshape(x.shape).astype(x.dtype)
