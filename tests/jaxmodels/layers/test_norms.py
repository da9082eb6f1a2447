"""LayerNorm, RMSNorm, CRMSNorm: NumPy references, jit, sharding, training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.layers import CRMSNorm, LayerNorm, RMSNorm

from .helpers import Net, assert_sharded_matches, assert_trains, train_digits

EPS = 1e-6
# float32 forward vs float64 NumPy: relative error ~1e-6 per op; 1e-5 leaves margin.
RTOL, ATOL = 1e-5, 1e-5


def np_layernorm(x, g, b, eps=EPS):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def np_rmsnorm(x, g, eps=EPS):
    x = x.astype(np.float64)
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * g


def _x(shape=(4, 5, 12), seed=0):
    return np.random.default_rng(seed).normal(1.0, 2.0, shape).astype(np.float32)


def _randomize(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + rng.normal(0, 0.5, a.shape).astype(np.float32), params)


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
def test_forward_matches_numpy(cls):
    x = _x()
    m = cls(EPS)
    p = _randomize(m.init(jax.random.key(0), x)["params"])
    y = jax.jit(m.apply)({"params": p}, x)
    ref = np_layernorm(x, p["scale"], p["bias"]) if cls is LayerNorm else np_rmsnorm(x, p["scale"])
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


def test_crmsnorm_is_rmsnorm_of_recovered_vector():
    # CRMSNorm(z) equals the first d-1 outputs of RMSNorm([z, -sum z]) computed independently in NumPy.
    z = _x((3, 7, 9))
    m = CRMSNorm(EPS)
    p = _randomize(m.init(jax.random.key(0), z)["params"])
    y = jax.jit(m.apply)({"params": p}, z)
    full = np.concatenate([z, -z.sum(-1, keepdims=True)], -1)
    ref = np_rmsnorm(full, np.append(p["scale"], 1.0))[..., :-1]
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


def test_bad_eps_rejected():
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(eps=-1.0).init(jax.random.key(0), _x())


def test_bf16_input_keeps_dtype():
    x = jnp.asarray(_x(), jnp.bfloat16)
    v = LayerNorm().init(jax.random.key(0), x)
    assert LayerNorm().apply(v, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm, CRMSNorm])
def test_sharded_equals_unsharded(cls, mesh):
    x = _x((16, 5, 12))
    m = cls()
    v = m.init(jax.random.key(0), x)
    assert_sharded_matches(functools.partial(m.apply, v), x, mesh)


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm, CRMSNorm])
def test_trains_on_digits(cls):
    losses, acc = train_digits(Net(cls), steps=40)
    assert_trains(losses, acc)


def test_invariances():
    # LayerNorm (no affine) is invariant to shifting and positive scaling of its input; RMSNorm and CRMSNorm to
    # positive scaling (Zhang & Sennrich's motivation: re-scaling invariance without re-centering).
    x = _x()
    ln, rms, crms = LayerNorm(use_scale=False, use_bias=False), RMSNorm(use_scale=False), CRMSNorm(use_scale=False)
    np.testing.assert_allclose(ln.apply({}, 3.0 * x + 5.0), ln.apply({}, x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rms.apply({}, 3.0 * x), rms.apply({}, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(crms.apply({}, 3.0 * x), crms.apply({}, x), rtol=1e-5, atol=1e-5)
    # RMSNorm output has unit RMS.
    np.testing.assert_allclose(np.sqrt((np.asarray(rms.apply({}, x)) ** 2).mean(-1)), 1.0, rtol=1e-4)
