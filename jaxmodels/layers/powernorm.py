"""PowerNorm: Shen, Yao, Gholami, Mahoney & Keutzer, "PowerNorm: Rethinking Batch Normalization in Transformers"
(ICML 2020), Algorithm 1.

Per channel (statistics over every axis but the last, e.g. batch and tokens), at iteration ``t``:

Forward (training)::

    psi_B^2 = mean_i x_i^2                                   (batch quadratic mean; no mean subtraction)
    x_hat   = x / psi_{t-1}                                  (normalize with the RUNNING statistic)
    y       = gamma * x_hat + beta
    psi_t^2 = alpha_fwd * psi_{t-1}^2 + (1 - alpha_fwd) * psi_B^2

Backward (the paper's approximate backward, a ``jax.custom_vjp``)::

    dL/dx_hat = gamma * dL/dy
    dL/dx     = (dL/dx_hat - nu_{t-1} * x_hat) / psi_{t-1}
    nu_t      = nu_{t-1} * (1 - (1 - alpha_bkw) * Gamma_B) + (1 - alpha_bkw) * Lambda_B
    Gamma_B   = mean_i x_hat_i^2,   Lambda_B = mean_i dL/dx_hat_i * x_hat_i

Inference: ``y = gamma * x / psi + beta`` with the running ``psi``. (``psi`` is ``sqrt(psi^2 + eps)`` throughout.)

State: ``psi2`` lives in the ``batch_stats`` collection and is returned by ``apply(..., mutable=["batch_stats"])``.
The running gradient statistic ``nu`` lives in the ``grad_stats`` collection and is updated by the backward pass:
differentiate the loss with respect to ``grad_stats`` too; the "gradient" of ``nu`` is defined as the increment
``nu_t - nu_{t-1}``, so the new statistics are ``apply_grad_stats(grad_stats, grads_of_grad_stats)``
(see :func:`apply_grad_stats`). Like the official implementation, ``nu`` receives no true gradient.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.layers._common import check_positive, use_running

__all__ = ["PowerNorm", "power_normalize", "apply_grad_stats"]


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def power_normalize(x, psi2, nu, alpha_bkw: float, eps: float):
    """``x / sqrt(psi2 + eps)`` (per last-axis channel) with PowerNorm's approximate backward; the cotangent
    returned for ``nu`` is the increment ``nu_t - nu_{t-1}`` of the running gradient statistic."""
    return x * jax.lax.rsqrt(psi2 + eps)


def _pn_fwd(x, psi2, nu, alpha_bkw, eps):
    inv = jax.lax.rsqrt(psi2 + eps)
    x_hat = x * inv
    return x_hat, (x_hat, inv, psi2, nu)


def _pn_bwd(alpha_bkw, eps, res, g):
    x_hat, inv, psi2, nu = res
    axes = tuple(range(x_hat.ndim - 1))
    gamma_b = jnp.square(x_hat).mean(axes)
    lambda_b = (g * x_hat).mean(axes)
    gx = (g - nu * x_hat) * inv
    nu_new = nu * (1 - (1 - alpha_bkw) * gamma_b) + (1 - alpha_bkw) * lambda_b
    return gx, None, nu_new - nu


power_normalize.defvjp(_pn_fwd, _pn_bwd)


def apply_grad_stats(grad_stats: Any, increments: Any) -> Any:
    """New ``grad_stats`` = old + the increments the backward pass returned as their "gradient"."""
    from jaxmodels.tree import check_compatible

    check_compatible(grad_stats, increments)
    return jax.tree.map(lambda a, b: a + b, grad_stats, increments)


class PowerNorm(nn.Module):
    """PowerNorm (Shen et al. 2020, Algorithm 1); see the module docstring for the equations and the state."""

    alpha_fwd: float = 0.9
    alpha_bkw: float = 0.9
    eps: float = 1e-5
    use_running_average: bool | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_ra = use_running(self.use_running_average, use_running_average)
        check_positive("eps", self.eps)
        for name in ("alpha_fwd", "alpha_bkw"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        psi2 = self.variable("batch_stats", "psi2", lambda: jnp.ones((c,), jnp.float32))
        nu = self.variable("grad_stats", "nu", lambda: jnp.zeros((c,), jnp.float32))
        gamma = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        beta = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        if use_ra:
            x_hat = xf * jax.lax.rsqrt(psi2.value + self.eps)
        else:
            x_hat = power_normalize(xf, psi2.value, nu.value, self.alpha_bkw, self.eps)
            if not self.is_initializing():
                psi2_b = jnp.square(jax.lax.stop_gradient(xf)).mean(tuple(range(x.ndim - 1)))
                psi2.value = self.alpha_fwd * psi2.value + (1 - self.alpha_fwd) * psi2_b
        return (gamma * x_hat + beta).astype(x.dtype)
