"""Progressive re-parameterized BatchNorm (PRepBN): Guo, Chen, Tang & Wang, "SLAB: Efficient Transformers with
Simplified Linear Attention and Progressive Re-parameterized Batch Normalization" (ICML 2024).

RepBN adds a learnable scaled identity to BatchNorm (statistics over batch and tokens, per channel)::

    RepBN(x) = BN(x) + eta * x

PRepBN blends LayerNorm into RepBN during training with a decaying weight ``gamma``::

    PRepBN(x) = gamma * LN(x) + (1 - gamma) * RepBN(x)
    gamma(t)  = 1                                     for t < warmup
              = r0 * max(0, 1 - (t - warmup) / decay_steps)   otherwise

so training ends (``gamma = 0``) with pure RepBN; inference always uses RepBN with running statistics. At inference
RepBN is an affine map, foldable into the neighbouring linear layer (:func:`fold_repbn`)::

    RepBN(x) = a * x + c,   a = gamma_bn / sqrt(var + eps) + eta,   c = beta_bn - gamma_bn * mean / sqrt(var + eps)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.layers._common import check_momentum, check_positive, use_running
from jaxmodels.layers.norms import LayerNorm

__all__ = ["RepBN", "PRepBN", "prepbn_gamma", "fold_repbn"]


def prepbn_gamma(step, decay_steps: int, warmup: int = 0, r0: float = 1.0) -> jax.Array:
    """The LN weight ``gamma(t)`` of PRepBN (see the module docstring)."""
    if decay_steps < 1:
        raise ValueError(f"decay_steps must be >= 1, got {decay_steps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    t = jnp.asarray(step, jnp.float32)
    ramp = r0 * jnp.clip(1.0 - (t - warmup) / decay_steps, 0.0, 1.0)
    return jnp.where(t < warmup, 1.0, ramp)


class RepBN(nn.Module):
    """``BN(x) + eta * x`` over all axes but the last (per channel), ``eta`` a learnable scalar (init 1); running
    ``mean``/``var`` in ``batch_stats`` (``r <- momentum r + (1 - momentum) batch``)."""

    use_running_average: bool | None = None
    momentum: float = 0.9
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_ra = use_running(self.use_running_average, use_running_average)
        check_momentum(self.momentum)
        check_positive("eps", self.eps)
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if use_ra:
            mu, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mu, var = xf.mean(axes), xf.var(axes)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mu)
                ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        eta = self.param("eta", nn.initializers.ones, (), jnp.float32)
        y = (xf - mu) * jax.lax.rsqrt(var + self.eps) * scale + bias + eta * xf
        return y.astype(x.dtype)


class PRepBN(nn.Module):
    """``gamma(t) LN(x) + (1 - gamma(t)) RepBN(x)`` in training, ``RepBN(x)`` (running statistics) at inference.

    The step ``t`` is ``step=`` when given, else a counter ``batch_stats/step`` incremented by every training call.
    """

    decay_steps: int = 1000
    warmup: int = 0
    r0: float = 1.0
    use_running_average: bool | None = None
    momentum: float = 0.9
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, step=None):
        use_ra = use_running(self.use_running_average, use_running_average)
        prepbn_gamma(0, self.decay_steps, self.warmup, self.r0)  # validates the schedule before any work
        counter = self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))
        rep = RepBN(use_running_average=use_ra, momentum=self.momentum, eps=self.eps, name="repbn")(x)
        ln = LayerNorm(self.eps, name="ln")(x)
        if use_ra:
            return rep
        t = counter.value if step is None else step
        if not self.is_initializing():
            counter.value = counter.value + 1
        g = prepbn_gamma(t, self.decay_steps, self.warmup, self.r0)
        return (g * ln.astype(jnp.float32) + (1 - g) * rep.astype(jnp.float32)).astype(x.dtype)


def fold_repbn(params: Any, batch_stats: Any, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """Inference-mode RepBN as ``(a, c)`` with ``RepBN(x) = a * x + c``. ``params``/``batch_stats`` are the RepBN
    sub-trees (for PRepBN, their ``repbn`` entries). Fold further into a following Dense with
    :func:`jaxmodels.layers.fold_norm_affine`."""
    for k in ("scale", "bias", "eta"):
        if k not in params:
            raise ValueError(f"fold_repbn: params lack {k!r} (pass the RepBN sub-tree)")
    inv = jax.lax.rsqrt(jnp.asarray(batch_stats["var"], jnp.float32) + eps)
    a = params["scale"] * inv + params["eta"]
    c = params["bias"] - params["scale"] * batch_stats["mean"] * inv
    return a, c
