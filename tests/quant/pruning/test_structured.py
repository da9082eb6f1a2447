"""quant.pruning.structured: NumPy references of the k-support / sparse-envelope value and prox (Argyriou et al.
2012), filter norms and kept channels, masking == removal on a BN CNN and a ResNet, FLOP counts, sharded ==
single device, bad input rejected, and the claims on digits: GSEF proximal training converges to k active neurons
with negligible accuracy loss; PAGCP keeps its loss bound and removes more FLOPs than uniform per-layer pruning at
the same accuracy drop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.datasets import load_digits_split
from jaxmodels.models import MLP, ResNet
from merging.federated.fedwon import DomainCNN
from quant.pruning.k_level import (
    group_norms, gsef_prox, gsef_proximal, gsef_value, k_level_project, sef_prox, sef_value,
)
from quant.pruning.structured import (
    ChannelGroup, PAGCPConfig, count_flops, filter_norms, keep_mask, mask_channels, mask_groups, pagcp, pagcp_decay,
    remove_channels, resnet_channel_groups, sequential_channel_groups, uniform_prune,
)

# ------------------------------------------------------------------------------------------------ references


def _np_ksupport_sq(x, k):
    """Argyriou, Foygel & Srebro 2012, Prop. 2.1: ‖x‖²_(k) with the unique r in 0..k-1 (ties: non-strict)."""
    z = np.sort(np.abs(x))[::-1]
    zz = np.concatenate([[np.inf], z])
    for r in range(k):
        t = z[k - r - 1:].sum() / (r + 1)
        if zz[k - r - 1] >= t - 1e-12 and t >= zz[k - r] - 1e-12:
            return (z[:k - r - 1] ** 2).sum() + (r + 1) * t * t
    raise AssertionError("no r")


def _np_envelope_prox(v, k, lam):
    """Argyriou et al. 2012, Alg. 1: prox of (1/2β)‖·‖²_(k), β = 1/λ, by search over (r, l)."""
    beta = 1.0 / lam
    order = np.argsort(-np.abs(v), kind="stable")
    z = np.abs(v)[order]
    d = len(z)
    zz = np.concatenate([[np.inf], z, [-np.inf]])
    for r in range(k):
        for l in range(k, d + 1):
            t = z[k - r - 1:l].sum() / (l - k + (beta + 1) * r + beta + 1)
            if (zz[k - r - 1] / (beta + 1) >= t - 1e-12 and t >= zz[k - r] / (beta + 1) - 1e-12
                    and zz[l] >= t - 1e-12 and t >= zz[l + 1] - 1e-12):
                q = np.zeros(d)
                q[:k - r - 1] = beta / (beta + 1) * z[:k - r - 1]
                q[k - r - 1:l] = z[k - r - 1:l] - t
                out = np.zeros(d)
                out[order] = q
                return out * np.sign(v)
    raise AssertionError("no (r, l)")


def _np_gap_prox(v, k, lam):
    """prox of λ(s_k − ½‖·‖²): λ<1: prox_{λ/(1−λ) s_k}(v/(1−λ)); λ≥1: keep the k largest |v|."""
    if lam < 1:
        return _np_envelope_prox(v / (1 - lam), k, lam / (1 - lam))
    out = np.zeros_like(v)
    idx = np.argsort(-np.abs(v), kind="stable")[:k]
    out[idx] = v[idx]
    return out


def test_sef_value_and_prox_match_numpy_reference():
    rng = np.random.default_rng(0)
    value = jax.jit(sef_value, static_argnums=1)
    prox = jax.jit(sef_prox, static_argnums=(1, 3))
    for d, k in ((5, 2), (12, 1), (12, 4)):  # one compile per (d, k); λ traced
        for trial in range(6):
            lam = float(rng.choice([0.05, 0.3, 0.9, 1.0, 2.5]))
            v = rng.standard_normal(d).astype(np.float32)
            if trial % 2 == 0:
                v = np.round(v * 2) / 2  # ties and zeros
            np.testing.assert_allclose(float(value(jnp.asarray(v), k)), 0.5 * _np_ksupport_sq(v.astype(float), k),
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(prox(jnp.asarray(v), k, lam, "envelope"),
                                       _np_envelope_prox(v.astype(float), k, lam), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(prox(jnp.asarray(v), k, lam, "gap"), _np_gap_prox(v.astype(float), k, lam),
                                       rtol=1e-5, atol=1e-5)
    # optimality: no perturbation lowers ½‖x − v‖² + λ s_k(x); the gap form keeps at most k entries for λ >= 1
    v = rng.standard_normal(12)
    p = np.asarray(prox(jnp.asarray(v, jnp.float32), 4, 0.7, "envelope"), float)
    obj = lambda x: 0.5 * ((x - v) ** 2).sum() + 0.7 * 0.5 * _np_ksupport_sq(x, 4)
    assert all(obj(p) <= obj(p + 1e-3 * rng.standard_normal(12)) + 1e-9 for _ in range(200))
    assert (np.asarray(prox(jnp.asarray(v, jnp.float32), 4, 1.5, "gap")) != 0).sum() == 4
    # invariants: s_k ≥ ½‖z‖² with equality on k-sparse z (the gap penalty's zeros)
    z = jnp.asarray(rng.standard_normal(12), jnp.float32)
    assert float(value(z, 4)) > 0.5 * float((z * z).sum())
    zk = z.at[4:].set(0)
    np.testing.assert_allclose(float(value(zk, 4)), 0.5 * float((zk * zk).sum()), rtol=1e-6)


def _bn_cnn():
    x = jnp.asarray(load_digits_split(images=True).x_train[:16])
    model = DomainCNN(widths=(8, 8), norm="bn")
    v = jax.jit(model.init)(jax.random.key(0), x)
    rng = np.random.default_rng(1)  # non-trivial BN statistics
    v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), v["batch_stats"])}
    return model, v, x


def test_filter_norms_masking_equals_removal_and_flops():
    model, v, x = _bn_cnn()
    rng = np.random.default_rng(3)
    groups = sequential_channel_groups(["conv0", "conv1"], ["bn0", "bn1"], "head")
    w = np.asarray(v["params"]["conv0"]["kernel"])
    np.testing.assert_allclose(filter_norms(v, groups[0], 1), np.abs(w).reshape(-1, 8).sum(0), rtol=1e-6)
    np.testing.assert_allclose(filter_norms(v, groups[0], 2), np.sqrt((w**2).reshape(-1, 8).sum(0)), rtol=1e-6)
    s = np.array([3.0, 1.0, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(keep_mask(s, 0.4), [True, True, True, False, False])  # tie: lower index kept
    keeps = [keep_mask(filter_norms(v, g), 0.5) for g in groups]
    masked = mask_groups(v, groups, keeps)
    small = v
    for g, k in zip(groups, keeps):
        small = remove_channels(small, g, k)
    small_model = DomainCNN(widths=(4, 4), norm="bn")
    np.testing.assert_allclose(model.apply(masked, x), small_model.apply(small, x), rtol=1e-5, atol=1e-5)
    pos = {"params/conv0/kernel": 64, "params/conv1/kernel": 16, "params/head/kernel": 1}
    assert count_flops(masked, pos) == count_flops(small, pos) == 64 * 9 * 1 * 4 + 16 * 9 * 4 * 4 + 4 * 10
    same = mask_groups(v, groups, [np.ones(8, bool)] * 2)  # all kept: identical
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, v)
    # the project's ResNet: block-internal channels
    rn = ResNet(num_blocks=2, downsample_at=(1,), width=4)
    rv = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                                jax.eval_shape(rn.init, jax.random.key(2), x))
    rg = resnet_channel_groups(rv)
    rk = [keep_mask(filter_norms(rv, g, 2), 0.5) for g in rg]
    masked_rn = jax.jit(mask_groups, static_argnums=1)(rv, tuple(rg), rk)
    small = remove_channels(rv, rg[0], rk[0])
    assert small["params"]["block_0"]["conv1"]["kernel"].shape == (3, 3, 4, 2)
    assert small["params"]["block_0"]["conv2"]["kernel"].shape == (3, 3, 2, 4)
    assert [g.name for g in rg] == ["block_0", "block_1"] and rg[0].consumers == ("params/block_0/conv2/kernel",)
    z = np.asarray(masked_rn["params"]["block_1"]["bn1"]["scale"])
    assert (z[~rk[1]] == 0).all() and (z[rk[1]] != 0).all()

def test_sharded_matches_single_device(mesh):
    params = MLP(features=(64,)).init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    groups = (ChannelGroup(("Dense_0/kernel", "Dense_0/bias"), ("Dense_1/kernel",), "h"),)
    spec = {"Dense_0": {"kernel": P(None, "data"), "bias": P("data")}, "Dense_1": {"kernel": P("data", None),
                                                                                  "bias": P()}}
    sh = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda s: isinstance(s, P))
    sharded = jax.device_put(params, sh)
    f = jax.jit(lambda p: (gsef_prox(p, groups, 16, 0.05, "envelope"), gsef_value(p, groups, 16),
                           mask_groups(p, groups, [jnp.arange(64) % 3 == 0])))
    for a, b in zip(jax.tree_util.tree_leaves(f(sharded)), jax.tree_util.tree_leaves(f(params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_validation_errors():
    params = MLP(features=(8,)).init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    g = ChannelGroup(("Dense_0/kernel",), ("Dense_1/kernel",))
    with pytest.raises(ValueError, match="not a leaf"):
        filter_norms(params, ChannelGroup(("Dense_9/kernel",)))
    with pytest.raises(ValueError, match="input channels"):
        mask_channels(params, ChannelGroup(("Dense_0/kernel",), ("Dense_0/kernel",)), np.ones(8, bool))
    with pytest.raises(ValueError, match="ratio"):
        keep_mask(np.ones(4), 1.0)
    with pytest.raises(ValueError, match="finite"):
        keep_mask(np.array([1.0, np.nan]), 0.5)
    with pytest.raises(ValueError, match="k must be"):
        sef_value(jnp.ones(4), 5)
    with pytest.raises(ValueError, match="lam"):
        sef_prox(jnp.ones(4), 2, 0.0)
    with pytest.raises(ValueError, match="penalty"):
        gsef_prox(params, [g], 2, 0.1, "l1")
    with pytest.raises(ValueError, match="keep has shape"):
        mask_channels(params, g, np.ones(7, bool))
    with pytest.raises(ValueError, match="ratios"):
        PAGCPConfig(ratios=(0.5, 0.2)).validate()
    with pytest.raises(ValueError, match="positive"):
        pagcp(params, [g], lambda t: jnp.float32(jnp.nan), lambda t: 1.0)
    np.testing.assert_allclose(np.prod([1 + 0.02 * pagcp_decay(0.02, 0.1, 5) ** i for i in range(5)]), 1.1,
                               rtol=1e-6)


# ------------------------------------------------------------------------------------------------ claims


def test_gsef_proximal_training_reaches_k_active_groups_on_digits():
    """Proximal Adam with the gap GSEF on the 64 hidden neurons of a digits MLP, k = 16: at convergence 16 (+1)
    neurons carry all the weight, so keeping exactly 16 costs ≤ 1.5 points, while the same projection of the
    densely trained MLP loses more than 30 points."""
    d = load_digits_split()
    xtr, ytr, xte, yte = map(jnp.asarray, d)
    model = MLP(features=(64,), num_outputs=10)
    p0 = model.init(jax.random.key(0), xtr[:1])["params"]
    groups = (ChannelGroup(("Dense_0/kernel", "Dense_0/bias"), ("Dense_1/kernel",), "hidden"),)
    lr = 1e-2

    @jax.jit
    def train(lam):  # proximal Adam (the gsef_proximal step, with λ traced: one compile for both runs)
        def step(c, i):
            p, s = c
            idx = jax.random.randint(jax.random.fold_in(jax.random.key(0), i), (64,), 0, xtr.shape[0])
            g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, xtr[idx]), ytr[idx]).mean())(p)
            u, s = optax.adam(lr).update(g, s, p)
            return (gsef_prox(optax.apply_updates(p, u), groups, 16, lam * lr), s), None

        (p, _), _ = jax.lax.scan(step, (p0, optax.adam(lr).init(p0)), jnp.arange(400))
        return p

    acc = lambda p: float((model.apply({"params": p}, xte).argmax(-1) == yte).mean())
    dense, sparse = train(jnp.float32(1e-8)), train(jnp.float32(1.0))
    n = np.sort(np.asarray(group_norms(sparse, groups[0])))[::-1]
    tail = n[16:].sum() / n.sum()
    a_dense, a_sparse = acc(dense), acc(k_level_project(sparse, groups, 16))
    a_dense_proj = acc(k_level_project(dense, groups, 16))
    print(f"dense {a_dense:.3f}, GSEF k=16 {a_sparse:.3f} (tail mass {tail:.4f}), dense projected {a_dense_proj:.3f}")
    assert tail < 0.01 and (n > 1e-6).sum() <= 18
    assert a_sparse >= a_dense - 0.015
    assert a_dense_proj < a_dense - 0.3
    # the optax wrapper computes the same step as the explicit prox
    tx = gsef_proximal(optax.sgd(lr), groups, 16, 1.0, lr)
    grads = jax.tree_util.tree_map(jnp.ones_like, p0)
    u, _ = jax.jit(tx.update)(grads, tx.init(p0), p0)
    ref = jax.jit(lambda p: gsef_prox(optax.apply_updates(p, jax.tree_util.tree_map(lambda g: -lr * g, grads)),
                                      groups, 16, lr))(p0)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           optax.apply_updates(p0, u), ref)


STEPS = 250


def test_pagcp_beats_uniform_pruning_on_digits_cnn():
    """A 3-conv digits CNN (250 Adam steps): PAGCP (δ0 = 0.1, total 0.3 on held-out loss) keeps that loss within
    1.3x and the test accuracy within 1.5 points, and removes more FLOPs than any uniform per-layer ratio whose
    held-out loss is no larger (measured 0.558 vs 0.224; at equal test-accuracy drop it is printed, not asserted:
    the 450-image test set moves by 0.2-point steps)."""
    d = load_digits_split(images=True)
    xtr, ytr, xte, yte = map(jnp.asarray, d)
    xtr, ytr, xca, yca = xtr[:1000], ytr[:1000], xtr[1000:], ytr[1000:]
    model = DomainCNN(widths=(32, 32, 32), norm="none")
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, s, i):  # a Python loop of jitted steps: a conv in a lax.scan body runs ~8x slower on XLA:CPU
        idx = jax.random.randint(jax.random.fold_in(jax.random.key(0), i), (64,), 0, xtr.shape[0])
        g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, xtr[idx]), ytr[idx]).mean())(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = model.init(jax.random.key(0), xtr[:1])["params"]
    s = tx.init(p)
    for i in range(STEPS):
        p, s = step(p, s, i)
    v = {"params": p}

    @jax.jit
    def evaluate(v, x, y):
        logits = model.apply(v, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits.argmax(-1) == y).mean()

    groups = sequential_channel_groups([f"conv{i}" for i in range(3)], [None] * 3, "head")
    groups = [g._replace(producers=g.producers + (g.producers[0].replace("kernel", "bias"),)) for g in groups]
    pos = {"params/conv0/kernel": 64, "params/conv1/kernel": 16, "params/conv2/kernel": 4, "params/head/kernel": 1}
    flops = functools.partial(count_flops, positions=pos)
    cfg = PAGCPConfig(ratios=tuple(np.round(np.arange(1, 19) * 0.05, 3)), delta=0.1, total=0.3)
    res = pagcp(v, groups, lambda t: evaluate(t, xca, yca)[0], flops, cfg)
    acc0 = float(evaluate(v, xte, yte)[1])
    acc = float(evaluate(res.tree, xte, yte)[1])
    red = 1 - res.flops[1] / res.flops[0]
    assert float(evaluate(res.tree, xca, yca)[0]) <= float(res.base_loss[0]) * 1.3 + 1e-6
    assert np.prod([1 + t for t in res.thresholds]) <= 1.3 + 1e-5
    loss_p = float(evaluate(res.tree, xca, yca)[0])
    uniform = []
    for r in np.arange(1, 10) * 0.05:
        u = uniform_prune(v, groups, float(r))
        lu, au = evaluate(u, xca, yca)[0], evaluate(u, xte, yte)[1]
        uniform.append((float(lu), acc0 - float(au), 1 - flops(u) / flops(v)))
    best_loss = max([f for lu, _, f in uniform if lu <= loss_p], default=0.0)
    best_acc = max([f for _, drop, f in uniform if drop <= acc0 - acc + 1e-6], default=0.0)
    print(f"acc {acc0:.4f} -> PAGCP {acc:.4f} ratios {res.ratios}, FLOPs -{red:.3f}, loss {loss_p:.4f}; uniform at "
          f"<= that loss: -{best_loss:.3f}, at <= that accuracy drop: -{best_acc:.3f}; uniform (loss, drop, "
          f"reduction): {np.round(uniform, 3).tolist()}")
    assert acc >= acc0 - 0.015
    assert red > best_loss + 0.1
