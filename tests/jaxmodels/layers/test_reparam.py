"""ReparamDense / ReparamConv: any parameter transform (plain function or a linen module with learnable
hyper-parameters) on any Dense/Conv kernel; jit, sharding, training."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.layers import ReparamConv, ReparamDense, weight_standardize

from .helpers import assert_sharded_matches, assert_trains, train_digits


class LearnableGain(nn.Module):
    """A transform with its own parameter, standing in for any learnable reparameterization: W' = softplus(a) W."""

    @nn.compact
    def __call__(self, w):
        a = self.param("a", nn.initializers.constant(0.5), ())
        return jax.nn.softplus(a) * w


def test_dense_equals_plain_dense_with_transformed_kernel():
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    m = ReparamDense(5, transform=lambda w: jnp.tanh(w))
    v = m.init(jax.random.key(0), x)
    y = jax.jit(m.apply)(v, x)
    ref = x @ np.tanh(np.asarray(v["params"]["kernel"], np.float64)) + np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # No transform is a plain Dense.
    m0 = ReparamDense(5)
    np.testing.assert_allclose(m0.apply(v, x), nn.Dense(5).apply(v, x), rtol=1e-6, atol=1e-6)


def test_conv_equals_flax_conv():
    x = np.random.default_rng(1).normal(size=(2, 7, 7, 3)).astype(np.float32)
    for padding, strides in (("SAME", (1, 1)), ("VALID", (2, 2))):
        m = ReparamConv(4, (3, 3), strides=strides, padding=padding)
        v = m.init(jax.random.key(0), x)
        ref = nn.Conv(4, (3, 3), strides=strides, padding=padding).apply(v, x)
        np.testing.assert_allclose(jax.jit(m.apply)(v, x), ref, rtol=1e-5, atol=1e-5)


def test_module_transform_params_are_learned():
    x = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
    m = ReparamDense(3, transform=LearnableGain())
    v = m.init(jax.random.key(0), x)
    assert "a" in v["params"]["transform"]
    g = jax.grad(lambda p: m.apply({"params": p}, x).sum())(v["params"])
    assert abs(float(g["transform"]["a"])) > 0
    y = m.apply(v, x)
    ref = x @ (np.log1p(np.exp(0.5)) * np.asarray(v["params"]["kernel"])) + np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_bad_transform_rejected():
    with pytest.raises(TypeError, match="callable"):
        ReparamDense(3, transform=3).init(jax.random.key(0), jnp.ones((1, 2)))


def test_sharded_equals_unsharded(mesh):
    x = jax.random.normal(jax.random.key(0), (16, 6, 6, 3))
    m = ReparamConv(4, transform=weight_standardize)
    v = m.init(jax.random.key(1), x)
    assert_sharded_matches(functools.partial(m.apply, v), x, mesh, rtol=1e-5, atol=1e-5)


class _WSNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(ReparamDense(32, transform=weight_standardize)(x))
        return ReparamDense(10, transform=LearnableGain())(h)


def test_trains_on_digits():
    losses, acc = train_digits(_WSNet(), steps=40)
    assert_trains(losses, acc)


def test_reparameterize_tree_exports_plain_dense_and_keeps_sharding(mesh_2d):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxmodels.layers import reparameterize_tree

    x = np.random.default_rng(3).normal(size=(8, 64)).astype(np.float32)

    class WS(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(ReparamDense(32, transform=weight_standardize)(x))
            return ReparamDense(10, transform=weight_standardize)(h)

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(32, name="ReparamDense_0")(x))
            return nn.Dense(10, name="ReparamDense_1")(h)

    p = WS().init(jax.random.key(0), x)["params"]
    before = jax.tree.map(np.array, p)
    plain = reparameterize_tree(p, weight_standardize)
    np.testing.assert_allclose(Plain().apply({"params": plain}, x), WS().apply({"params": p}, x), rtol=1e-5,
                               atol=1e-5)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(p)):  # input not modified
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(plain["ReparamDense_0"]["bias"], p["ReparamDense_0"]["bias"])  # bias untouched
    # Tensor-parallel kernels (output axis over "model"): standardization is per output column, same result.
    shard = {k: {"kernel": NamedSharding(mesh_2d, P(None, "model")), "bias": NamedSharding(mesh_2d, P())}
             for k in p}
    sp = jax.device_put(p, shard)
    out = jax.jit(functools.partial(reparameterize_tree, transform=weight_standardize))(sp)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="callable"):
        reparameterize_tree(p, None)
