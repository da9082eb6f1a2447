"""SLAB's PRepBN (Guo et al. 2024): LN->RepBN blend schedule, NumPy reference, inference folding, sharding, training."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxmodels.layers import PRepBN, RepBN, fold_norm_affine, fold_repbn, prepbn_gamma

from .helpers import assert_sharded_matches

EPS = 1e-5


def _x(shape=(4, 6, 8), seed=0):
    return np.random.default_rng(seed).normal(0.5, 2.0, shape).astype(np.float32)


def _randomize(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + rng.normal(0, 0.3, np.shape(a)).astype(np.float32), params)


def test_gamma_schedule():
    g = np.asarray([prepbn_gamma(t, decay_steps=10, warmup=5) for t in (0, 4, 5, 10, 15, 100)])
    np.testing.assert_allclose(g, [1, 1, 1, 0.5, 0, 0], atol=1e-7)
    with pytest.raises(ValueError, match="decay_steps"):
        prepbn_gamma(0, 0)


def test_prepbn_matches_numpy_and_counts_steps():
    x = _x()
    m = PRepBN(decay_steps=4, eps=EPS)
    v = m.init(jax.random.key(0), x, use_running_average=False)
    p = _randomize(v["params"])
    stats = v["batch_stats"]
    xd = x.astype(np.float64)
    mu, var = xd.mean((0, 1)), xd.var((0, 1))
    ln = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + EPS)
    ln = ln * p["ln"]["scale"] + p["ln"]["bias"]
    r = p["repbn"]
    rep = (xd - mu) / np.sqrt(var + EPS) * r["scale"] + r["bias"] + r["eta"] * xd
    apply = jax.jit(functools.partial(m.apply, use_running_average=False, mutable=["batch_stats"]))
    for t in range(6):
        y, upd = apply({"params": p, "batch_stats": stats}, x)
        g = max(0.0, 1 - t / 4)
        np.testing.assert_allclose(y, g * ln + (1 - g) * rep, rtol=1e-5, atol=1e-4)  # float32 vs float64
        stats = upd["batch_stats"]
    assert int(stats["step"]) == 6
    # Explicit step overrides the counter.
    y, _ = m.apply({"params": p, "batch_stats": stats}, x, use_running_average=False, step=2,
                   mutable=["batch_stats"])
    np.testing.assert_allclose(y, 0.5 * ln + 0.5 * rep, rtol=1e-5, atol=1e-4)


def test_inference_folds_to_affine_and_into_dense():
    x = _x()
    m = PRepBN(decay_steps=4)
    v = m.init(jax.random.key(0), x, use_running_average=False)
    p = _randomize(v["params"])
    _, upd = m.apply({"params": p, **v}, x, use_running_average=False, mutable=["batch_stats"])
    y = m.apply({"params": p, **upd}, x, use_running_average=True)
    a, c = fold_repbn(p["repbn"], upd["batch_stats"]["repbn"])
    np.testing.assert_allclose(y, x * a + c, rtol=1e-5, atol=1e-5)
    # ... and into the following Dense: Dense(PRepBN(x)) == x W' + b'.
    dense = nn.Dense(5)
    dv = dense.init(jax.random.key(1), y)
    w2, b2 = fold_norm_affine(a, c, dv["params"]["kernel"], dv["params"]["bias"])
    np.testing.assert_allclose(dense.apply(dv, y), x @ w2 + b2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="RepBN sub-tree"):
        fold_repbn(p, upd["batch_stats"])


def test_sharded_equals_unsharded(mesh):
    x = _x((16, 6, 8))
    m = PRepBN(decay_steps=4)
    v = m.init(jax.random.key(0), x, use_running_average=False)
    fn = functools.partial(m.apply, v, use_running_average=False, mutable=["batch_stats"])
    assert_sharded_matches(fn, x, mesh, rtol=1e-4, atol=1e-4)


class _TokenNet(nn.Module):
    """Digits rows as 8 tokens -> Dense -> PRepBN -> relu -> flatten -> Dense(10)."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Dense(16)(x.reshape(x.shape[0], 8, 8))
        h = nn.relu(PRepBN(decay_steps=30)(h, use_running_average=not train))
        return nn.Dense(10)(h.reshape(x.shape[0], -1))


def test_trains_on_digits_and_ends_as_repbn():
    from .helpers import assert_trains, train_digits

    losses, acc = train_digits(_TokenNet(), steps=40, lr=1e-2)
    # After 30 of 40 steps gamma = 0: the eval-mode (pure RepBN, running stats) accuracy is the trained model's.
    assert_trains(losses, acc)
