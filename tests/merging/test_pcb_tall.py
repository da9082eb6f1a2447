"""PCB-Merging and TALL masks / Consensus merging: NumPy references from the papers' equations, invariants,
sharding, bf16, packed-bit masks and a small experiment showing the paper's localization claim."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.tree import flatten
from merging.pcb import pcb
from merging.tall_masks import (consensus_mask, consensus_task_arithmetic, consensus_ties, pack_mask, tall_mask_models,
                                tall_masks, unpack_mask)
from merging.ties import ties
from tests.merging.helpers import assert_trees_close, make_family, shard_tree

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 vs float32 reference, same operations in another order


def flat(t):
    return {k: np.asarray(v, np.float32) for k, v in flatten(t).items()}


def np_minmax(x):
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    return np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1), 0.0)


def np_clamp(x, a, b):
    d = x.shape[1]
    s = np.sort(x, 1)
    return np.clip(x, s[:, int(d * a)][:, None], s[:, max(int(d * (1 - b)) - 1, 0)][:, None])


def np_pcb(base, models, ratio, lam):
    out = {}
    for p, b in flat(base).items():
        tvs = np.stack([flat(m)[p].reshape(-1) - b.reshape(-1) for m in models])
        n = len(models)
        a = np_clamp(np.abs(tvs), 1e-4, 1e-4)
        clamped = np.sign(tvs) * a
        score = np.exp(n * np_minmax(a) ** 2) * np.tanh(tvs * tvs.sum(0, keepdims=True))
        scale = np_minmax(np_clamp(score, 1 - ratio, 0))
        merged = (clamped * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)
        out[p] = b + lam * merged.reshape(b.shape)
    return out


@pytest.mark.parametrize("ratio", [0.2, 1.0])
def test_pcb_matches_numpy(ratio):
    base, models = make_family(3, tau_scale=0.3)
    got = flat(pcb(base, models, ratio=ratio, lambda_=0.9))
    want = np_pcb(base, models, ratio, 0.9)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], err_msg=k, **TOL)


def test_pcb_drops_the_lowest_scoring_fraction():
    base = {"w": jnp.zeros((1000,))}
    rng = np.random.default_rng(0)
    models = [{"w": jnp.asarray(rng.standard_normal(1000), jnp.float32)} for _ in range(2)]
    got = np.asarray(pcb(base, models, ratio=0.3)["w"])
    # each task keeps ~30% of its entries (score > its 70% quantile); a weight is zeroed only where both tasks drop it
    frac_nonzero = (got != 0).mean()
    assert 0.3 <= frac_nonzero <= 0.6, frac_nonzero


def np_tall(base, models, lam):
    out = []
    for t in range(len(models)):
        m = {}
        for p, b in flat(base).items():
            taus = [flat(x)[p] - b for x in models]
            m[p] = np.abs(taus[t]) >= lam * np.abs(sum(taus) - taus[t])
        out.append(m)
    return out


def test_tall_masks_and_consensus_match_numpy():
    base, models = make_family(4)
    got = [flat(m) for m in tall_masks(base, models, tall_lambda=0.5)]
    want = np_tall(base, models, 0.5)
    for g, w in zip(got, want):
        for k in w:
            np.testing.assert_array_equal(g[k].astype(bool), w[k])
    cons = flat(consensus_mask(tall_masks(base, models, tall_lambda=0.5), k=2))
    merged = flat(consensus_task_arithmetic(base, models, k=2, tall_lambda=0.5, lambda_=0.7))
    for p, b in flat(base).items():
        keep = sum(w[p].astype(int) for w in want) >= 2
        np.testing.assert_array_equal(cons[p].astype(bool), keep)
        mtl = sum(flat(m)[p] - b for m in models)
        np.testing.assert_allclose(merged[p], b + 0.7 * np.where(keep, mtl, 0), **TOL)
    ct = flat(consensus_ties(base, models, k=2, tall_lambda=0.5, density=0.5))
    tt = flat(ties(base, models, density=0.5))
    for p, b in flat(base).items():
        keep = sum(w[p].astype(int) for w in want) >= 2
        np.testing.assert_allclose(ct[p], np.where(keep, tt[p], b), **TOL)


def test_masks_pack_to_one_bit_per_weight_and_round_trip():
    base, models = make_family(3)
    m = tall_masks(base, models, tall_lambda=0.4)[0]
    packed = pack_mask(m)
    n = sum(np.size(v) for v in jax.tree.leaves(m))
    assert sum(bits.nbytes for bits, _ in packed.values()) <= n // 8 + len(packed)
    back = unpack_mask(packed, like=m)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), m, back)


def test_invariants_copies_and_single_task():
    base, (m,) = make_family(1)
    # one task: tau_MTL = tau, |tau| >= lam*0 everywhere -> mask all True, reconstruction = the model
    rec = tall_mask_models(base, [m], tall_lambda=0.4)[0]
    assert_trees_close(rec, m, **TOL)
    # N copies: every mask is True (|tau| >= 0.4*(N-1)|tau| needs N-1 <= 2.5), consensus keeps everything, and
    # consensus TA with lambda=1/N returns the model
    cp = consensus_task_arithmetic(base, [m, m, m], k=2, tall_lambda=0.4, lambda_=1 / 3)
    assert_trees_close(cp, m, **TOL)
    assert_trees_close(consensus_ties(base, [m, m, m], k=2), m, **TOL)


def test_tall_masks_localize_each_task():
    """The paper's claim: a task's information is localized, so θ_0 + m_t ⊙ τ_MTL recovers task t far better
    than the plain merge θ_0 + τ_MTL does. Tasks with mostly disjoint supports (each changes its own 30% of the
    weights plus small shared noise): the TALL reconstruction error is a fraction of the merge's."""
    rng = np.random.default_rng(0)
    d, T = 2000, 4
    base = {"w": jnp.zeros(d)}
    supports = np.array_split(rng.permutation(d), T)
    models = []
    for t in range(T):
        tau = 0.02 * rng.standard_normal(d)
        tau[supports[t]] += rng.standard_normal(len(supports[t]))
        models.append({"w": jnp.asarray(tau, jnp.float32)})
    recs = tall_mask_models(base, models, tall_lambda=0.4)
    mtl = sum(np.asarray(m["w"]) for m in models)
    for t in range(T):
        target = np.asarray(models[t]["w"])
        err_tall = np.linalg.norm(np.asarray(recs[t]["w"]) - target)
        err_merge = np.linalg.norm(mtl - target)
        assert err_tall < 0.15 * err_merge, (t, err_tall, err_merge)


@pytest.mark.parametrize("fn", [lambda b, ms: pcb(b, ms, ratio=0.5),
                                lambda b, ms: consensus_task_arithmetic(b, ms, k=2)], ids=["pcb", "consensus"])
def test_sharded_and_bf16(fn, mesh):
    base, models = make_family(3)
    want = fn(base, models)
    got = fn(shard_tree(base, mesh), [shard_tree(m, mesh) for m in models])
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    bb, bms = make_family(3, dtype=jnp.bfloat16)
    out = fn(bb, bms)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_bad_parameters():
    base, models = make_family(2)
    with pytest.raises(ValueError, match="ratio"):
        pcb(base, models, ratio=0.0)
    with pytest.raises(ValueError, match="k must be"):
        consensus_task_arithmetic(base, models, k=3)
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        tall_masks(base, models, tall_lambda=-1.0)
