"""Polytropon / MHR: the routed task adapters against a NumPy transcription of PEFT's poly forward, the
relaxed-Bernoulli routing, MHR-μ, validation, jit + 8-device sharding, and the routing claim on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.adapters import merge
from jaxmodels.adapters.mhr import (MhrConfig, add_task, init_mhr, mhr_merge, mhr_mu, mhr_num_params,
                                    routing_weights)
from jaxmodels.models.mlp import MLP_RULES_TP
from jaxmodels.sharding import shard
from tests.jaxmodels.adapters import papers_helpers as H


def _setup(h=2, S=3, T=2, r=2, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    params = {"Dense_0": {"kernel": f(8, 6), "bias": f(6)}, "Dense_1": {"kernel": f(6, 4), "bias": f(4)}}
    mhr = init_mhr(jax.random.PRNGKey(0), params, MhrConfig(n_tasks=T, n_skills=S, n_splits=h, rank=r,
                                                            target=r"^Dense_[01]$"))
    mhr = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), mhr)
    return params, mhr, rng


def poly_forward_numpy(x, W, A, B, logits, task):
    """PEFT's poly Linear.forward (eval): mixing weights σ(Z_t) normalised per head, einsum over skills,
    A reshaped to [d_in, r], B transposed to [r, h, d_out/h] and reshaped, then x A B / r."""
    h, S, di, r = A.shape
    z = 1 / (1 + np.exp(-logits[task].reshape(h, S).astype(np.float64)))
    w = z / (z.sum(-1, keepdims=True) + 1e-12)
    At = np.einsum("qs,qsdr->qdr", w, A).reshape(h * di, r)
    Bt = np.einsum("qs,qsrd->qrd", w, B).transpose(1, 0, 2).reshape(r, -1)
    return x @ W + x @ At @ Bt / r


def test_task_merge_matches_numpy_poly_forward():
    for h in (1, 2):  # Polytropon and MHR
        params, mhr, rng = _setup(h=h)
        x = rng.standard_normal((5, 8))
        merge_t = jax.jit(mhr_merge)  # one compile per inventory shape (task traced)
        for t in (0, 1):
            merged = merge_t(params, mhr, t)
            for name, xin in (("Dense_0", x), ("Dense_1", x[:, :6])):
                e = {k: np.asarray(v, np.float64) for k, v in mhr[name].items()}
                ref = poly_forward_numpy(xin, np.asarray(params[name]["kernel"], np.float64), e["A"], e["B"],
                                         e["logits"], t)
                np.testing.assert_allclose(xin @ np.asarray(merged[name]["kernel"], np.float64), ref, rtol=1e-5,
                                           atol=1e-5)
    np.testing.assert_array_equal(merged["Dense_0"]["bias"], params["Dense_0"]["bias"])


def test_routing_sampling_and_mhr_mu():
    params, mhr, rng = _setup()
    z = mhr["Dense_0"]["logits"][1]
    w = routing_weights(z, 2, jax.random.PRNGKey(3))
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
    assert not np.allclose(w, routing_weights(z, 2))  # a relaxed-Bernoulli sample, not σ
    # with equal logits every skill weighs 1/S: the routed task adapter IS the average adapter (MHR-μ)
    flat = {m: {**e, "logits": jnp.zeros_like(e["logits"])} for m, e in mhr.items()}
    mu, cfg = mhr_mu(flat)
    for m in mhr:
        np.testing.assert_allclose(mu[m]["lora_A"].reshape(2, -1, 2), np.asarray(mhr[m]["A"]).mean(1), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 merge(params, mu, cfg), mhr_merge(params, flat, 0))
    grown = add_task(jax.random.PRNGKey(4), mhr)
    assert grown["Dense_0"]["logits"].shape == (3, 6)
    np.testing.assert_array_equal(grown["Dense_0"]["logits"][:2], mhr["Dense_0"]["logits"])
    assert mhr_num_params(mhr, "logits") == 2 * 6 * 2


def test_validation():
    params, mhr, _ = _setup()
    with pytest.raises(ValueError, match="n_splits"):
        MhrConfig(n_splits=0)
    with pytest.raises(ValueError, match="not divisible"):
        init_mhr(jax.random.PRNGKey(0), params, MhrConfig(n_splits=4, target="Dense_1"))
    with pytest.raises(ValueError, match="selects no"):
        init_mhr(jax.random.PRNGKey(0), params, MhrConfig(target="nothing"))
    with pytest.raises(ValueError, match="out of range"):
        mhr_merge(params, mhr, 2)
    bad = {**mhr, "Dense_1": {**mhr["Dense_1"], "A": mhr["Dense_1"]["A"].at[0, 0, 0, 0].set(jnp.inf)}}
    with pytest.raises(ValueError, match="non-finite.*Dense_1/A"):
        mhr_merge(params, bad, 0)
    with pytest.raises(ValueError, match="do not fit"):
        mhr_merge(params, {"Dense_0": mhr["Dense_1"]}, 0)


def test_jit_sharded_equals_single_device(mesh_2d):
    params, mhr, _ = _setup()
    ref = jax.vmap(lambda t: mhr_merge(params, mhr, t))(jnp.arange(2))
    sp = shard(params, MLP_RULES_TP, mesh_2d)
    out = jax.jit(jax.vmap(lambda t, p: mhr_merge(p, mhr, t), in_axes=(0, None)))(jnp.arange(2), sp)
    # the same einsums over skills and the rank-r product: float32 rounding of the same sums
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5), out, ref)


def _tasks(x):
    im = x.reshape(-1, 8, 8)
    return jnp.stack([im[:, :, ::-1], im[:, ::-1, :], jnp.transpose(im, (0, 2, 1))], 1).reshape(-1, 3, 64)


@pytest.mark.slow
def test_claim_routing_only_adaptation_of_a_multitask_inventory():
    """MHR's claims on digits. Inventory: 4 skills, rank 4, 8 heads, on Dense_0/Dense_1, trained jointly on three
    tasks (digits mirrored, flipped upside down, transposed; 250 Adam steps). Held-out task: digits rotated 180°,
    100 training rows; only the new task's router row is trained (MHR-z: 64 parameters, 150 steps). Asserted:
    multi-task training of the routed inventory works (every task > 0.6 test accuracy) and routing-only
    adaptation improves the held-out task over the base (measured 0.52 or 0.44 depending on the inventory init,
    base 0.40). NOT asserted, because it does not hold robustly at this scale (exploratory runs, same setup):
    "MHR beats Poly" (MHR-z vs Poly-z 0.52 / 0.46 with one inventory init, 0.44 / 0.50 with another) and
    "MHR-μ (the average adapter, fine-tuned) beats a fresh LoRA few-shot" (0.82 vs 0.84)."""
    base = H.base_params()
    xo, yo, xot, yot = H.digits()
    X, Xt = _tasks(xo), _tasks(xot)
    inv = init_mhr(jax.random.PRNGKey(0), base, MhrConfig(n_tasks=3, n_skills=4, n_splits=8, rank=4,
                                                          target=r"^Dense_[01]$"))

    def task_acc(m, t, x, y):
        return jnp.mean(jnp.argmax(H.MODEL.apply({"params": mhr_merge(base, m, t)}, x), -1) == y)

    def mt_loss(m, xb, yb):
        return jnp.mean(jax.vmap(lambda t: H.xent(H.MODEL.apply({"params": mhr_merge(base, m, t)}, xb[:, t]), yb))(
            jnp.arange(3)))

    inv, _ = H.fit(mt_loss, inv, X, yo, 250, 1e-2)
    accs = jax.jit(jax.vmap(lambda t, x: task_acc(inv, t, x, yot), in_axes=(0, 1)))(jnp.arange(3), Xt)
    assert float(accs.min()) > 0.6, accs
    grown = add_task(jax.random.PRNGKey(5), inv)

    def with_z(z):
        return {k: {**e, "logits": e["logits"].at[-1].set(z[k])} for k, e in grown.items()}

    xr, xrt = (a.reshape(-1, 8, 8)[:, ::-1, ::-1].reshape(-1, 64) for a in (xo, xot))
    z0 = {k: e["logits"][-1] for k, e in grown.items()}
    z, _ = H.fit(lambda z, xb, yb: H.xent(H.MODEL.apply({"params": mhr_merge(base, with_z(z), 3)}, xb), yb), z0,
                 xr[:100], yo[:100], 150, 1e-1, batch=50)
    assert sum(v.size for v in jax.tree.leaves(z)) == 64
    acc = float(jax.jit(lambda z: task_acc(with_z(z), 3, xrt, yot))(z))
    base_acc = H.accuracy(base, xrt, yot)
    assert acc > base_acc + 0.02, (acc, base_acc)
