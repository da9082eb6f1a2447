"""Unified Normalization (UN): Yang, Sun, Li, Chen, Zhang, Pu & Yang, "Unified Normalization for Accelerating and
Stabilizing Transformers" (ACM MM 2022).

UN is an offline (foldable) normalization: at inference it is the per-channel affine map
``y = gamma * x / sqrt(sigma_run^2 + eps) + beta`` (fold it into the preceding linear layer with
:func:`fold_un_into_dense`). In training, per channel (statistics over every axis but the last), at iteration ``t``:

Forward, with ``mu_hat = 0`` and fluctuation smoothing by the geometric mean of the last ``M`` statistics::

    sigma_t^2     = mean_i x_i^2
    sigma_hat_t^2 = (prod_{i=0}^{M-1} sigma_{t-i}^2)^(1/M)            (GM of the window Omega_t)
    z = x / sqrt(sigma_hat_t^2 + eps),   y = gamma * z + beta
    sigma_run^2  <- m * sigma_run^2 + (1 - m) * sigma_hat_t^2

Backward (a ``jax.custom_vjp``), with the gradient statistic ``g_t = mean_i dL/dz_i * z_i``::

    psi_t = m * psi_{t-1} + (1 - m) * (1/M) sum_{i=0}^{M-1} g_{t-i}
    dL/dx = (dL/dz - psi_t * z) / sqrt(sigma_hat_t^2 + eps)

Adaptive outlier filtration (``outlier_filtration=True``): by the AM-GM bound
``E(Omega) - Pi(Omega) <= M * V(Omega^(1/2))``, the step is an outlier when, for some channel, the arithmetic-minus-
geometric mean of the window including the new statistic exceeds ``M`` times the variance of ``sqrt`` of the window
before it (the official implementation's recorded threshold). Outlier steps drop both moving averages
(``sigma_hat_t^2 = sigma_t^2``, ``psi_t = g_t``) and store the running statistics in the windows instead of the
outlier. The first ``max(M, warmup_steps)`` steps also use the plain batch statistics.

State: ``batch_stats`` holds ``var`` (running), ``window`` (``[M, C]``), ``step`` and ``skipped``; ``grad_stats``
holds ``psi`` and ``grad_window``, updated by the backward pass through the increment-as-gradient convention of
:func:`jaxmodels.layers.apply_grad_stats` (see :mod:`jaxmodels.layers.powernorm`). The official code's extra
"gradient compensation" clamp ``r`` is not part of the paper's equations and is not implemented.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.layers._common import check_momentum, check_positive, use_running

__all__ = ["UnifiedNorm", "fold_un_into_dense", "un_normalize"]


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def un_normalize(x, var, psi, grad_window, flags, momentum: float, eps: float):
    """``x / sqrt(var + eps)`` with UN's smoothed backward. ``flags = (pos, smooth, skip)`` (int32): the window slot
    to write, whether the window average is used, and whether this step is an outlier. Cotangents returned for
    ``psi`` and ``grad_window`` are the increments of those statistics."""
    return x * jax.lax.rsqrt(var + eps)


def _un_fwd(x, var, psi, grad_window, flags, momentum, eps):
    inv = jax.lax.rsqrt(var + eps)
    z = x * inv
    return z, (z, inv, var, psi, grad_window, flags)


def _un_bwd(momentum, eps, res, g):
    z, inv, var, psi, window, flags = res
    pos, smooth, skip = flags[0], flags[1].astype(bool), flags[2].astype(bool)
    gz = (g * z).mean(tuple(range(z.ndim - 1)))
    new_window = window.at[pos].set(jnp.where(skip, psi, gz))
    mean_g = jnp.where(smooth & ~skip, new_window.mean(0), gz)
    new_psi = momentum * psi + (1 - momentum) * mean_g
    used = jnp.where(skip, mean_g, new_psi)
    gx = (g - used * z) * inv
    return gx, None, new_psi - psi, new_window - window, None


un_normalize.defvjp(_un_fwd, _un_bwd)


class UnifiedNorm(nn.Module):
    """Unified Normalization (Yang et al. 2022); equations in the module docstring. ``window`` is ``M``."""

    window: int = 4
    warmup_steps: int = 4000
    outlier_filtration: bool = False
    momentum: float = 0.9
    eps: float = 1e-5
    use_running_average: bool | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_ra = use_running(self.use_running_average, use_running_average)
        check_positive("eps", self.eps)
        check_momentum(self.momentum)
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        c, m = x.shape[-1], self.window
        xf = x.astype(jnp.float32)
        run_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        win = self.variable("batch_stats", "window", lambda: jnp.ones((m, c), jnp.float32))
        step = self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))
        skipped = self.variable("batch_stats", "skipped", lambda: jnp.zeros((), jnp.int32))
        psi = self.variable("grad_stats", "psi", lambda: jnp.zeros((c,), jnp.float32))
        gwin = self.variable("grad_stats", "grad_window", lambda: jnp.zeros((m, c), jnp.float32))
        gamma = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        beta = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        if use_ra:
            return (gamma * xf * jax.lax.rsqrt(run_var.value + self.eps) + beta).astype(x.dtype)

        t = step.value + 1  # 1-based iteration, as in the official implementation
        pos = t % m
        var_b = jnp.square(jax.lax.stop_gradient(xf)).mean(tuple(range(x.ndim - 1)))
        new_win = win.value.at[pos].set(var_b)
        smooth = (t > m) & (t >= self.warmup_steps) & (m > 1)
        if self.outlier_filtration and m > 1:
            threshold = m * jnp.sqrt(win.value).var(0)
            am = new_win.mean(0)
            gm = jnp.exp(jnp.log(new_win).mean(0))
            skip = (t >= self.warmup_steps) & jnp.any(am - gm > threshold)
        else:
            skip = jnp.zeros((), bool)
        new_win = jnp.where(skip, win.value.at[pos].set(run_var.value), new_win)
        gm_win = jnp.exp(jnp.log(new_win).mean(0))
        var = jnp.where(smooth & ~skip, gm_win, var_b)
        flags = jnp.stack([pos, smooth.astype(jnp.int32), skip.astype(jnp.int32)]).astype(jnp.int32)
        z = un_normalize(xf, var, psi.value, gwin.value, flags, self.momentum, self.eps)
        if not self.is_initializing():
            win.value = new_win
            run_var.value = self.momentum * run_var.value + (1 - self.momentum) * var
            step.value = t
            skipped.value = skipped.value + skip.astype(jnp.int32)
        return (gamma * z + beta).astype(x.dtype)


def fold_un_into_dense(kernel: jax.Array, bias: jax.Array, un_params: Any, un_stats: Any, eps: float = 1e-5):
    """Fold inference-mode UN after a Dense (``UN(x W + b)``) into that Dense: with ``a = gamma / sqrt(var + eps)``,
    ``W' = W * a`` (per output column) and ``b' = a * b + beta``. Returns ``(W', b')``."""
    a = un_params["scale"] * jax.lax.rsqrt(jnp.asarray(un_stats["var"], jnp.float32) + eps)
    if kernel.shape[-1] != a.shape[0]:
        raise ValueError(f"fold_un_into_dense: kernel {kernel.shape} does not match UN channels {a.shape}")
    return kernel * a, bias * a + un_params["bias"]
