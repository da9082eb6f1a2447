"""Shared helpers for the model tests: sharded-vs-unsharded forward and a few-step training run on digits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.sharding import data_sharding, rules_to_shardings
from jaxmodels.train import init_train_state, make_train_step


def sharded_forward(apply_fn, params, x, rules, mesh):
    """``apply_fn(params, x)`` with params placed by ``rules`` and the batch sharded over ``data``."""
    p = jax.device_put(params, rules_to_shardings(params, rules, mesh))
    xs = jax.device_put(x, data_sharding(mesh, np.ndim(x)))
    return jax.jit(apply_fn)(p, xs), p


def train_losses(apply_fn, params, xs, ys, steps, lr=3e-3, batch=64, mesh=None, rules=None, seed=0):
    """Losses of ``steps`` Adam steps on random minibatches of (xs, ys)."""
    tx = optax.adam(lr)
    state = init_train_state(params, tx, mesh, rules)
    step = make_train_step(apply_fn, tx, mesh=mesh, rules=rules)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(xs), batch)
        state, m = step(state, jnp.asarray(xs[idx]), jnp.asarray(ys[idx]))
        losses.append(float(m["loss"]))
    return np.array(losses), state
