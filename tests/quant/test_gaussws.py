"""GaussWS (Ahn & Yoo 2025): rounded-normal noise R = round(N(0,1)/2), fake quantization cast(W + R Delta)."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from jaxmodels.datasets import load_digits_split
from quant import gaussws
from quant.gaussws import R_VARIANCE, block_absmax, gaussws_fake_quant, rounded_normal, rounded_normal_pmf


def _phi(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_rounded_normal_matches_numpy_reference_and_stated_distribution():
    key = jax.random.key(0)
    r = np.asarray(rounded_normal(key, (1000, 1000)))
    # NumPy reference from the same standard normal draws
    z = np.asarray(jax.random.normal(key, (1000, 1000), jnp.float32))
    np.testing.assert_array_equal(r, np.round(z / 2.0))
    assert np.all(r == np.round(r))
    # P(R = k) = Phi(2k+1) - Phi(2k-1): 0.6827 / 0.1573 / 0.00135
    for k in range(-3, 4):
        ref = _phi(2 * k + 1) - _phi(2 * k - 1)
        assert rounded_normal_pmf(k) == pytest.approx(ref, rel=1e-9, abs=1e-15)
        assert np.mean(r == k) == pytest.approx(ref, abs=4 * math.sqrt(ref * (1 - ref) / r.size) + 2e-6)
    assert rounded_normal_pmf(0) == pytest.approx(math.erf(1 / math.sqrt(2)), rel=1e-12)
    assert R_VARIANCE == pytest.approx(2 * sum(k * k * (_phi(2 * k + 1) - _phi(2 * k - 1)) for k in range(1, 7)))
    assert R_VARIANCE == pytest.approx(0.32541, abs=1e-5)
    assert r.mean() == pytest.approx(0.0, abs=4 * math.sqrt(R_VARIANCE / r.size))
    assert r.var() == pytest.approx(R_VARIANCE, rel=0.01)
    assert rounded_normal(key, (3,), jnp.bfloat16).dtype == jnp.bfloat16


def test_block_absmax_reference():
    w = jax.random.normal(jax.random.key(1), (64, 5))
    m = np.asarray(block_absmax(w, 32))
    wn = np.abs(np.asarray(w)).reshape(2, 32, 5).max(1)
    np.testing.assert_array_equal(m, np.repeat(wn, 32, axis=0))
    # other axis, conv kernel [kh, kw, in, out], 1-D
    c = jax.random.normal(jax.random.key(2), (3, 3, 16, 8))
    mc = np.asarray(block_absmax(c, 4, axis=-1))
    np.testing.assert_array_equal(mc, np.repeat(np.abs(np.asarray(c)).reshape(3, 3, 16, 2, 4).max(-1), 4, axis=-1))
    v = jnp.arange(-4.0, 4.0)
    np.testing.assert_array_equal(np.asarray(block_absmax(v, 4)), [4, 4, 4, 4, 3, 3, 3, 3])
    with pytest.raises(ValueError, match="multiple"):
        block_absmax(w, 24)
    with pytest.raises(ValueError, match="block_size"):
        block_absmax(w, 0)


def test_fake_quant_is_an_addition_then_a_cast():
    key = jax.random.key(3)
    w = jax.random.normal(jax.random.key(4), (64, 16)) * 0.1
    step = block_absmax(w, 32) * 2.0 ** -3
    y = gaussws_fake_quant(w, key, step)
    assert y.dtype == jnp.bfloat16 and y.shape == w.shape
    # NumPy reference: float32 addition, then round-to-nearest-even cast to BF16 (ml_dtypes)
    r = np.round(np.asarray(jax.random.normal(key, w.shape, jnp.float32)) / 2.0).astype(np.float32)
    ref = (np.asarray(w) + r * np.asarray(step)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint16), ref.view(np.uint16))
    # jit gives the same, any float target dtype works, step 0 is a plain cast
    np.testing.assert_array_equal(np.asarray(jax.jit(gaussws_fake_quant)(w, key, step)), np.asarray(y))
    assert gaussws_fake_quant(w, key, step, jnp.float32).dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(gaussws_fake_quant(w, key, 0.0)), np.asarray(w.astype(jnp.bfloat16)))
    # the noise is on the step grid: (W_hat - W) / Delta is R (up to the BF16 cast) and ~68% of entries are unmoved
    big = jnp.full((256, 256), 1.0)
    d = np.asarray(gaussws_fake_quant(big, key, 0.25, jnp.float32)) - 1.0
    np.testing.assert_array_equal(d / 0.25, np.round(np.asarray(jax.random.normal(key, big.shape)) / 2.0))
    assert np.mean(d == 0) == pytest.approx(0.6827, abs=0.01)
    assert np.mean(d ** 2) == pytest.approx(0.25 ** 2 * R_VARIANCE, rel=0.03)
    # gradient: identity through the addition and the cast (Delta held fixed)
    g = jax.grad(lambda w: gaussws_fake_quant(w, key, jax.lax.stop_gradient(step)).astype(jnp.float32).sum())(w)
    np.testing.assert_array_equal(np.asarray(g), np.ones(w.shape, np.float32))


def test_invalid_arguments_raise():
    w = jnp.ones((32, 4))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="dtype"):
        gaussws_fake_quant(w, key, 0.1, jnp.int8)
    with pytest.raises(ValueError, match="floating"):
        gaussws_fake_quant(jnp.ones((32, 4), jnp.int32), key, 0.1)
    with pytest.raises(ValueError, match="broadcast"):
        gaussws_fake_quant(w, key, jnp.ones((3,)))
    with pytest.raises(ValueError, match="broadcast"):
        gaussws_fake_quant(w, key, jnp.ones((2, 32, 4)))
    with pytest.raises(ValueError, match="dtype"):
        rounded_normal(key, (2,), jnp.int32)
    assert "gaussws_fake_quant" in gaussws.__all__


def _train(use_gaussws: bool, bits: int = 4, steps: int = 300, seed: int = 0):
    d = load_digits_split()
    xtr, ytr = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    xte, yte = jnp.asarray(d.x_test), jnp.asarray(d.y_test)
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w1": jax.random.normal(k1, (64, 128)) / 8.0, "b1": jnp.zeros(128),
              "w2": jax.random.normal(k2, (128, 10)) / math.sqrt(128), "b2": jnp.zeros(10)}

    def weights(p, key):
        if not use_gaussws:  # BF16 baseline: the same cast, no noise
            return p["w1"].astype(jnp.bfloat16), p["w2"].astype(jnp.bfloat16)
        ka, kb = jax.random.split(key)
        # test's choice of Delta (the paper's exact map is not public to us): step of a symmetric `bits`-bit grid
        # over 32-element blocks of the reduction axis
        s1 = block_absmax(p["w1"], 32) * 2.0 ** (1 - bits)
        s2 = block_absmax(p["w2"], 32) * 2.0 ** (1 - bits)
        return gaussws_fake_quant(p["w1"], ka, s1), gaussws_fake_quant(p["w2"], kb, s2)

    def logits(p, x, w1, w2):
        h = jax.nn.relu(jnp.dot(x.astype(jnp.bfloat16), w1).astype(jnp.float32) + p["b1"])
        return jnp.dot(h.astype(jnp.bfloat16), w2).astype(jnp.float32) + p["b2"]

    def loss(p, key):
        w1, w2 = weights(p, key)
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, xtr, w1, w2), ytr).mean()

    opt = optax.adam(3e-3)

    def step(carry, key):
        p, s = carry
        l, g = jax.value_and_grad(loss)(p, key)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), l

    keys = jax.random.split(jax.random.key(seed + 100), steps)
    (params, _), losses = jax.jit(lambda p, k: jax.lax.scan(step, (p, opt.init(p)), k))(params, keys)
    l = losses[-1]
    w1, w2 = params["w1"].astype(jnp.bfloat16), params["w2"].astype(jnp.bfloat16)  # evaluate without noise
    acc = float(jnp.mean(jnp.argmax(logits(params, xte, w1, w2), -1) == yte))
    return acc, float(l)


def test_gaussws_training_tracks_bf16_baseline_on_digits():
    """PQT with 4-bit-sized GaussWS noise on both kernels ends within 2 points of the BF16 baseline's test accuracy."""
    acc_base, loss_base = _train(False)
    acc_pqt, loss_pqt = _train(True)
    assert acc_base > 0.95
    assert acc_pqt > 0.95
    assert abs(acc_pqt - acc_base) <= 0.02, (acc_base, acc_pqt)
    assert loss_pqt < 0.1 and loss_base < 0.1, (loss_base, loss_pqt)
