"""Scaled weight standardization (NF-ResNets / NFNets; FedWon's WSConv): NumPy reference, the layers equal a plain
conv / dense on the standardized kernel, the learnable gain, signal propagation through a deep norm-free stack,
dtype, jit + sharded batch, bad input. The federated claim is in tests/merging/federated/test_fedwon.py."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.layers import WSConv, weight_standardize
from jaxmodels.layers.weight_standardization import (NF_GAINS, RELU_GAIN, ScaledWS, ScaledWSConv, ScaledWSDense,
                                                     scaled_weight_standardize)

from .helpers import assert_sharded_matches


def _reference(w, gain, gamma, eps=1e-4):
    w = np.asarray(w, np.float64)
    axes = tuple(range(w.ndim - 1))
    n = math.prod(w.shape[:-1])
    mu = w.mean(axes, keepdims=True)
    var = w.var(axes, keepdims=True)
    return gamma * np.asarray(gain, np.float64) * (w - mu) / np.sqrt(np.maximum(n * var, eps))


def test_matches_numpy_reference():
    rng = np.random.default_rng(0)
    w = rng.normal(0.3, 2.0, size=(3, 3, 4, 5)).astype(np.float32)
    gain = rng.uniform(0.5, 2, size=5).astype(np.float32)
    wb = jnp.asarray(w, jnp.bfloat16)

    @jax.jit
    def run(w, gain, wb):
        return (scaled_weight_standardize(w, gain, RELU_GAIN), scaled_weight_standardize(w), weight_standardize(w),
                scaled_weight_standardize(jnp.ones((4, 2))), scaled_weight_standardize(wb, gain, RELU_GAIN))

    out, plain, ws, const, ob = run(jnp.asarray(w), jnp.asarray(gain), wb)
    np.testing.assert_allclose(out, _reference(w, gain, RELU_GAIN), rtol=1e-5, atol=1e-6)
    # Each output column: mean 0 and sum of squares (gamma * g)^2, i.e. variance (gamma g)^2 / N over the fan-in.
    o = np.asarray(out, np.float64).reshape(-1, 5)
    np.testing.assert_allclose(o.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose((o ** 2).sum(0), (RELU_GAIN * gain) ** 2, rtol=1e-4)
    # No gain, gamma 1: plain WS divided by sqrt(N) = 6 (the eps floors differ: max(N var, eps) vs var + eps).
    np.testing.assert_allclose(plain, np.asarray(ws) / 6.0, rtol=1e-4, atol=1e-6)
    # The eps floor: a constant column gives zeros, not NaN.
    assert np.all(np.asarray(const) == 0)
    # bf16 kernels: float32 statistics, bf16 result.
    assert ob.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ob, np.float32), _reference(np.asarray(wb, np.float32), gain, RELU_GAIN),
                               rtol=2e-2, atol=2e-2)
    assert abs(NF_GAINS["relu"] - RELU_GAIN) < 2e-3  # the reference code's empirical gain ~ the analytic one


def test_layers_equal_plain_layers_on_the_standardized_kernel():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    conv = ScaledWSConv(4, (3, 3), gamma=2.0)
    v = jax.jit(conv.init)(jax.random.key(0), x)
    assert set(v["params"]) == {"kernel", "bias", "transform"} and v["params"]["transform"]["gain"].shape == (4,)
    p = jax.tree.map(np.asarray, v["params"])
    p["transform"]["gain"] = rng.uniform(0.5, 2, 4).astype(np.float32)
    p["bias"] = rng.normal(size=4).astype(np.float32)
    kernel = _reference(p["kernel"], p["transform"]["gain"], 2.0).astype(np.float32)
    dense = ScaledWSDense(5, use_gain=False)
    xd = rng.normal(size=(3, 7)).astype(np.float32)
    vd = jax.jit(dense.init)(jax.random.key(1), xd)
    assert set(vd["params"]) == {"kernel", "bias"}  # use_gain=False: no parameter

    @jax.jit
    def run(p, pd):
        plain = nn.Conv(4, (3, 3)).apply({"params": {"kernel": kernel, "bias": p["bias"]}}, x)
        return (conv.apply({"params": p}, x), plain,
                dense.apply({"params": pd}, xd), jax.grad(lambda g: conv.apply(
                    {"params": {**p, "transform": {"gain": g}}}, x).sum())(p["transform"]["gain"]))

    y, ref, yd, g_gain = run(p, vd["params"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    kd = _reference(vd["params"]["kernel"], 1.0, 1.0)
    np.testing.assert_allclose(yd, xd @ kd + np.asarray(vd["params"]["bias"]), rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(np.asarray(g_gain)) > 0)  # the gain is learned
    # A transform given explicitly replaces the default scaled WS (here plain WS: the WSConv layer).
    y_ws = WSConv(4).apply({"params": {"kernel": p["kernel"], "bias": p["bias"]}}, x)
    y_ws2 = ScaledWSConv(4, transform=weight_standardize).apply({"params": {"kernel": p["kernel"],
                                                                            "bias": p["bias"]}}, x)
    np.testing.assert_allclose(y_ws, y_ws2, rtol=1e-5, atol=1e-5)


def test_signal_propagation_without_normalization():
    """Brock et al. 2021a: with the ReLU gain a deep scaled-WS ReLU stack keeps the variance of its unit-variance input
    (zero-mean weights cancel the ReLU's mean shift, gamma^2 = 2 / (1 - 1/pi) undoes the ReLU's variance loss);
    without the gain (gamma = 1) the variance shrinks by (1 - 1/pi) / 2 = 0.34 per layer (~2e-4 after 8)."""
    x = jax.random.normal(jax.random.key(0), (256, 128))
    kernels = jax.random.normal(jax.random.key(1), (8, 128, 128)) * 0.3 + 0.1  # any scale and mean

    @jax.jit
    def deep(x, kernels):
        out = []
        for gamma in (RELU_GAIN, 1.0):
            h = x
            for w in kernels:
                h = jax.nn.relu(h @ scaled_weight_standardize(w, gamma=gamma))
            out.append(jnp.mean(jnp.var(h, 0)))
        return out

    with_gain, without = map(float, deep(x, kernels))
    assert 0.7 < with_gain < 1.4, with_gain  # measured 1.091
    assert without < 0.01, without  # measured 2.0e-4


def test_sharded_batch_equals_single_device(mesh):
    x = jax.random.normal(jax.random.key(0), (16, 6, 6, 3))
    m = ScaledWSConv(4, gamma=RELU_GAIN)
    v = jax.jit(m.init)(jax.random.key(1), x)
    assert_sharded_matches(functools.partial(m.apply, v), x, mesh, rtol=1e-5, atol=1e-5)


def test_bad_input_rejected():
    w = jnp.ones((3, 4))
    with pytest.raises(ValueError, match=">= 2 axes"):
        scaled_weight_standardize(jnp.ones(4))
    with pytest.raises(ValueError, match="eps must be > 0"):
        scaled_weight_standardize(w, eps=0.0)
    with pytest.raises(ValueError, match="gamma must be a positive number"):
        scaled_weight_standardize(w, gamma=-1.0)
    with pytest.raises(ValueError, match="gain must be a scalar or have shape"):
        scaled_weight_standardize(w, jnp.ones(3))
    with pytest.raises(ValueError, match="gamma"):
        ScaledWS(gamma=0.0).init(jax.random.key(0), w)
