"""Greedy soup, AdaMerging, aTLAS, Twin-Merging: references, invariants, the qualitative claims, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.models import MLP, MLP_RULES_TP
from jaxmodels.sharding import shard
from jaxmodels.tree import flatten
from merging.adamerging import adamerging, entropy, merge_with_coefficients
from merging.atlas import atlas
from merging.greedy_soup import greedy_soup
from merging.linear import uniform_soup
from merging.twin_merging import compress_svd, decompress, router_weights, twin_apply, twin_merging, twin_params


def _mlps(n=3, seed=0, features=(8,), d=4, out=4):  # noqa: D103
    model = MLP(features=features, num_outputs=out)
    ps = [model.init(jax.random.key(seed + i), jnp.zeros((1, d)))["params"] for i in range(n)]
    return ps, lambda p, x: model.apply({"params": p}, x)


def test_greedy_soup_matches_reference_loop():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(6,))
    models = [{"w": jnp.asarray(target + rng.normal(size=6) * s, jnp.float32)} for s in (0.3, 2.0, 0.5, 0.4, 3.0)]
    score = lambda p: -float(np.sum((np.asarray(p["w"], np.float64) - target) ** 2))  # noqa: E731
    out = greedy_soup(None, models, score, progress=False)
    # independent reference: Recipe 1 of the paper
    W = [np.asarray(m["w"], np.float64) for m in models]
    s = [-np.sum((w - target) ** 2) for w in W]
    order = np.argsort(s)[::-1]
    sel = [order[0]]
    best = s[order[0]]
    for i in order[1:]:
        c = -np.sum((np.mean([W[j] for j in sel + [i]], 0) - target) ** 2)
        if c >= best - 1e-6:
            sel.append(i)
            best = c
    assert list(out.info["selected"]) == [int(i) for i in sel]
    np.testing.assert_allclose(out.params["w"], np.mean([W[j] for j in sel], 0), rtol=1e-5, atol=1e-6)
    assert out.info["score"] >= max(out.info["individual_scores"])  # never worse than the best ingredient
    assert 1 not in out.info["selected"] and 4 not in out.info["selected"]  # the far-away models are rejected
    np.testing.assert_allclose(uniform_soup(models)["w"], np.mean(W, 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup(None, [], score)


def test_merge_with_coefficients_reference():
    ps, _ = _mlps(3)
    base, models = ps[0], ps[1:]
    fb = flatten(base)
    c = np.random.default_rng(0).random((2, len(fb))).astype(np.float32)
    out = flatten(merge_with_coefficients(base, models, c))
    for l, (k, b) in enumerate(fb.items()):
        ref = np.asarray(b) + sum(c[i, l] * (np.asarray(flatten(m)[k]) - np.asarray(b)) for i, m in enumerate(models))
        np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-6)
    out_t = flatten(merge_with_coefficients(base, models, [0.2, 0.5], granularity="task"))
    for k, b in fb.items():
        ref = np.asarray(b) + sum(w * (np.asarray(flatten(m)[k]) - np.asarray(b)) for w, m in zip([0.2, 0.5], models))
        np.testing.assert_allclose(out_t[k], ref, rtol=1e-5, atol=1e-6)


def test_entropy_reference():
    z = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(entropy(z), -(p * np.log(p)).sum(-1).mean(), rtol=1e-5)


def test_adamerging_lowers_entropy_and_zero_task_vectors_are_identity():
    ps, apply_fn = _mlps(3)
    base, models = ps[0], ps[1:]
    rng = np.random.default_rng(0)
    bs = [[rng.normal(size=(16, 4)).astype(np.float32) for _ in range(2)] for _ in models]
    for gran in ("task", "layer"):
        res = adamerging(base, models, apply_fn, bs, granularity=gran, steps=30, learning_rate=5e-2,
                         progress=False)
        # the objective is what AdaMerging minimizes: it must go down from the 0.3 initialization
        assert res.info["losses"][-1] < res.info["losses"][0] - 1e-3
        for v in res.info["coefficients"].values():
            assert np.all((v >= 0) & (v <= 1))  # clipped as in the paper's code
    same = adamerging(base, [base, base], apply_fn, bs, steps=3, progress=False)
    for a, b in zip(jax.tree.leaves(same.params), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="granularity"):
        adamerging(base, models, apply_fn, bs, granularity="block")
    with pytest.raises(ValueError, match="streams"):
        adamerging(base, models, apply_fn, bs[:1])


def test_adamerging_sharded(mesh_2d):
    ps, apply_fn = _mlps(3, features=(8, 8))
    rng = np.random.default_rng(1)
    bs = [[rng.normal(size=(16, 4)).astype(np.float32)] for _ in range(2)]
    ref = adamerging(ps[0], ps[1:], apply_fn, bs, steps=5, learning_rate=1e-2, progress=False).info["coefficients"]
    sh = adamerging(shard(ps[0], MLP_RULES_TP, mesh_2d), [shard(p, MLP_RULES_TP, mesh_2d) for p in ps[1:]], apply_fn,
                    bs, steps=5, learning_rate=1e-2, progress=False).info["coefficients"]
    for k in ref:
        np.testing.assert_allclose(sh[k], ref[k], rtol=1e-4, atol=1e-5)


def test_atlas_learns_to_use_the_useful_task_vector():
    """Base = random net; model 1 is a trained classifier's weights, model 2 random noise. With labels, aTLAS should
    scale up model 1's blocks (towards 1) and keep model 2's small."""
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 3)).astype(np.float32)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = np.argmax(x @ W, -1).astype(np.int32)
    lin = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    base = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    good = {"w": jnp.asarray(W * 3), "b": jnp.zeros(3)}
    noise = {"w": jnp.asarray(rng.normal(size=(4, 3)).astype(np.float32) * 3), "b": jnp.zeros(3)}
    res = atlas(base, [good, noise], lin, [[(x, y)]], steps=150, learning_rate=5e-2, progress=False)
    coef, losses = res.info["coefficients"], res.info["losses"]
    acc = float((np.argmax(lin(res.params, x), -1) == y).mean())
    assert coef["w"][0] > 0.5 and abs(coef["w"][1]) < coef["w"][0] / 2
    assert acc > 0.9 and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="objective"):
        atlas(base, [good], lin, [[(x, y)]], objective="mse")


def test_svd_compression_reference():
    rng = np.random.default_rng(0)
    d = {"k": jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32), "b": jnp.ones(5)}
    c = compress_svd(d, rank=2)
    m = np.asarray(d["k"], np.float64).reshape(6, 5)
    U, S, Vt = np.linalg.svd(m, full_matrices=False)
    ref = (U[:, :2] * S[:2]) @ Vt[:2]
    dec = decompress(c, d)
    np.testing.assert_allclose(dec["k"], ref.reshape(3, 2, 5), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(dec["b"], d["b"])
    full = decompress(compress_svd(d, rank=99), d)
    np.testing.assert_allclose(full["k"], d["k"], rtol=1e-4, atol=1e-5)


def test_twin_merging_full_rank_routes_back_to_experts():
    ps, apply_fn = _mlps(2, features=(6,), out=3)
    rng = np.random.default_rng(0)
    # task 0 inputs around +3, task 1 around -3: trivially separable by the router
    xs = [[(rng.normal(size=(32, 4)) + s).astype(np.float32) for _ in range(2)] for s in (3.0, -3.0)]
    tw = twin_merging(None, ps, apply_fn, xs, rank=8, steps=200, progress=False)
    dense = [decompress(e, tw.params) for e in tw.info["exclusive"]]
    for k in range(2):
        # full rank exclusive knowledge: θ_s + δ_k = θ_k
        pk = twin_params(tw.params, dense, jnp.eye(2)[k])
        for a, b in zip(jax.tree.leaves(pk), jax.tree.leaves(ps[k])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        w = router_weights(apply_fn, tw, xs[k][0])
        assert float(jnp.mean(w[:, k])) > 0.95
        # routed inference ≈ the task's own expert
        np.testing.assert_allclose(twin_apply(apply_fn, tw, xs[k][0]), apply_fn(ps[k], xs[k][0]), rtol=0.05,
                                   atol=0.05 * float(jnp.abs(apply_fn(ps[k], xs[k][0])).max()))


def test_greedy_soup_atlas_twin_lmc_sharded(mesh_2d):
    """Sharded (tensor-parallel) inputs give the single-device results."""
    from merging.lmc import interpolation_path

    ps, apply_fn = _mlps(3, features=(8, 8))
    sps = [shard(p, MLP_RULES_TP, mesh_2d) for p in ps]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.integers(0, 4, 16).astype(np.int32)
    fwd = jax.jit(apply_fn)  # one program per sharding, not one per op
    score = lambda p: float((np.argmax(fwd(p, x), -1) == y).mean())  # noqa: E731
    a, b = greedy_soup(None, ps, score, progress=False), greedy_soup(None, sps, score, progress=False)
    assert a.info["selected"] == b.info["selected"]
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    ra = atlas(ps[0], ps[1:], apply_fn, [[(x, y)]], steps=5, progress=False).info["coefficients"]
    rb = atlas(sps[0], sps[1:], apply_fn, [[(x, y)]], steps=5, progress=False).info["coefficients"]
    for k in ra:
        np.testing.assert_allclose(ra[k], rb[k], rtol=1e-4, atol=1e-5)
    xs = [[x], [x + 2.0]]
    ta = twin_merging(None, ps[1:], apply_fn, xs, rank=2, steps=20, progress=False)
    tb = twin_merging(None, sps[1:], apply_fn, xs, rank=2, steps=20, progress=False)
    # SVD and router training on identical numbers up to reduction order: ~1e-5 relative.
    np.testing.assert_allclose(twin_apply(apply_fn, tb, x), twin_apply(apply_fn, ta, x), rtol=1e-3, atol=1e-4)
    la = interpolation_path(score, ps[0], ps[1], num_points=3, progress=False)
    lb = interpolation_path(score, sps[0], sps[1], num_points=3, progress=False)
    np.testing.assert_allclose(la.values, lb.values)


def test_one_validated_uniform_average():
    """Issue 13 "one uniform average": greedy soup, RegMean's non-linear leaves and Twin-Merging's shared model use
    merging.linear.uniform_soup, so NaN/Inf ingredients are rejected before any work (the old private copies
    averaged them silently) and every leaf keeps its own dtype."""
    import merging.greedy_soup as gs_mod
    from merging.regmean import regmean

    assert gs_mod.uniform_soup is uniform_soup and not hasattr(gs_mod, "_mean")
    ps, apply_fn = _mlps(2)
    bad = jax.tree.map(lambda a: a, ps[1])
    bad["Dense_1"]["bias"] = bad["Dense_1"]["bias"].at[0].set(jnp.nan)
    calls = []
    with pytest.raises(ValueError, match="non-finite.*Dense_1/bias"):
        greedy_soup(None, [ps[0], bad], lambda p: calls.append(1) or 0.0, progress=False)
    assert not calls  # rejected before any evaluation
    grams = [{"Dense_0": jnp.eye(4)} for _ in range(2)]
    with pytest.raises(ValueError, match="non-finite.*Dense_1/bias"):
        regmean(None, [ps[0], bad], grams)
    with pytest.raises(ValueError, match="non-finite"):
        twin_merging(None, [ps[0], bad], apply_fn, [[np.zeros((2, 4), np.float32)]] * 2, steps=1, progress=False)
    # mixed dtypes: bf16 kernels, fp32 biases come back as they went in
    mixed = [jax.tree_util.tree_map_with_path(
        lambda path, a: a.astype(jnp.bfloat16) if path[-1].key == "kernel" else a, p) for p in ps]
    out = greedy_soup(None, mixed, lambda p: 0.0, progress=False).params
    assert out["Dense_0"]["kernel"].dtype == jnp.bfloat16 and out["Dense_0"]["bias"].dtype == jnp.float32
