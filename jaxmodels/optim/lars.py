"""LARS: layer-wise adaptive rate scaling.

You et al., "Large Batch Training of Convolutional Networks" (2017), Algorithm 1, per layer (leaf) l::

    λ_l = c · ‖w_l‖ / (‖∇L(w_l)‖ + β ‖w_l‖ + eps)           (local LR; 1 if ‖w_l‖ = 0 or ‖∇L(w_l)‖ = 0)
    v_l ← m v_l + η_t · λ_l · (∇L(w_l) + β w_l)
    w_l ← w_l - v_l

``c`` is the trust coefficient (η in the paper), β the weight decay, m the momentum. Note the denominator is the
paper's ``‖g‖ + β‖w‖``; ``optax.lars`` uses ``‖g + βw‖`` instead. Leaves matched by ``exclude`` (biases, BN/LN
scales, the common practice of every large-batch ResNet recipe) get neither weight decay nor the local LR:
``v ← m v + η_t g``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxmodels.optim._common import NO_PARAMS_MSG, check_range, norm, path_mask

PyTree = Any

__all__ = ["scale_by_lars", "lars"]


def scale_by_lars(
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    mask: PyTree | Callable | None = None,
) -> optax.GradientTransformation:
    """``g -> λ (g + β w)`` with the LARS local learning rate λ (see module docstring); leaves outside ``mask`` pass
    through unchanged (no decay, no local LR)."""
    check_range("weight_decay", weight_decay, 0.0)
    check_range("trust_coefficient", trust_coefficient, 0.0, lo_open=True)
    check_range("eps", eps, 0.0)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(NO_PARAMS_MSG)

        def one(g, w):
            w_norm, g_norm = norm(w), norm(g)
            ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
            ratio = jnp.where((w_norm == 0.0) | (g_norm == 0.0), 1.0, ratio).astype(g.dtype)
            return ratio * (g + weight_decay * w.astype(g.dtype))

        return jax.tree.map(one, updates, params), state

    tx = optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def lars(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    nesterov: bool = False,
    mask: PyTree | Callable | None = None,
    exclude: str | None = None,
) -> optax.GradientTransformation:
    """LARS with momentum (see module docstring): ``chain(scale_by_lars, scale_by_learning_rate, trace)``."""
    check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
    return optax.chain(
        scale_by_lars(weight_decay, trust_coefficient, eps, path_mask(mask, exclude)),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=nesterov),
    )
