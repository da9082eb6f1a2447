"""Unified Normalization (Yang et al. 2022): GM-smoothed statistics, smoothed backward, outlier filtration,
folding into the preceding Dense, sharding, training."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels.datasets import load_digits_split
from jaxmodels.layers import UnifiedNorm, apply_grad_stats, fold_un_into_dense
from jaxmodels.train import accuracy, softmax_cross_entropy

from .helpers import assert_sharded_matches

EPS, MOM, M = 1e-5, 0.8, 3


class NumpyUN:
    """The paper's equations (no outlier filtration), written independently in float64."""

    def __init__(self, c):
        self.var = np.ones(c)
        self.win = np.ones((M, c))
        self.psi = np.zeros(c)
        self.gwin = np.zeros((M, c))
        self.t = 0

    def step(self, x, gamma, beta, dy):
        self.t += 1
        pos = self.t % M
        s2 = (x ** 2).mean((0, 1))
        self.win[pos] = s2
        smooth = self.t > M
        var = np.exp(np.log(self.win).mean(0)) if smooth else s2
        z = x / np.sqrt(var + EPS)
        y = gamma * z + beta
        self.var = MOM * self.var + (1 - MOM) * var
        dz = gamma * dy
        g = (dz * z).mean((0, 1))
        self.gwin[pos] = g
        self.psi = MOM * self.psi + (1 - MOM) * (self.gwin.mean(0) if smooth else g)
        dx = (dz - self.psi * z) / np.sqrt(var + EPS)
        return y, dx


def _batches(n, shape=(4, 5, 6), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0.2, rng.uniform(0.5, 2.0), shape).astype(np.float32) for _ in range(n)]


def _step_fn(m):
    def step(p, bs, gs, x, dy):
        def f(x, gs):
            y, upd = m.apply({"params": p, "batch_stats": bs, "grad_stats": gs}, x, use_running_average=False,
                             mutable=["batch_stats"])
            return (y * dy).sum(), (y, upd["batch_stats"])
        (_, (y, bs2)), (dx, dgs) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, gs)
        return y, dx, bs2, apply_grad_stats(gs, dgs)
    return jax.jit(step)


def test_forward_backward_and_state_match_numpy_over_steps():
    m = UnifiedNorm(window=M, warmup_steps=0, momentum=MOM, eps=EPS)
    xs = _batches(7)
    v = m.init(jax.random.key(0), xs[0], use_running_average=False)
    rng = np.random.default_rng(1)
    p = {"scale": rng.uniform(0.5, 1.5, 6).astype(np.float32), "bias": rng.normal(0, 0.5, 6).astype(np.float32)}
    bs, gs = v["batch_stats"], v["grad_stats"]
    ref = NumpyUN(6)
    step = _step_fn(m)
    for t, x in enumerate(xs):
        dy = rng.normal(size=x.shape).astype(np.float32)
        y, dx, bs, gs = step(p, bs, gs, x, dy)
        ry, rdx = ref.step(x.astype(np.float64), p["scale"], p["bias"], dy)
        # float32 vs float64 through a few steps of running statistics: 1e-4 relative.
        np.testing.assert_allclose(y, ry, rtol=1e-4, atol=1e-4, err_msg=f"step {t}")
        np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4, err_msg=f"step {t}")
        np.testing.assert_allclose(bs["var"], ref.var, rtol=1e-4)
        np.testing.assert_allclose(gs["psi"], ref.psi, rtol=1e-4, atol=1e-6)
    assert int(bs["step"]) == 7 and int(bs["skipped"]) == 0
    # Inference uses the running statistic.
    ye = m.apply({"params": p, "batch_stats": bs, "grad_stats": gs}, xs[0], use_running_average=True)
    np.testing.assert_allclose(ye, p["scale"] * xs[0] / np.sqrt(ref.var + EPS) + p["bias"], rtol=1e-4, atol=1e-4)


def test_outlier_filtration_skips_an_outlier_batch():
    m = UnifiedNorm(window=M, warmup_steps=0, momentum=MOM, outlier_filtration=True)
    xs = _batches(6)
    v = m.init(jax.random.key(0), xs[0], use_running_average=False)
    p, bs, gs = v["params"], v["batch_stats"], v["grad_stats"]
    step = _step_fn(m)
    rng = np.random.default_rng(2)
    stable = [np.random.default_rng(10 + i).normal(0, 1.0, (4, 5, 6)).astype(np.float32) for i in range(6)]
    for x in stable:
        _, _, bs, gs = step(p, bs, gs, x, np.ones_like(x))
    n_before = int(bs["skipped"])
    var_before, win_before = np.asarray(bs["var"]), np.asarray(bs["window"])
    outlier = (100.0 * rng.normal(size=(4, 5, 6))).astype(np.float32)
    y, _, bs, gs = step(p, bs, gs, outlier, np.ones_like(outlier))
    assert int(bs["skipped"]) == n_before + 1
    # Skipped: normalized with its own statistic (unit quadratic mean), and the window stores the running var.
    np.testing.assert_allclose((np.asarray(y) ** 2).mean((0, 1)), 1.0, rtol=1e-3)
    pos = int(bs["step"]) % M
    np.testing.assert_allclose(bs["window"][pos], var_before, rtol=1e-6)
    assert np.asarray(bs["window"]).max() < 10 * win_before.max()
    # Without filtration the same outlier enters the window.
    m2 = UnifiedNorm(window=M, warmup_steps=0, momentum=MOM)
    step2 = _step_fn(m2)
    bs2, gs2 = v["batch_stats"], v["grad_stats"]
    for x in stable:
        _, _, bs2, gs2 = step2(p, bs2, gs2, x, np.ones_like(x))
    _, _, bs2, _ = step2(p, bs2, gs2, outlier, np.ones_like(outlier))
    assert np.asarray(bs2["window"]).max() > 1000


def test_fold_into_preceding_dense():
    x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)

    class DenseUN(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return UnifiedNorm(window=2, warmup_steps=0)(nn.Dense(6)(x), use_running_average=not train)

    net = DenseUN()
    v = net.init(jax.random.key(0), x)
    for _ in range(3):  # move the running statistics away from their init
        _, upd = net.apply(v, x * 3.0, train=True, mutable=["batch_stats"])
        v = {**v, **upd}
    rng = np.random.default_rng(1)
    v["params"] = jax.tree.map(lambda a: a + rng.normal(0, 0.3, a.shape).astype(np.float32), v["params"])
    y = net.apply(v, x)
    d, un = v["params"]["Dense_0"], v["params"]["UnifiedNorm_0"]
    w2, b2 = fold_un_into_dense(d["kernel"], d["bias"], un, v["batch_stats"]["UnifiedNorm_0"])
    np.testing.assert_allclose(y, x @ w2 + b2, rtol=1e-5, atol=1e-5)  # same affine map, re-associated
    with pytest.raises(ValueError, match="channels"):
        fold_un_into_dense(d["kernel"][:, :3], d["bias"], un, v["batch_stats"]["UnifiedNorm_0"])


def test_bad_hyperparameters_rejected():
    with pytest.raises(ValueError, match="window"):
        UnifiedNorm(window=0).init(jax.random.key(0), jnp.ones((2, 3, 4)), use_running_average=False)


def test_sharded_equals_unsharded(mesh):
    m = UnifiedNorm(window=2, warmup_steps=0, outlier_filtration=True)
    x = _batches(1, (16, 5, 6))[0]
    v = m.init(jax.random.key(0), x, use_running_average=False)

    def fwd_bwd(x):
        def loss(x, gs):
            y, upd = m.apply({**v, "grad_stats": gs}, x, use_running_average=False, mutable=["batch_stats"])
            return jnp.sin(y).sum(), upd
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, v["grad_stats"])

    assert_sharded_matches(fwd_bwd, x, mesh, rtol=1e-4, atol=1e-4)


def test_trains_on_digits():
    data = load_digits_split()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    class TokenNet(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.Dense(16)(x.reshape(x.shape[0], 8, 8))
            h = nn.relu(UnifiedNorm(window=4, warmup_steps=10, outlier_filtration=True)(
                h, use_running_average=not train))
            return nn.Dense(10)(h.reshape(x.shape[0], -1))

    net = TokenNet()
    v = net.init(jax.random.key(0), x[:8])
    params, bs, gs = v["params"], v["batch_stats"], v["grad_stats"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, bs, gs, opt, xb, yb):
        def loss_fn(p, g):
            logits, upd = net.apply({"params": p, "batch_stats": bs, "grad_stats": g}, xb, train=True,
                                    mutable=["batch_stats"])
            return softmax_cross_entropy(logits, yb), upd["batch_stats"]
        (loss, bs), (gp, dgs) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, gs)
        u, opt = tx.update(gp, opt, params)
        return optax.apply_updates(params, u), bs, apply_grad_stats(gs, dgs), opt, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        idx = rng.choice(len(x), 128, replace=False)
        params, bs, gs, opt, loss = step(params, bs, gs, opt, x[idx], y[idx])
        losses.append(float(loss))
    losses = np.array(losses)
    acc = float(accuracy(net.apply({"params": params, "batch_stats": bs, "grad_stats": gs},
                                   jnp.asarray(data.x_test)), jnp.asarray(data.y_test)))
    # Loss below half its start; held-out accuracy with the folded-able running statistics far above chance.
    assert losses[-5:].mean() < 0.5 * losses[0], losses
    assert acc > 0.7, acc
