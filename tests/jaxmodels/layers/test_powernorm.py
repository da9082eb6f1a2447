"""PowerNorm (Shen et al. 2020): forward with running quadratic mean, approximate backward vs the paper's formula,
running statistics, sharding, training."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels.datasets import load_digits_split
from jaxmodels.layers import PowerNorm, apply_grad_stats
from jaxmodels.train import accuracy, softmax_cross_entropy

from .helpers import assert_sharded_matches

EPS = 1e-5


def _x(shape=(4, 6, 8), seed=0):
    return np.random.default_rng(seed).normal(0.3, 2.0, shape).astype(np.float32)


def _setup(seed=0):
    x = _x(seed=seed)
    m = PowerNorm(alpha_fwd=0.8, alpha_bkw=0.7, eps=EPS)
    v = m.init(jax.random.key(0), x, use_running_average=False)
    rng = np.random.default_rng(seed + 1)
    params = jax.tree.map(lambda a: a + rng.normal(0, 0.3, a.shape).astype(np.float32), v["params"])
    stats = {"psi2": rng.uniform(0.5, 3.0, 8).astype(np.float32)}
    gstats = {"nu": rng.normal(0, 0.1, 8).astype(np.float32)}
    return m, x, params, stats, gstats


def test_forward_and_running_stats_match_numpy():
    m, x, p, stats, gstats = _setup()
    y, upd = jax.jit(functools.partial(m.apply, use_running_average=False, mutable=["batch_stats"]))(
        {"params": p, "batch_stats": stats, "grad_stats": gstats}, x)
    xd = x.astype(np.float64)
    ref = p["scale"] * xd / np.sqrt(stats["psi2"] + EPS) + p["bias"]  # uses psi_{t-1}, not the batch statistic
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    psi2_new = 0.8 * stats["psi2"] + 0.2 * (xd ** 2).mean((0, 1))
    np.testing.assert_allclose(upd["batch_stats"]["psi2"], psi2_new, rtol=1e-5)
    y_eval = m.apply({"params": p, **upd, "grad_stats": gstats}, x, use_running_average=True)
    np.testing.assert_allclose(y_eval, p["scale"] * xd / np.sqrt(psi2_new + EPS) + p["bias"], rtol=1e-5, atol=1e-5)


def test_backward_matches_paper_formula():
    m, x, p, stats, gstats = _setup(3)
    gy = np.random.default_rng(9).normal(size=x.shape).astype(np.float32)

    def loss(x, p, gs):
        y, _ = m.apply({"params": p, "batch_stats": stats, "grad_stats": gs}, x, use_running_average=False,
                       mutable=["batch_stats"])
        return (y * gy).sum()  # dL/dy = gy

    gx, gp, gnu = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(x), p, gstats)
    xd, gyd = x.astype(np.float64), gy.astype(np.float64)
    psi = np.sqrt(stats["psi2"] + EPS)
    x_hat = xd / psi
    g_hat = p["scale"] * gyd
    nu = gstats["nu"]
    ref_gx = (g_hat - nu * x_hat) / psi
    gamma_b = (x_hat ** 2).mean((0, 1))
    lambda_b = (g_hat * x_hat).mean((0, 1))
    ref_nu = nu * (1 - 0.3 * gamma_b) + 0.3 * lambda_b
    # float32 vs float64 on O(1) values.
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(apply_grad_stats(gstats, gnu)["nu"], ref_nu, rtol=1e-4, atol=1e-6)
    # gamma/beta gradients are exact.
    np.testing.assert_allclose(gp["scale"], (gyd * x_hat).sum((0, 1)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gp["bias"], gyd.sum((0, 1)), rtol=1e-4, atol=1e-5)
    # The approximate gradient differs from the exact one of this forward (which ignores nu): nu != 0 matters.
    assert np.abs(ref_gx - g_hat / psi).max() > 1e-3


def test_bad_hyperparameters_rejected():
    with pytest.raises(ValueError, match="alpha_bkw"):
        PowerNorm(alpha_bkw=1.0).init(jax.random.key(0), _x(), use_running_average=False)
    with pytest.raises(ValueError, match="mismatch|differ|structure|keys|path"):
        apply_grad_stats({"nu": jnp.zeros(3)}, {"mu": jnp.zeros(3)})


def test_sharded_equals_unsharded(mesh):
    m, _, p, stats, gstats = _setup()
    x = _x((16, 6, 8))

    def fwd_bwd(x):
        def loss(x, gs):
            y, upd = m.apply({"params": p, "batch_stats": stats, "grad_stats": gs}, x, use_running_average=False,
                             mutable=["batch_stats"])
            return jnp.sin(y).sum(), upd
        (l, upd), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, gstats)
        return l, upd, g

    assert_sharded_matches(fwd_bwd, x, mesh, rtol=1e-4, atol=1e-4)


class _TokenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Dense(16)(x.reshape(x.shape[0], 8, 8))
        h = nn.relu(PowerNorm()(h, use_running_average=not train))
        return nn.Dense(10)(h.reshape(x.shape[0], -1))


def test_trains_on_digits():
    data = load_digits_split()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    net = _TokenNet()
    v = net.init(jax.random.key(0), x[:8])
    params, stats, gstats = v["params"], v["batch_stats"], v["grad_stats"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, gstats, opt, xb, yb):
        def loss_fn(p, gs):
            logits, upd = net.apply({"params": p, "batch_stats": stats, "grad_stats": gs}, xb, train=True,
                                    mutable=["batch_stats"])
            return softmax_cross_entropy(logits, yb), upd

        (loss, upd), (g, gnu) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, gstats)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), upd["batch_stats"], apply_grad_stats(gstats, gnu), opt, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        idx = rng.choice(len(x), 128, replace=False)
        params, stats, gstats, opt, loss = step(params, stats, gstats, opt, x[idx], y[idx])
        losses.append(float(loss))
    logits = net.apply({"params": params, "batch_stats": stats, "grad_stats": gstats}, jnp.asarray(data.x_test))
    acc = float(accuracy(logits, jnp.asarray(data.y_test)))
    losses = np.array(losses)
    # Loss falls below half its initial value; held-out accuracy (running statistics) far above chance (10%).
    assert losses[-5:].mean() < 0.5 * losses[0], losses
    assert acc > 0.7, acc
    assert np.abs(np.asarray(gstats["PowerNorm_0"]["nu"])).max() > 0  # the backward statistic was updated
