"""Git Re-Basin's straight-through-estimator permutation search and MergeMany (matching three or more models)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.datasets import load_digits_split
from jaxmodels.models import MLP
from jaxmodels.train import softmax_cross_entropy
from merging.lmc import loss_barrier
from merging.permutation import (apply_permutation, identity_permutation, invert_permutation, mlp_permutation_spec,
                                 weight_matching)
from merging.ste_permutation import (compose_permutations, merge_many, ste_midpoint_loss, ste_permutation_search,
                                     straight_through)

SPEC = mlp_permutation_spec(2)


def _np_mlp_loss(p, x, y):
    """NumPy float64 reference: relu MLP (Dense_0, Dense_1 hidden, Dense_2 logits), mean cross-entropy."""
    h = np.asarray(x, np.float64)
    for i in range(3):
        h = h @ np.asarray(p[f"Dense_{i}"]["kernel"], np.float64) + np.asarray(p[f"Dense_{i}"]["bias"], np.float64)
        if i < 2:
            h = np.maximum(h, 0.0)
    h = h - h.max(-1, keepdims=True)
    logp = h - np.log(np.exp(h).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


@functools.lru_cache(maxsize=None)
def _init_fn(features, d, out):
    model = MLP(features=features, num_outputs=out)
    return model, jax.jit(lambda key: model.init(key, jnp.zeros((1, d)))["params"])


def _small(seed, features=(16, 16), d=8, out=8):
    """A small MLP and its parameters as NumPy arrays (one compiled init per shape)."""
    model, init = _init_fn(tuple(features), d, out)
    return model, jax.tree.map(np.asarray, init(jax.random.key(seed)))


def _loss_fn(model):
    return lambda p, b: softmax_cross_entropy(model.apply({"params": p}, b[0]), b[1])


def _data(n=64, d=8, out=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, out, n).astype(np.int32)


def _random_perm(params, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.permutation(len(v)) for k, v in identity_permutation(params, SPEC).items()}


@functools.lru_cache(maxsize=1)
def digits_models():
    """Three digits MLPs (64-64 hidden) trained from different seeds (init and minibatch order), in one vmapped
    program; shared by this module and tests/merging/test_alignment.py."""
    d = load_digits_split()
    model = MLP(features=(64, 64), num_outputs=10)
    x, y = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    tx = optax.adam(1e-2)

    @jax.jit
    @jax.vmap
    def train(key):
        k_init, k_data = jax.random.split(key)
        p = model.init(k_init, x[:1])["params"]

        def body(carry, idx):
            p, s = carry
            g = jax.grad(lambda q: softmax_cross_entropy(model.apply({"params": q}, x[idx]), y[idx]))(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        idx = jax.random.randint(k_data, (300, 128), 0, x.shape[0])
        return jax.lax.scan(body, (p, tx.init(p)), idx)[0][0]

    stacked = train(jax.random.split(jax.random.key(0), 3))
    models = [jax.tree.map(lambda v, i=i: v[i], stacked) for i in range(3)]
    train_loss = jax.jit(lambda p: softmax_cross_entropy(model.apply({"params": p}, x), y))
    xt, yt = jnp.asarray(d.x_test), jnp.asarray(d.y_test)
    test_loss = jax.jit(lambda p: softmax_cross_entropy(model.apply({"params": p}, xt), yt))
    test_acc = jax.jit(lambda p: (jnp.argmax(model.apply({"params": p}, xt), -1) == yt).mean())
    return model, models, (x, y), train_loss, test_loss, test_acc


def test_ste_forward_is_the_hard_permuted_model_exactly():
    model, a = _small(0)
    _, b = _small(1)
    x, y = _data()
    perm = weight_matching(a, b, SPEC, progress=False)
    projected = jax.tree.map(np.asarray, apply_permutation(b, SPEC, perm))
    proxy = jax.tree.map(lambda v: v + np.float32(0.3), a)  # any proxy: the forward value must not depend on it
    loss_fn = _loss_fn(model)

    @jax.jit
    def run(proxy, projected, a):
        mid = jax.tree.map(lambda u, v: 0.5 * u + 0.5 * v, a, projected)
        val, g = jax.value_and_grad(ste_midpoint_loss)(proxy, projected, a, loss_fn, (x, y))
        g_proj = jax.grad(ste_midpoint_loss, argnums=1)(proxy, projected, a, loss_fn, (x, y))
        return straight_through(proxy, projected), val, loss_fn(mid, (x, y)), g, jax.grad(loss_fn)(mid, (x, y)), g_proj

    ste, val, direct, g, g_mid, g_proj = run(proxy, projected, a)
    for u, v in zip(jax.tree.leaves(ste), jax.tree.leaves(projected)):
        np.testing.assert_array_equal(u, v)
    # the forward is the hard-permuted midpoint: bitwise equal to the direct computation ...
    assert float(val) == float(direct)
    # ... and to an independent float64 NumPy transcription up to float32 rounding.
    mid_np = jax.tree.map(lambda u, v: 0.5 * np.asarray(u, np.float64) + 0.5 * np.asarray(v, np.float64), a, projected)
    np.testing.assert_allclose(float(val), _np_mlp_loss(mid_np, x, y), rtol=1e-5)
    # straight-through gradient: ∂L/∂θ̃ = t ∇L((1-t)θ_A + t π(θ_B)) (identity Jacobian through the projection)
    for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(g_mid)):
        np.testing.assert_allclose(u, 0.5 * v, rtol=1e-5, atol=1e-7)
    # no gradient flows to the projected model
    assert all(float(np.abs(u).max()) == 0.0 for u in jax.tree.leaves(g_proj))


def test_ste_recovers_the_permutation_of_a_permuted_copy():
    model, a = _small(2)
    perm = _random_perm(a, 3)
    b = apply_permutation(a, SPEC, perm)
    x, y = _data()
    a_copy = jax.tree.map(np.array, a)
    res = ste_permutation_search(a, b, SPEC, _loss_fn(model), [(x, y)], steps=4, optimizer=optax.adam(1e-2),
                                 progress=False)
    for k in perm:
        np.testing.assert_array_equal(res.perm[k], invert_permutation(perm)[k])
    for u, v in zip(jax.tree.leaves(res.params), jax.tree.leaves(a)):
        np.testing.assert_array_equal(u, v)
    assert res.losses.shape == res.scores.shape == (4,) and res.best_step == 0 and res.num_changes == 0
    ev = jax.jit(lambda p: _loss_fn(model)(p, (x, y)))
    assert loss_barrier(ev, a, res.params, progress=False) == pytest.approx(0.0, abs=1e-6)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(a_copy)):  # inputs untouched
        np.testing.assert_array_equal(u, v)


def test_merge_many_of_permuted_copies_recovers_the_model():
    _, a = _small(4)
    p1, p2 = _random_perm(a, 5), _random_perm(a, 6)
    models = [a, apply_permutation(a, SPEC, p1), apply_permutation(a, SPEC, p2)]
    for method in ("barycenter", "reference"):
        res = merge_many(None, models, SPEC, method=method, progress=False)
        for u, v in zip(jax.tree.leaves(res.params), jax.tree.leaves(a)):
            np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)  # the mean of three identical trees
        for m, pm, al in zip(models, res.info["perms"], res.info["aligned"]):
            for u, v in zip(jax.tree.leaves(apply_permutation(m, SPEC, pm)), jax.tree.leaves(al)):
                np.testing.assert_array_equal(u, v)
        assert res.info["distances"][-1] == pytest.approx(0.0, abs=1e-8)
        d = res.info["distances"]
        assert np.all(np.diff(d) <= 1e-6 * d[0] + 1e-9)
    # composition: permuting by p1 then p2 is one permutation by p1[p2]
    twice = apply_permutation(apply_permutation(a, SPEC, p1), SPEC, p2)
    once = apply_permutation(a, SPEC, compose_permutations(p1, p2))
    for u, v in zip(jax.tree.leaves(twice), jax.tree.leaves(once)):
        np.testing.assert_array_equal(u, v)


def test_sharded_ste_and_merge_many_match_single_device(mesh):
    model, a = _small(7)
    _, b = _small(8)
    _, c = _small(9)
    x, y = _data()

    def put(t):  # leading axis (16 rows / units) over the 8 devices, the rest replicated
        return jax.tree.map(lambda v: jax.device_put(v, NamedSharding(mesh, P("data") if v.shape[0] % 8 == 0
                                                                      else P())), t)

    kw = dict(steps=2, optimizer=optax.adam(5e-2), progress=False)
    ref = ste_permutation_search(a, b, SPEC, _loss_fn(model), [(x, y)], **kw)
    sh = ste_permutation_search(put(a), put(b), SPEC, _loss_fn(model), [(x, y)], **kw)
    # the sharded matmuls reduce in another order: losses agree to float32 rounding, permutations exactly
    np.testing.assert_allclose(sh.losses, ref.losses, rtol=1e-5)
    for k in ref.perm:
        np.testing.assert_array_equal(sh.perm[k], ref.perm[k])
    m_ref = merge_many(None, [a, b, c], SPEC, max_iter=1, progress=False)
    m_sh = merge_many(None, [put(a), put(b), put(c)], SPEC, max_iter=1, progress=False)
    for pr, ps in zip(m_ref.info["perms"], m_sh.info["perms"]):
        for k in pr:
            np.testing.assert_array_equal(pr[k], ps[k])
    for u, v in zip(jax.tree.leaves(m_sh.params), jax.tree.leaves(m_ref.params)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_validation():
    model, a = _small(10)
    _, b = _small(11)
    x, y = _data()
    lf = _loss_fn(model)
    with pytest.raises(ValueError, match="steps"):
        ste_permutation_search(a, b, SPEC, lf, [(x, y)], steps=0)
    with pytest.raises(ValueError, match="t must be"):
        ste_permutation_search(a, b, SPEC, lf, [(x, y)], t=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        ste_permutation_search(a, b, SPEC, lf, [(x, y)], learning_rate=-1.0)
    with pytest.raises(ValueError, match="batches"):
        ste_permutation_search(a, b, SPEC, lf, [], steps=2, progress=False)
    with pytest.raises(TypeError, match="trees first"):
        ste_permutation_search(SPEC, a, b, lf, [(x, y)])
    with pytest.raises(TypeError, match="loss_fn"):
        ste_permutation_search(a, b, SPEC, None, [(x, y)])
    with pytest.raises(TypeError, match="eval_fn"):
        ste_permutation_search(a, b, SPEC, lf, [(x, y)], eval_fn=1.0)
    bad = jax.tree.map(np.array, b)
    bad["Dense_0"]["kernel"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ste_permutation_search(a, bad, SPEC, lf, [(x, y)])
    with pytest.raises(ValueError, match="non-finite"):
        merge_many(None, [a, b, bad], SPEC)
    _, wide = _small(12, features=(16, 24))
    with pytest.raises(ValueError):
        ste_permutation_search(a, wide, SPEC, lf, [(x, y)])
    with pytest.raises(ValueError, match="at least 2"):
        merge_many(None, [a], SPEC)
    with pytest.raises(ValueError, match="method"):
        merge_many(None, [a, b], SPEC, method="mean")
    with pytest.raises(ValueError, match="max_iter"):
        merge_many(None, [a, b], SPEC, max_iter=0)
    with pytest.raises(ValueError, match="not a leaf"):
        merge_many(None, [a, b], mlp_permutation_spec(3))
    with pytest.raises(ValueError, match="names differ"):
        compose_permutations({"P_0": np.arange(3)}, {"P_1": np.arange(3)})


def test_ste_barrier_not_above_weight_matching_on_digits():
    """Git Re-Basin: the STE search (data-aware) finds permutations with a lower barrier than weight matching."""
    model, (a, b, _), (x, y), train_loss, test_loss, _ = digits_models()
    b_wm = apply_permutation(b, SPEC, weight_matching(a, b, SPEC, progress=False))
    res = ste_permutation_search(a, b, SPEC, _loss_fn(model), [(x, y)], steps=10, optimizer=optax.adam(2e-2),
                                 eval_fn=train_loss, progress=False)
    naive = loss_barrier(test_loss, a, b, progress=False)
    wm_train, wm_test = (loss_barrier(f, a, b_wm, progress=False) for f in (train_loss, test_loss))
    ste_train, ste_test = (loss_barrier(f, a, res.params, progress=False) for f in (train_loss, test_loss))
    print(f"barrier test: naive {naive:.3f} WM {wm_test:.3f} STE {ste_test:.3f}; "
          f"train: WM {wm_train:.4f} STE {ste_train:.4f}; best step {res.best_step}, {res.num_changes} changes")
    assert wm_test < 0.25 * naive  # weight matching already removes most of the barrier
    assert res.scores[res.best_step] <= res.scores[0]  # step 0 is plain weight matching
    assert ste_train <= wm_train + 1e-6
    assert ste_test < wm_test


def test_merge_many_three_models_beats_naive_average_on_digits():
    _, models, _, _, test_loss, test_acc = digits_models()
    naive = jax.tree.map(lambda *v: sum(v) / len(v), *models)
    bary = merge_many(None, models, SPEC, progress=False)
    refm = merge_many(None, models, SPEC, method="reference", progress=False)
    accs = {k: float(test_acc(p)) for k, p in (("naive", naive), ("barycenter", bary.params),
                                                ("reference", refm.params))}
    losses = {k: float(test_loss(p)) for k, p in (("naive", naive), ("barycenter", bary.params),
                                                  ("reference", refm.params))}
    print("test accuracy", accs, "test loss", losses, "passes", bary.info["iterations"])
    d = bary.info["distances"]
    assert np.all(np.diff(d) <= 1e-6 * d[0])  # MergeMany never increases the distance to the others' mean
    for k in ("barycenter", "reference"):
        assert accs[k] > accs["naive"] + 0.3 and losses[k] < 0.5 * losses["naive"]
    assert min(float(test_acc(m)) for m in models) - accs["barycenter"] < 0.1  # close to the individual models
