"""Regularized Mask Tuning: masking, the straight-through gradient, the KL and gradient-dropout rules against NumPy
transcriptions of the reference code, parameter selection, validation, jit + 8-device sharding, and the claim."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels.adapters.mask_tuning import (apply_binary_masks, distill_kl, gradient_dropout, init_masks, mask_reg,
                                            masked_fraction, select_important)
from jaxmodels.models.mlp import MLP_RULES_TP
from jaxmodels.sharding import shard
from tests.jaxmodels.adapters import papers_helpers as H


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    params = {"Dense_0": {"kernel": f(8, 6), "bias": f(6)}, "Dense_1": {"kernel": f(6, 4), "bias": f(4)}}
    masks = {"Dense_0/kernel": jnp.asarray(rng.uniform(0, 1e-2, (8, 6)), jnp.float32)}
    return params, masks, rng


def test_rules_match_numpy():
    params, masks, rng = _setup()
    out = apply_binary_masks(params, masks)
    W, M = np.asarray(params["Dense_0"]["kernel"]), np.asarray(masks["Dense_0/kernel"])
    np.testing.assert_array_equal(out["Dense_0"]["kernel"], W * (M > 5e-3))
    np.testing.assert_array_equal(out["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
    R = rng.standard_normal((8, 6)).astype(np.float32)  # straight-through: d/dM sum(R ⊙ W ⊙ bin(M)) = R ⊙ W
    g = jax.grad(lambda m: jnp.sum(R * apply_binary_masks(params, m)["Dense_0"]["kernel"]))(masks)
    np.testing.assert_allclose(g["Dense_0/kernel"], R * W, rtol=1e-6)
    np.testing.assert_allclose(mask_reg(masks), np.linalg.norm(M.ravel()), rtol=1e-6)
    s, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    for T, a in ((1.0, 1.0), (2.0, 0.5)):
        tea = a * t + (1 - a) * s
        p = np.exp(tea / T) / np.exp(tea / T).sum(1, keepdims=True)
        ls = s / T - np.log(np.exp(s / T).sum(1, keepdims=True))
        np.testing.assert_allclose(distill_kl(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), T, a),
                                   np.mean(-(p * ls).sum(1)) * T * T, rtol=1e-5)
    a_, b_ = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    for lam in (1.0, 0.3):
        got = gradient_dropout(key, {"m": a_}, {"m": b_}, lam)["m"]
        U = np.asarray(jax.random.uniform(jax.random.fold_in(key, 0), a_.shape, jnp.float32))
        P = (np.sign(a_) * (a_ + b_) / (np.abs(a_) + np.abs(b_) + 1e-8) + 1) / 2
        np.testing.assert_allclose(got, ((1 - lam) + lam * (P > U)) * a_, rtol=1e-6)
    same = gradient_dropout(key, {"m": a_}, {"m": a_})["m"]  # agreeing gradients are always kept
    np.testing.assert_allclose(same, a_, rtol=1e-6)
    grads = {"Dense_0": {"kernel": np.full((8, 6), 0.1), "bias": np.ones(6)},
             "Dense_1": {"kernel": np.full((6, 4), -0.5), "bias": np.ones(4)}}
    assert select_important(params, grads, 2) == ["Dense_1/kernel", "Dense_0/kernel"]
    assert masked_fraction(masks) == float(np.mean(M <= 5e-3))


def test_validation():
    params, masks, _ = _setup()
    with pytest.raises(ValueError, match="not a leaf"):
        init_masks(params, ["Dense_9/kernel"])
    with pytest.raises(ValueError, match="has shape"):
        apply_binary_masks(params, {"Dense_0/kernel": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="non-finite"):
        apply_binary_masks(params, {"Dense_0/kernel": masks["Dense_0/kernel"].at[0, 0].set(jnp.nan)})
    with pytest.raises(ValueError, match="lam"):
        gradient_dropout(jax.random.PRNGKey(0), masks, masks, lam=2.0)
    with pytest.raises(ValueError, match="structure"):
        gradient_dropout(jax.random.PRNGKey(0), masks, {"x": masks["Dense_0/kernel"]})
    with pytest.raises(ValueError, match="top_k"):
        select_important(params, params, 0)
    with pytest.raises(ValueError, match="temperature"):
        distill_kl(jnp.ones((2, 3)), jnp.ones((2, 3)), 0.0)
    before = jax.tree.map(np.array, params)
    apply_binary_masks(params, masks)
    jax.tree.map(np.testing.assert_array_equal, params, before)


def test_jit_sharded_equals_single_device(mesh_2d):
    params, masks, _ = _setup()
    ref = apply_binary_masks(params, masks)
    sp = shard(params, MLP_RULES_TP, mesh_2d)
    out = jax.jit(apply_binary_masks)(sp, masks)
    jax.tree.map(np.testing.assert_array_equal, out, ref)  # elementwise: exact
    assert not out["Dense_0"]["kernel"].sharding.is_fully_replicated


@pytest.mark.slow
def test_claim_binary_masks_on_frozen_weights_adapt():
    """The claim (binary masks on a few task-selected frozen weight tensors improve over the zero-shot model) on
    digits: the digits-pre-trained MLP, the mirrored digits (its zero-shot accuracy ~0.41). The two kernels
    with the largest mean |gradient| (of Dense_0/Dense_1/Dense_2) get masks; 150 Adam steps (lr 1e-3) of CE +
    1e-4 Σ||M||₂, with and without gradient dropout against the zero-shot KL (one scan). Measured:
    selected Dense_2, Dense_0;
    mirrored accuracy 0.873 (plain) / 0.871 (gradient dropout) vs zero-shot 0.41; masked-out weights 30% of all
    parameters (NOT the paper's ~2.6%: a 64-64 MLP needs far more of its weights re-selected). Not asserted:
    gradient dropout retaining more of the original task (original digits 0.746 plain, 0.728 with it; base 0.95)."""
    base = H.base_params()
    x, y, xt, yt = H.mirrored()
    g = jax.jit(jax.grad(lambda p: H.xent(H.MODEL.apply({"params": p}, x[:256]), y[:256])))(base)
    paths = select_important(base, g, 2, include=r"kernel$")
    m0 = init_masks(base, paths)

    def task(m, xb, yb):
        return H.xent(H.MODEL.apply({"params": apply_binary_masks(base, m)}, xb), yb) + 1e-4 * mask_reg(m)

    def kl(m, xb):
        return distill_kl(H.MODEL.apply({"params": apply_binary_masks(base, m)}, xb),
                          H.MODEL.apply({"params": base}, xb))

    tx = optax.adam(1e-3)
    idx = jnp.asarray(H.batches(x.shape[0], 150))

    @jax.jit
    def run(m0):
        def body(c, i):
            (mp, mg), (sp, sg), k = c
            xb, yb = x[i], y[i]
            gp = jax.grad(task)(mp, xb, yb)
            gg = gradient_dropout(jax.random.fold_in(k, i[0]), jax.grad(task)(mg, xb, yb),
                                  jax.grad(kl)(mg, xb))
            up, sp = tx.update(gp, sp)
            ug, sg = tx.update(gg, sg)
            return ((optax.apply_updates(mp, up), optax.apply_updates(mg, ug)), (sp, sg), k), None
        c0 = ((m0, m0), (tx.init(m0), tx.init(m0)), jax.random.PRNGKey(0))
        return jax.lax.scan(body, c0, idx)[0][0]

    mp, mg = run(m0)
    acc = {k: H.accuracy(apply_binary_masks(base, m), xt, yt) for k, m in (("plain", mp), ("gdr", mg))}
    xo, yo, xot, yot = H.digits()
    keep = {k: H.accuracy(apply_binary_masks(base, m), xot, yot) for k, m in (("plain", mp), ("gdr", mg))}
    frac = {k: masked_fraction(m, base) for k, m in (("plain", mp), ("gdr", mg))}
    zs = H.accuracy(base, xt, yt)
    assert acc["plain"] > zs + 0.2 and acc["gdr"] > zs + 0.2, (acc, zs)
    assert 0 < max(frac.values()) < 0.4, frac
    assert min(keep.values()) > 0.6, keep  # the original task is partly kept (base 0.95)
