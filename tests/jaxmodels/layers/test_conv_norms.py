"""EvoNorm-B0/S0, Batch-Channel Normalization, Weight Standardization (WSConv, reparam), IBN: NumPy references,
running statistics, jit, sharding, training."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.layers import (
    IBN,
    BatchChannelNorm,
    EvoNormB0,
    EvoNormS0,
    ReparamConv,
    ReparamDense,
    WSConv,
    weight_standardize,
)

from .helpers import Net, assert_sharded_matches, assert_trains, train_digits

# float32 layer vs float64 NumPy with O(1) values: ~1e-6 relative per op; 1e-5 / 1e-4 leave margin.
RTOL, ATOL = 1e-5, 1e-5
EPS = 1e-5


def _x(shape=(8, 5, 5, 16), seed=0):
    return np.random.default_rng(seed).normal(0.5, 2.0, shape).astype(np.float32)


def _randomize(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + rng.normal(0, 0.3, a.shape).astype(np.float32), params)


def np_sigmoid(a):
    return 1 / (1 + np.exp(-a))


def np_group_std(x, groups, eps=EPS):
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    std = np.sqrt(xg.var(axis=(1, 2, 4), keepdims=True) + eps)
    return np.broadcast_to(std, xg.shape).reshape(x.shape)


# ---------------------------------------------------------------- EvoNorm

def test_evonorm_b0_matches_numpy_train_and_eval():
    x = _x()
    m = EvoNormB0(momentum=0.9, eps=EPS)
    v = m.init(jax.random.key(0), x, use_running_average=False)
    p = _randomize(v["params"])
    y, upd = jax.jit(functools.partial(m.apply, mutable=["batch_stats"], use_running_average=False))(
        {"params": p, **{"batch_stats": v["batch_stats"]}}, x)
    xd = x.astype(np.float64)
    var_b = xd.var(axis=(0, 1, 2))
    inst = np.sqrt(xd.var(axis=(1, 2), keepdims=True) + EPS)
    ref = xd / np.maximum(np.sqrt(var_b + EPS), p["v"] * xd + inst) * p["scale"] + p["bias"]
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)
    ra = 0.9 * 1.0 + 0.1 * var_b
    np.testing.assert_allclose(upd["batch_stats"]["var"], ra, rtol=RTOL)
    # Inference uses the running variance.
    y_eval = m.apply({"params": p, **upd}, x, use_running_average=True)
    ref_eval = xd / np.maximum(np.sqrt(ra + EPS), p["v"] * xd + inst) * p["scale"] + p["bias"]
    np.testing.assert_allclose(y_eval, ref_eval, rtol=RTOL, atol=ATOL)


def test_evonorm_s0_matches_numpy():
    x = _x()
    m = EvoNormS0(groups=4, eps=EPS)
    p = _randomize(m.init(jax.random.key(0), x)["params"])
    y = jax.jit(m.apply)({"params": p}, x)
    xd = x.astype(np.float64)
    ref = xd * np_sigmoid(p["v"] * xd) / np_group_std(xd, 4) * p["scale"] + p["bias"]
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


def test_evonorm_s0_is_batch_independent():
    # S0 uses only per-sample statistics: a sample's output does not depend on the rest of the batch.
    x = _x()
    m = EvoNormS0(groups=4)
    v = m.init(jax.random.key(0), x)
    np.testing.assert_allclose(m.apply(v, x[2:3]), m.apply(v, x)[2:3], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- Batch-Channel Norm

@pytest.mark.parametrize("micro", [False, True])
def test_bcn_matches_numpy(micro):
    x = _x()
    m = BatchChannelNorm(groups=4, micro_batch=micro, rate=0.25, eps=EPS)
    v = m.init(jax.random.key(0), x, use_running_average=False)
    p = _randomize(v["params"])
    stats = {"mean": np.full(16, 0.2, np.float32), "var": np.full(16, 1.5, np.float32)}
    y, upd = jax.jit(functools.partial(m.apply, mutable=["batch_stats"], use_running_average=False))(
        {"params": p, "batch_stats": stats}, x)
    xd = x.astype(np.float64)
    mu, var = xd.mean((0, 1, 2)), xd.var((0, 1, 2))
    mu_hat = 0.2 + 0.25 * (mu - 0.2)
    var_hat = 1.5 + 0.25 * (((xd - 0.2) ** 2).mean((0, 1, 2)) - 1.5)  # EstBN: variance around the old estimate
    if micro:  # Algorithm 1: normalize with the just-updated estimates
        z = (xd - mu_hat) / np.sqrt(var_hat + EPS)
    else:  # large batch: BatchNorm with batch statistics
        z = (xd - mu) / np.sqrt(var + EPS)
    z = z * p["batch_scale"] + p["batch_bias"]
    zg = z.reshape(8, 5, 5, 4, 4)
    zg = (zg - zg.mean((1, 2, 4), keepdims=True)) / np.sqrt(zg.var((1, 2, 4), keepdims=True) + EPS)
    ref = (zg * p["channel_scale"][:, 0, None] + p["channel_bias"][:, 0, None]).reshape(x.shape)  # per group
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)  # two stacked normalizations: ~1e-5 error
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mu_hat, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var_hat, rtol=RTOL, atol=ATOL)


def test_bcn_micro_batch_gradient_does_not_flow_through_estimates():
    # With stop-gradient estimates the batch step is affine in x: d/dx sum(BN step) = gamma_b / sqrt(var_hat + eps).
    x = _x((2, 3, 3, 4))
    m = BatchChannelNorm(groups=1, micro_batch=True, rate=0.5)
    v = m.init(jax.random.key(0), x, use_running_average=False)
    f = lambda x: m.apply(v, x, use_running_average=False, mutable=["batch_stats"])[0]  # noqa: E731
    y, vjp = jax.vjp(f, jnp.asarray(x))
    assert np.isfinite(np.asarray(vjp(jnp.ones_like(y))[0])).all()


# ---------------------------------------------------------------- Weight Standardization

def test_weight_standardize_matches_numpy():
    w = _x((3, 3, 4, 6))
    ws = np.asarray(jax.jit(weight_standardize)(w))
    wd = w.astype(np.float64).reshape(-1, 6)
    ref = ((wd - wd.mean(0)) / np.sqrt(wd.var(0) + EPS)).reshape(w.shape)
    np.testing.assert_allclose(ws, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ws.reshape(-1, 6).mean(0), 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="kernel"):
        weight_standardize(jnp.ones(3))


def test_wsconv_equals_conv_with_standardized_kernel():
    x = _x((2, 6, 6, 3))
    m = WSConv(5, (3, 3), strides=(2, 2))
    v = m.init(jax.random.key(0), x)
    y = jax.jit(m.apply)(v, x)
    ps = {"kernel": weight_standardize(v["params"]["kernel"]), "bias": v["params"]["bias"]}
    ref = nn.Conv(5, (3, 3), strides=(2, 2)).apply({"params": ps}, x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)  # two conv implementations, same math
    # ReparamDense with the same transform works on Dense kernels.
    d = ReparamDense(4, transform=weight_standardize)
    xd = _x((3, 7))
    vd = d.init(jax.random.key(1), xd)
    np.testing.assert_allclose(d.apply(vd, xd), xd @ np.asarray(weight_standardize(vd["params"]["kernel"])),
                               rtol=1e-5, atol=1e-5)


def test_reparam_rejects_shape_changing_transform():
    with pytest.raises(ValueError, match="shape"):
        ReparamConv(4, transform=lambda w: w[..., :1]).init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))


# ---------------------------------------------------------------- IBN

def test_ibn_matches_numpy():
    x = _x()
    m = IBN(ratio=0.5, eps=EPS)
    v = m.init(jax.random.key(0), x, use_running_average=False)
    p = _randomize(v["params"])
    y, upd = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, use_running_average=False,
                     mutable=["batch_stats"])
    xd = x.astype(np.float64)
    a, b = xd[..., :8], xd[..., 8:]
    ya = (a - a.mean((1, 2), keepdims=True)) / np.sqrt(a.var((1, 2), keepdims=True) + EPS)
    ya = ya * p["in_scale"] + p["in_bias"]
    yb = (b - b.mean((0, 1, 2))) / np.sqrt(b.var((0, 1, 2)) + EPS) * p["bn"]["scale"] + p["bn"]["bias"]
    np.testing.assert_allclose(y, np.concatenate([ya, yb], -1), rtol=RTOL, atol=1e-4)
    assert not np.allclose(upd["batch_stats"]["bn"]["mean"], 0.0)
    # IN half is batch-independent: a single sample's IN channels are the same alone or in the batch.
    y1 = m.apply({"params": p, **upd}, x[:1], use_running_average=True)
    np.testing.assert_allclose(y1[..., :8], y[:1, ..., :8], rtol=RTOL, atol=1e-4)
    with pytest.raises(ValueError, match="ratio"):
        IBN(ratio=1.0).init(jax.random.key(0), x, use_running_average=False)


# ---------------------------------------------------------------- sharding and training

CASES = {
    "evonorm_b0": (lambda: EvoNormB0(), True),
    "evonorm_s0": (lambda: EvoNormS0(groups=4), False),
    "bcn": (lambda: BatchChannelNorm(groups=4), True),
    "bcn_micro": (lambda: BatchChannelNorm(groups=4, micro_batch=True), True),
    "ibn": (lambda: IBN(), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_unsharded(name, mesh):
    make, bs = CASES[name]
    m = make()
    x = _x((16, 4, 4, 16))
    kw = {"use_running_average": False} if bs else {}
    v = m.init(jax.random.key(0), x, **kw)
    fn = functools.partial(m.apply, v, mutable=["batch_stats"], **kw) if bs else functools.partial(m.apply, v)
    assert_sharded_matches(fn, x, mesh, rtol=1e-4, atol=1e-4)  # batch statistics reduced in another order


@pytest.mark.parametrize("name", list(CASES) + ["wsconv"])
def test_trains_on_digits(name):
    if name == "wsconv":
        class WSNet(nn.Module):
            @nn.compact
            def __call__(self, x, train=False):
                h = nn.relu(EvoNormS0(groups=4)(WSConv(16, (3, 3))(x)))
                return nn.Dense(10)(h.reshape(h.shape[0], -1))
        net = WSNet()
    else:
        make, bs = CASES[name]
        net = Net(make, images=True, batch_stats_norm=bs)
    losses, acc = train_digits(net, steps=40, lr=2e-2, images=True)
    assert_trains(losses, acc, min_acc=0.5)
