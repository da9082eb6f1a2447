"""Shared helpers for the layer tests: sharded-vs-unsharded check and a tiny digits training run."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.datasets import load_digits_split
from jaxmodels.sharding import data_sharding
from jaxmodels.train import accuracy, softmax_cross_entropy


def assert_sharded_matches(fn: Callable, x, mesh, rtol=1e-5, atol=1e-5):
    """``jit(fn)`` on ``x`` sharded over the ``data`` axis equals the single-device result. Only the reduction order
    of batch statistics can differ (float32), hence the 1e-5 tolerances."""
    ref = jax.jit(fn)(x)
    xs = jax.device_put(x, data_sharding(mesh, x.ndim))
    out = jax.jit(fn)(xs)
    if mesh.shape["data"] > 1:  # on a single-device runner the mesh degenerates to one shard
        assert not xs.sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)
    return out


class Net(nn.Module):
    """Dense/Conv -> norm -> relu -> (pool) -> Dense(10). ``make_norm()`` builds the layer under test;
    ``batch_stats_norm`` says whether it takes ``use_running_average``."""

    make_norm: Callable
    images: bool = False
    batch_stats_norm: bool = False
    width: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.images:
            h = nn.Conv(self.width, (3, 3))(x)
        else:
            h = nn.Dense(self.width)(x)
        norm = self.make_norm()
        h = norm(h, use_running_average=not train) if self.batch_stats_norm else norm(h)
        h = nn.relu(h)
        if self.images:
            h = h.reshape(h.shape[0], -1)
        return nn.Dense(10)(h)


def train_digits(net: nn.Module, steps: int = 40, lr: float = 1e-2, batch: int = 128, seed: int = 0,
                 images: bool = False):
    """Adam on sklearn digits; returns (per-step train losses, test accuracy in inference mode)."""
    data = load_digits_split(images=images)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    v = net.init(jax.random.key(seed), x[:batch], train=False)
    params = v["params"]
    state = {k: val for k, val in v.items() if k != "params"}
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, state, opt, xb, yb):
        def loss_fn(p):
            if state:
                logits, new_state = net.apply({"params": p, **state}, xb, train=True, mutable=list(state))
            else:
                logits, new_state = net.apply({"params": p}, xb, train=True), {}
            return softmax_cross_entropy(logits, yb), new_state

        (loss, new_state), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), dict(new_state), opt, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(x), batch, replace=False)
        params, state, opt, loss = step(params, state, opt, x[idx], y[idx])
        losses.append(float(loss))
    logits = net.apply({"params": params, **state}, jnp.asarray(data.x_test), train=False)
    return np.array(losses), float(accuracy(logits, jnp.asarray(data.y_test)))


def assert_trains(losses, acc, min_acc=0.7):
    """Loss falls: the mean of the last 5 steps is under half the first step's (chance level is ln 10 = 2.30),
    and the model beats chance (10%) by far on held-out digits."""
    assert losses[-5:].mean() < 0.5 * losses[0], losses
    assert acc > min_acc, acc
