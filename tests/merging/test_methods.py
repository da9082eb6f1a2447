"""Data-free merge methods: NumPy references written from the papers' / mergekit's equations, identity invariants,
sharded == unsharded, bf16 in/out, and input validation.

Tolerances: the JAX kernels and the NumPy references both compute in float32 with the same operations in a
different order, so results agree to a few ulps of the O(1) values (rtol=atol=1e-5 leaves ~100 ulps of margin).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import merging
import merging.ties
from merging import _common as C
from merging import sparsify as S
from merging.breadcrumbs import breadcrumbs, breadcrumbs_ties
from merging.dare import dare_linear, dare_ties
from merging.della import della, della_linear
from merging.linear import linear
from merging.model_stock import model_stock
from merging.nuslerp import nuslerp
from merging.slerp import slerp
from merging.task_arithmetic import add, apply_task_vector, negate, scale, task_arithmetic, task_vector
from merging.ties import ties
from merging.wise_ft import wise_ft
from jaxmodels.tree import flatten
from tests.merging.helpers import (assert_trees_close, assert_trees_equal, make_family, make_tree, np_tree,
                                   shard_tree)

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# NumPy references (mergekit semantics: argsort-based top-k, sign election, disjoint mean)

def np_magnitude(x, density, rescale=False):
    if density >= 1:
        return x
    k = max(1, int(density * x.size))
    idx = np.argsort(-np.abs(x).reshape(-1), kind="stable")[:k]
    m = np.zeros(x.size, np.float32)
    m[idx] = 1
    out = x * m.reshape(x.shape)
    if rescale:
        out = out * (np.abs(x).sum() / np.abs(out).sum())
    return out


def np_outliers(x, density, gamma):
    if density >= 1:
        return x
    n = x.size
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    idx = np.argsort(np.abs(x).reshape(-1), kind="stable")
    m = np.zeros(n, np.float32)
    m[idx[n_bot:n_bot + target]] = 1
    return x * m.reshape(x.shape)


def np_gta(base, models, weights, sparsify, consensus=None, normalize=False, lam=1.0):
    out = {}
    for p, b in flatten(base).items():
        deltas = np.stack([sparsify(flatten(m)[p] - b, i) for i, m in enumerate(models)])
        w = np.asarray(weights, np.float32).reshape((-1,) + (1,) * b.ndim)
        wd = deltas * w
        if consensus:
            if consensus == "sum":
                s = np.where(wd.sum(0) >= 0, 1.0, -1.0)
            else:
                s = np.where(np.sign(wd).sum(0) >= 0, 1.0, -1.0)
            mask = np.sign(wd) == s
            mixed = (wd * mask).sum(0)
            div = (w * mask).sum(0)
            div[div == 0] = 1
        else:
            mixed = wd.sum(0)
            div = np.broadcast_to(w.sum(0), mixed.shape).copy()
            div[np.abs(div) < 1e-8] = 1
        if normalize:
            mixed = mixed / div
        out[p] = b + lam * mixed
    return out


def flat(tree):
    return {k: np.asarray(v, np.float32) for k, v in flatten(tree).items()}


def assert_flat_close(got, want, **tol):
    got = flat(got)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], err_msg=k, **(tol or TOL))


# ---------------------------------------------------------------------------------------------------------------
# references

def test_registry_lists_every_data_free_method():
    for name in ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                 "della", "della_linear", "slerp", "nuslerp", "model_stock", "wise_ft"]:
        assert merging.get(name).name == name
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        merging.get("nope")


def test_linear_matches_numpy():
    _, models = make_family(3)
    w = [0.2, 0.5, 1.3]
    for normalize in (True, False):
        got = linear(None, models, weights=w, normalize=normalize)
        want = {p: sum(wi * flat(m)[p] for wi, m in zip(w, models)) / (sum(w) if normalize else 1.0)
                for p in flat(models[0])}
        assert_flat_close(got, want)


def test_task_arithmetic_matches_numpy_and_vector_ops():
    base, models = make_family(3)
    w = [1.0, -0.5, 0.7]
    got = task_arithmetic(base, models, weights=w, lambda_=0.8)
    want = np_gta(flat(base), [flat(m) for m in models], w, lambda d, i: d, lam=0.8)
    assert_flat_close(got, want)
    got_n = task_arithmetic(base, models, weights=w, normalize=True)
    assert_flat_close(got_n, np_gta(flat(base), [flat(m) for m in models], w, lambda d, i: d, normalize=True))
    # the same edit written with the task-vector algebra
    taus = [task_vector(base, m) for m in models]
    edit = add(scale(taus[0], 1.0), negate(scale(taus[1], 0.5)), scale(taus[2], 0.7))
    assert_trees_close(apply_task_vector(base, edit, 0.8), got, **TOL)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_numpy(consensus, normalize):
    base, models = make_family(3)
    w, dens = [1.0, 0.6, 0.9], [0.3, 0.5, 0.7]
    got = ties(base, models, weights=w, density=dens, consensus=consensus, normalize=normalize)
    want = np_gta(flat(base), [flat(m) for m in models], w, lambda d, i: np_magnitude(d, dens[i]), consensus,
                  normalize)
    assert_flat_close(got, want)


def test_ties_rescale_is_l1_norm_matching():
    base, models = make_family(2)
    got = ties(base, models, density=0.4, rescale=True)
    want = np_gta(flat(base), [flat(m) for m in models], [1, 1], lambda d, i: np_magnitude(d, 0.4, True), "sum",
                  True)
    assert_flat_close(got, want)


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.3])
def test_breadcrumbs_matches_numpy(gamma):
    base, models = make_family(2)
    got = breadcrumbs(base, models, weights=[0.7, 1.2], density=0.6, gamma=gamma)
    want = np_gta(flat(base), [flat(m) for m in models], [0.7, 1.2], lambda d, i: np_outliers(d, 0.6, gamma))
    assert_flat_close(got, want)
    got = breadcrumbs_ties(base, models, weights=[0.7, 1.2], density=0.6, gamma=gamma)
    want = np_gta(flat(base), [flat(m) for m in models], [0.7, 1.2], lambda d, i: np_outliers(d, 0.6, gamma), "sum")
    assert_flat_close(got, want)


def _dare_mask(key, path, i, density, shape):
    # documented key derivation: fold_in(fold_in(key, crc32(path)), model index)
    k = jax.random.fold_in(C.leaf_key(key, path), i)
    return np.asarray(jax.random.bernoulli(k, density, shape))


@pytest.mark.parametrize("ties_step", [False, True])
def test_dare_matches_numpy_with_the_same_masks(ties_step):
    base, models = make_family(3)
    key = jax.random.key(42)
    dens, w = [0.3, 0.5, 0.9], [1.0, 0.5, 0.8]
    fn = dare_ties if ties_step else dare_linear
    got = flat(fn(base, models, key=key, weights=w, density=dens))
    fb, fms = flat(base), [flat(m) for m in models]
    for p, b in fb.items():
        sp = lambda d, i: np_l1_rescale(d, d * _dare_mask(key, p, i, dens[i], d.shape))  # mergekit 0.1.5's rule
        want = np_gta({p: b}, [{p: m[p]} for m in fms], w, sp, "sum" if ties_step else None)[p]
        np.testing.assert_allclose(got[p], want, **TOL)


def np_l1_rescale(delta, kept):
    """mergekit 0.1.5 ``rescaled_masked_tensor(.., RescaleNorm.l1)``: kept * |delta|_1 / |kept|_1 (unchanged when
    either norm is below 1e-7)."""
    before, after = np.abs(delta).sum(dtype=np.float64), np.abs(kept).sum(dtype=np.float64)
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def test_dare_inverse_p_is_reproducible_unbiased_and_drops_at_rate():
    """``rescale_norm="inverse_p"``: the DARE paper's 1/p rescale (unbiased)."""
    base = {"w": jnp.zeros((200, 100))}
    tau = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((200, 100)), jnp.float32)}
    a = dare_linear(base, [tau], key=jax.random.key(1), density=0.2, rescale_norm="inverse_p")
    b = dare_linear(base, [tau], key=jax.random.key(1), density=0.2, rescale_norm="inverse_p")
    c = dare_linear(base, [tau], key=jax.random.key(2), density=0.2, rescale_norm="inverse_p")
    assert_trees_equal(a, b)
    assert not np.array_equal(a["w"], c["w"])
    kept = np.asarray(a["w"]) != 0
    # 20000 Bernoulli(0.2) draws: std of the kept fraction is 0.0028; 0.015 is > 5 sigma
    assert abs(kept.mean() - 0.2) < 0.015
    np.testing.assert_allclose(np.asarray(a["w"])[kept], np.asarray(tau["w"])[kept] / 0.2, rtol=1e-6)
    # E[out] = tau: averaging 50 independent draws shrinks the error by ~sqrt(50)
    mean = np.mean([np.asarray(dare_linear(base, [tau], key=jax.random.key(k), density=0.2,
                                           rescale_norm="inverse_p")["w"])
                    for k in range(50)], 0)
    rel = np.linalg.norm(mean - tau["w"]) / np.linalg.norm(tau["w"])
    assert rel < 0.35, rel  # expected sqrt((1-p)/(p*50)) = 0.28


def test_dare_default_rescale_restores_the_l1_norm():
    """The default (mergekit 0.1.5 ``rescale: true``) is L1 matching, not 1/p."""
    base, models = make_family(1)
    got = dare_linear(base, models, key=jax.random.key(0), density=0.5)
    assert_trees_equal(got, dare_linear(base, models, key=jax.random.key(0), density=0.5, rescale_norm="l1"))
    with pytest.raises(ValueError, match="rescale_norm"):  # 1/p only exists for the random sparsifiers
        S.magnitude(jnp.ones(4), 0.5, "inverse_p")
    for p, b in flat(base).items():
        np.testing.assert_allclose(np.abs(flat(got)[p] - b).sum(), np.abs(flat(models[0])[p] - b).sum(), rtol=1e-4)


def test_della_matches_mergekit_rule_with_the_same_draws():
    """Reference written from mergekit 0.1.5 ``della_magprune`` (not from this implementation): per row
    (a 1-D tensor is one row) ranks r = 1..m of |x| ascending, rank_norm = (r - min r) / (max r - min r),
    p = density - eps + 2 eps rank_norm, mask ~ Bernoulli(p), then ``rescale: true`` = L1 matching of the whole
    masked tensor (``rescaled_masked_tensor(.., RescaleNorm.l1)``), never a division by p. The draws u are the
    documented ones (keep where u < p); ``rescale_norm="inverse_p"`` is the DELLA paper's x m / p."""
    base = {"w": jnp.zeros((6, 50)), "b": jnp.zeros((40,))}
    tau = make_tree(3, shapes={"w": (6, 50), "b": (40,)})
    key = jax.random.key(7)
    dens, eps = 0.5, 0.2
    got = flat(della_linear(base, [tau], key=key, density=dens, epsilon=eps))
    got_p = flat(della_linear(base, [tau], key=key, density=dens, epsilon=eps, rescale_norm="inverse_p"))
    for p, t in flat(tau).items():
        t2 = np.asarray(t).reshape(1, -1) if t.ndim < 2 else np.asarray(t)
        r = np.empty(t2.shape)
        for row in range(t2.shape[0]):  # 1-based ascending rank, ties by index
            r[row, sorted(range(t2.shape[1]), key=lambda j: (abs(t2[row, j]), j))] = np.arange(1, t2.shape[1] + 1)
        rank_norm = (r - r.min(1, keepdims=True)) / (r.max(1, keepdims=True) - r.min(1, keepdims=True))
        probs = (dens - eps) + rank_norm * 2 * eps
        u = np.asarray(jax.random.uniform(jax.random.fold_in(C.leaf_key(key, p), 0), t2.shape))
        masked = t2 * (u < probs)
        np.testing.assert_allclose(got[p], np_l1_rescale(t2, masked).reshape(t.shape), **TOL)
        np.testing.assert_allclose(got_p[p], (masked / probs).reshape(t.shape), **TOL)
    # della (with election) on one model: sign election keeps every nonzero entry; normalize divides by w=1
    got_d = flat(della(base, [tau], key=key, density=dens, epsilon=eps))
    for p in got:
        np.testing.assert_allclose(got_d[p], got[p], **TOL)


def np_slerp(t, v0, v1):
    u0, u1 = v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)
    dot = float((u0 * u1).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = np.arccos(dot)
    return np.sin((1 - t) * th) / np.sin(th) * v0 + np.sin(t * th) / np.sin(th) * v1


def test_slerp_matches_numpy_and_endpoints():
    a, b = make_tree(0), make_tree(1)
    for t in (0.0, 0.3, 1.0):
        got = slerp(a, [b], t=t)
        assert_flat_close(got, {p: np_slerp(t, flat(a)[p], flat(b)[p]) for p in flat(a)})
    assert_trees_close(slerp(a, [b], t=0.0), a, **TOL)
    assert_trees_close(slerp(a, [b], t=1.0), b, **TOL)
    # norm is preserved between equal-norm vectors (the point of SLERP): |slerp| = |a| when |a| = |b|
    x = {"v": jnp.asarray([1.0, 0.0])}
    y = {"v": jnp.asarray([0.0, 1.0])}
    np.testing.assert_allclose(np.linalg.norm(slerp(x, [y], t=0.5)["v"]), 1.0, rtol=1e-6)


def np_nuslerp(t, v0, v1, row_wise, flatten_):
    shape = v0.shape
    if flatten_:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise and v0.ndim > 1:
        v0, v1 = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
    cos = np.clip((unit(v0) * unit(v1)).sum(-1, keepdims=True), -1, 1)
    th = np.arccos(cos)
    res = (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)
    if row_wise and not flatten_ and res.ndim > 1:
        res = np.swapaxes(res, 0, -1)
    return res.reshape(shape)


@pytest.mark.parametrize("row_wise,flatten_", [(False, True), (False, False), (True, False)])
def test_nuslerp_matches_numpy(row_wise, flatten_):
    base, models = make_family(2)
    w = [0.3, 0.9]
    t = 0.9 / 1.2
    got = nuslerp(None, models, weights=w, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten_)
    assert_flat_close(got, {p: np_nuslerp(t, flat(models[0])[p], flat(models[1])[p], row_wise, flatten_)
                            for p in flat(base)})
    got = nuslerp(base, models, weights=w, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten_)
    fb = flat(base)
    assert_flat_close(got, {p: fb[p] + np_nuslerp(t, flat(models[0])[p] - fb[p], flat(models[1])[p] - fb[p],
                                                   row_wise, flatten_) for p in fb})


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_numpy(filter_wise):
    base, models = make_family(3)
    got = model_stock(base, models, filter_wise=filter_wise)
    want = {}
    for p, w0 in flat(base).items():
        ws = [flat(m)[p] for m in models]
        shape = w0.shape
        if filter_wise:
            W0 = w0[None] if w0.ndim == 1 else w0
            Ws = [w[None] if w.ndim == 1 else w for w in ws]
        else:
            W0, Ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
        offs = [w - W0 for w in Ws]
        cs = [(offs[i] * offs[j]).sum(-1) / (np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1))
              for i in range(3) for j in range(i + 1, 3)]
        c = np.mean(cs, 0)[..., None]
        t = 3 * c / (1 + 2 * c)
        want[p] = (t * sum(Ws) / 3 + (1 - t) * W0).reshape(shape)
    assert_flat_close(got, want)


def test_model_stock_ratio_follows_the_angle():
    # two fine-tuned offsets at 90 degrees: cos=0 -> t=0 -> the base; at 0 degrees: t=1 -> the average
    base = {"w": jnp.zeros(2)}
    ortho = [{"w": jnp.asarray([1.0, 0.0])}, {"w": jnp.asarray([0.0, 1.0])}]
    np.testing.assert_allclose(model_stock(base, ortho)["w"], [0, 0], atol=1e-7)
    same = [{"w": jnp.asarray([1.0, 2.0])}, {"w": jnp.asarray([2.0, 4.0])}]
    np.testing.assert_allclose(model_stock(base, same)["w"], [1.5, 3.0], rtol=1e-6)


def test_wise_ft_matches_numpy():
    a, b = make_tree(0), make_tree(1)
    got = wise_ft(a, [b], alpha=0.25)
    assert_flat_close(got, {p: 0.75 * flat(a)[p] + 0.25 * flat(b)[p] for p in flat(a)})


# ---------------------------------------------------------------------------------------------------------------
# invariants

def test_merging_copies_of_one_model_returns_it():
    base, (m,) = make_family(1)
    copies = [m, m, m]
    assert_trees_close(linear(None, copies, weights=[0.2, 0.3, 0.9]), m, **TOL)
    assert_trees_close(task_arithmetic(base, copies, normalize=True), m, **TOL)
    assert_trees_close(ties(base, copies, density=1.0), m, **TOL)
    assert_trees_close(breadcrumbs(base, copies, density=1.0, normalize=True), m, **TOL)
    assert_trees_close(dare_ties(base, copies, density=1.0, normalize=True), m, **TOL)
    assert_trees_close(dare_linear(base, copies, density=1.0, normalize=True), m, **TOL)
    assert_trees_close(della(base, copies, density=1.0), m, **TOL)
    assert_trees_close(model_stock(base, copies), m, **TOL)
    assert_trees_close(slerp(m, [m], t=0.4), m, **TOL)
    assert_trees_close(nuslerp(None, [m, m], weights=[1, 2]), m, **TOL)
    assert_trees_close(wise_ft(m, [m], alpha=0.3), m, **TOL)


def test_ties_density_one_of_one_model_adds_its_task_vector_back():
    base, (m,) = make_family(1)
    tau = task_vector(base, m)
    assert_trees_close(ties(base, [m], density=1.0), apply_task_vector(base, tau), **TOL)
    # density < 1: exactly the top-k entries of tau are added back
    got = flat(ties(base, [m], density=0.25))
    for p, b in flat(base).items():
        np.testing.assert_allclose(got[p], b + np_magnitude(flat(tau)[p], 0.25), **TOL)


@pytest.mark.parametrize("n", [3000, 40000])  # lax.top_k path (<= 2^14 entries) and radix-select path
def test_kth_largest_is_the_exact_order_statistic(n):
    """``kth_largest`` equals ``np.sort(a)[::-1][k - 1]`` bit for bit, duplicates counted, on data with exact ties,
    a block of zeros, a huge dynamic range and an infinity, for k at both ends and in the middle."""
    rng = np.random.default_rng(n)
    a = np.abs(rng.standard_normal(n)).astype(np.float32)
    a[: n // 5] = 0.0  # many exact ties at zero
    a[n // 5: n // 3] = np.round(a[n // 5: n // 3] * 4) / 4  # ties at quarter steps
    a[n // 3: n // 3 + 50] = np.exp(rng.uniform(-80, 80, 50)).astype(np.float32)
    a[-1] = np.inf
    rng.shuffle(a)
    want = np.sort(a)[::-1]
    ks = (1, 2, 7, n // 10, n // 2, n - n // 5, n - n // 5 + 1, n - 1, n)
    got = jax.jit(lambda a: [S.kth_largest(a, k) for k in ks])(jnp.asarray(a))  # one compile for all k
    np.testing.assert_array_equal(np.asarray(got), want[np.asarray(ks) - 1])
    radix = jax.jit(S.kth_largest_radix, static_argnums=1)
    assert np.asarray(radix(jnp.asarray(a), n // 3)) == want[n // 3 - 1]
    with pytest.raises(ValueError, match="k must be in"):
        S.kth_largest(jnp.asarray(a), 0)


def test_ties_radix_path_sharded_equals_unsharded(mesh):
    """A leaf above 2^14 entries takes the radix select; partitioned over 8 devices it must pick the same
    thresholds (the result is then identical up to the reduction order of the merge itself)."""
    rng = np.random.default_rng(7)
    base = {"w": rng.standard_normal((256, 160)).astype(np.float32)}
    models = [{"w": base["w"] + 0.1 * rng.standard_normal((256, 160)).astype(np.float32)} for _ in range(2)]
    want = ties(base, models, density=0.3)
    got = ties(shard_tree(base, mesh), [shard_tree(m, mesh) for m in models], density=0.3)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))
    a = jnp.abs(jnp.asarray(models[0]["w"] - base["w"])).reshape(-1)
    np.testing.assert_array_equal(np.asarray(jax.jit(S.kth_largest, static_argnums=1)(a, 12288)),
                                  np.sort(np.asarray(a))[::-1][12287])


def _stacked_gta_election(base, models, weights, density, consensus):
    """The election written on an [n, ...] stack (the textbook form), to pin the running-sum kernel bit for bit."""
    b = base.astype(np.float32)
    d = jnp.stack([S.magnitude(m - b, density) for m in models])
    wd = d * jnp.asarray(weights, jnp.float32).reshape(-1, *([1] * b.ndim))
    mask = merging.ties.sign_consensus_mask(wd, consensus)
    div = jnp.where(mask, jnp.asarray(weights, jnp.float32).reshape(-1, *([1] * b.ndim)), 0.0).sum(0)
    return b + jnp.where(mask, wd, 0.0).sum(0) / jnp.where(div == 0, 1.0, div)


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_election_is_bit_identical_to_the_stacked_form(consensus):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((64, 48)).astype(np.float32)
    models = [base + 0.1 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(3)]
    models[2][:8] = base[:8]  # zero task-vector entries (never agree), and a row where only signs cancel
    models[1][8] = base[8] + (models[0][8] - base[8])
    weights = [1.0, -0.5, 0.8]  # a negative weight flips that model's vote
    got = ties({"w": base}, [{"w": m} for m in models], weights=weights, density=0.4, consensus=consensus)["w"]
    want = _stacked_gta_election(base, [jnp.asarray(m) for m in models], weights, 0.4, consensus)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_inputs_are_not_modified():
    base, models = make_family(2)
    snap = np_tree((base, models))
    ties(base, models, density=0.5)
    dare_ties(base, models, key=jax.random.key(0), density=0.5)
    assert_trees_equal(snap, np_tree((base, models)))


ALL_CALLS = {
    "linear": lambda b, ms: linear(None, ms, weights=[0.3, 0.7]),
    "task_arithmetic": lambda b, ms: task_arithmetic(b, ms, weights=[0.5, 0.5]),
    "ties": lambda b, ms: ties(b, ms, density=0.5),
    "dare_ties": lambda b, ms: dare_ties(b, ms, key=jax.random.key(3), density=0.5),
    "dare_linear": lambda b, ms: dare_linear(b, ms, key=jax.random.key(3), density=0.5),
    "breadcrumbs": lambda b, ms: breadcrumbs(b, ms, density=0.5, gamma=0.1),
    "della": lambda b, ms: della(b, ms, key=jax.random.key(3), density=0.5, epsilon=0.1),
    "slerp": lambda b, ms: slerp(b, ms[:1], t=0.3),
    "nuslerp": lambda b, ms: nuslerp(b, ms, weights=[1.0, 2.0], nuslerp_flatten=False),
    "model_stock": lambda b, ms: model_stock(b, ms),
    "wise_ft": lambda b, ms: wise_ft(b, ms[:1], alpha=0.3),
}


@pytest.mark.parametrize("name", sorted(ALL_CALLS))
def test_sharded_equals_unsharded(name, mesh):
    base, models = make_family(2)
    want = ALL_CALLS[name](base, models)
    got = ALL_CALLS[name](shard_tree(base, mesh), [shard_tree(m, mesh) for m in models])
    # same float32 program, only partitioned: reductions may be re-associated across shards (a few ulps)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    k = jax.tree.leaves(got)[0]
    assert len(k.sharding.device_set) >= 1


def _upcast(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _mixed(tree):
    """bf16 kernels, fp32 biases/scales (the common checkpoint layout)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x.astype(jnp.bfloat16 if "kernel" in jax.tree_util.keystr(p) else jnp.float32), tree)


@pytest.mark.parametrize("mixed", [False, True], ids=["bf16", "bf16+fp32"])
@pytest.mark.parametrize("name", sorted(ALL_CALLS))
def test_bf16_in_bf16_out_computed_in_float32(name, mixed):
    """Bit-for-bit: the merge of bf16 inputs equals the float32 merge of the same (exactly representable) values,
    rounded once to each leaf's own dtype. A bf16 inner computation, a double rounding, or a leaf returned in
    another leaf's dtype (mixed trees) fails this. Achievable for every method here: the kernels see the same
    float32 values either way and run the same compiled program (no sharding, so no reduction reordering)."""
    cast = _mixed if mixed else (lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t))
    base, models = make_family(2)
    base, models = cast(base), [cast(m) for m in models]
    got = ALL_CALLS[name](base, models)
    want = ALL_CALLS[name](_upcast(base), [_upcast(m) for m in models])
    for (path, g), w, ref in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                                 jax.tree.leaves(base)):
        assert g.dtype == ref.dtype, (jax.tree_util.keystr(path), g.dtype, ref.dtype)
        assert w.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w.astype(ref.dtype)),
                                      err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------------------------
# bad input

def test_bad_inputs_raise_clear_errors_before_any_work():
    base, models = make_family(2)
    bad = make_family(1)[1][0]
    bad["dense"]["kernel"] = np.zeros((16, 9), np.float32)
    with pytest.raises(ValueError, match=r"model_1.*dense/kernel.*\(16, 8\).*\(16, 9\)"):
        ties(base, [models[0], bad], density=0.5)
    missing = dict(models[0])
    del missing["scale"]
    with pytest.raises(ValueError, match="scale.*missing"):
        task_arithmetic(base, [missing])
    for d in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            ties(base, models, density=d)
    with pytest.raises(ValueError, match="2 entries for 3 models|3 entries for 2 models"):
        ties(base, models, weights=[1, 2, 3])
    with pytest.raises(ValueError, match="explicit `key`"):
        dare_ties(base, models, density=0.5)
    with pytest.raises(ValueError, match="consensus"):
        ties(base, models, consensus="vote")
    with pytest.raises(ValueError, match="epsilon"):
        della(base, models, key=jax.random.key(0), density=0.1, epsilon=0.2)
    with pytest.raises(ValueError, match="exactly two"):
        slerp(base, models, t=0.5)
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(base, models[:1], alpha=1.5)
    # linear ignores an unused base, as mergekit does (see merging's package docstring)
    assert_trees_equal(linear(base, models), linear(None, models))
    with pytest.raises(TypeError, match="non-floating"):
        task_arithmetic({"a": np.zeros(3, np.int32)}, [{"a": np.ones(3, np.int32)}])
