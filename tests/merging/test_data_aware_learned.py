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
from merging.greedy_soup import greedy_soup, uniform_soup
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
    out = greedy_soup(models, score, progress=False)
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
    assert list(out.selected) == [int(i) for i in sel]
    np.testing.assert_allclose(out.params["w"], np.mean([W[j] for j in sel], 0), rtol=1e-5, atol=1e-6)
    assert out.score >= max(out.individual_scores)  # never worse than the best ingredient (held-out)
    assert 1 not in out.selected and 4 not in out.selected  # the far-away models are rejected
    np.testing.assert_allclose(uniform_soup(models)["w"], np.mean(W, 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup([], score)


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
        res = adamerging(apply_fn, base, models, bs, granularity=gran, steps=30, learning_rate=5e-2,
                         progress=False)
        # the objective is what AdaMerging minimizes: it must go down from the 0.3 initialization
        assert res.losses[-1] < res.losses[0] - 1e-3
        for v in res.coefficients.values():
            assert np.all((v >= 0) & (v <= 1))  # clipped as in the paper's code
    same = adamerging(apply_fn, base, [base, base], bs, steps=3, progress=False)
    for a, b in zip(jax.tree.leaves(same.params), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="granularity"):
        adamerging(apply_fn, base, models, bs, granularity="block")
    with pytest.raises(ValueError, match="streams"):
        adamerging(apply_fn, base, models, bs[:1])


def test_adamerging_sharded(mesh_2d):
    ps, apply_fn = _mlps(3, features=(8, 8))
    rng = np.random.default_rng(1)
    bs = [[rng.normal(size=(16, 4)).astype(np.float32)] for _ in range(2)]
    ref = adamerging(apply_fn, ps[0], ps[1:], bs, steps=5, learning_rate=1e-2, progress=False)
    sh = adamerging(apply_fn, *[shard(p, MLP_RULES_TP, mesh_2d) for p in ps[:1]],
                    [shard(p, MLP_RULES_TP, mesh_2d) for p in ps[1:]], bs, steps=5, learning_rate=1e-2,
                    progress=False)
    for k in ref.coefficients:
        np.testing.assert_allclose(sh.coefficients[k], ref.coefficients[k], rtol=1e-4, atol=1e-5)


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
    res = atlas(lin, base, [good, noise], [[(x, y)]], steps=150, learning_rate=5e-2, progress=False)
    acc = float((np.argmax(lin(res.params, x), -1) == y).mean())
    assert res.coefficients["w"][0] > 0.5 and abs(res.coefficients["w"][1]) < res.coefficients["w"][0] / 2
    assert acc > 0.9 and res.losses[-1] < res.losses[0]
    with pytest.raises(ValueError, match="objective"):
        atlas(lin, base, [good], [[(x, y)]], objective="mse")


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
    tw = twin_merging(apply_fn, None, ps, xs, rank=8, steps=200, progress=False)
    dense = [decompress(e, tw.shared) for e in tw.exclusive]
    for k in range(2):
        # full rank exclusive knowledge: θ_s + δ_k = θ_k
        pk = twin_params(tw.shared, dense, jnp.eye(2)[k])
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
    score = lambda p: float((np.argmax(apply_fn(p, x), -1) == y).mean())  # noqa: E731
    a, b = greedy_soup(ps, score, progress=False), greedy_soup(sps, score, progress=False)
    assert a.selected == b.selected
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    ra = atlas(apply_fn, ps[0], ps[1:], [[(x, y)]], steps=5, progress=False)
    rb = atlas(apply_fn, sps[0], sps[1:], [[(x, y)]], steps=5, progress=False)
    for k in ra.coefficients:
        np.testing.assert_allclose(ra.coefficients[k], rb.coefficients[k], rtol=1e-4, atol=1e-5)
    xs = [[x], [x + 2.0]]
    ta = twin_merging(apply_fn, None, ps[1:], xs, rank=2, steps=20, progress=False)
    tb = twin_merging(apply_fn, None, sps[1:], xs, rank=2, steps=20, progress=False)
    # SVD and router training on identical numbers up to reduction order: ~1e-5 relative.
    np.testing.assert_allclose(twin_apply(apply_fn, tb, x), twin_apply(apply_fn, ta, x), rtol=1e-3, atol=1e-4)
    la = interpolation_path(score, ps[0], ps[1], num_points=3, progress=False)
    lb = interpolation_path(score, sps[0], sps[1], num_points=3, progress=False)
    np.testing.assert_allclose(la.values, lb.values)
