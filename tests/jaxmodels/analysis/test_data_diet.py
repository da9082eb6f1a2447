"""Data diet: EL2N against NumPy and GraNd against float64 finite differences on a tiny MLP, batching and sharded
inputs, prune_by_score against the reference's argsort rule, validation, and the EL2N claim on digits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.analysis import el2n_scores, grand_scores, prune_by_score
from jaxmodels.datasets import load_digits_split
from jaxmodels.models import MLP

TINY = MLP(features=(4,), num_outputs=3, activation=nn.tanh)


def tiny_apply(p, x):
    return TINY.apply({"params": p}, x)


def _tiny_params(seed):
    """Parameters of TINY (Dense 5 -> 4 -> 3) drawn with NumPy (no compilation needed)."""
    r = np.random.default_rng(seed)
    return {"Dense_0": {"kernel": (r.standard_normal((5, 4)) / 2).astype(np.float32),
                        "bias": (r.standard_normal(4) / 4).astype(np.float32)},
            "Dense_1": {"kernel": (r.standard_normal((4, 3)) / 2).astype(np.float32),
                        "bias": (r.standard_normal(3) / 4).astype(np.float32)}}


def _np_loss_and_probs(p, x, y):
    h = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    z = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    z = z - z.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -np.log(prob[np.arange(len(y)), y]), prob


def _grand_fd(p, x, y, h=1e-6):
    """Per-example ‖∇θ CE‖₂ by central differences over every parameter, in NumPy float64."""
    keys = [(m, k) for m in sorted(p) for k in sorted(p[m])]
    grads = []
    for m, k in keys:
        for j in np.ndindex(p[m][k].shape):
            up = {a: {b: v.copy() for b, v in d.items()} for a, d in p.items()}
            dn = {a: {b: v.copy() for b, v in d.items()} for a, d in p.items()}
            up[m][k][j] += h
            dn[m][k][j] -= h
            grads.append((_np_loss_and_probs(up, x, y)[0] - _np_loss_and_probs(dn, x, y)[0]) / (2 * h))
    return np.linalg.norm(np.stack(grads, 1), axis=1)


def test_scores_match_numpy_and_finite_differences(mesh):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    seeds = [_tiny_params(s) for s in (0, 1)]
    before = jax.tree.map(np.array, seeds)

    @jax.jit
    def scores(seeds, x, y):
        return (el2n_scores(tiny_apply, seeds, x, y), grand_scores(tiny_apply, seeds, x, y),
                el2n_scores(tiny_apply, seeds, x, y, batch_size=3))

    el2n, grand, el2n_b = scores(seeds, jnp.asarray(x), jnp.asarray(y))
    p64 = [{m: {k: np.asarray(v, np.float64) for k, v in d.items()} for m, d in s.items()} for s in seeds]
    x64 = x.astype(np.float64)
    ref_el2n = np.mean([np.linalg.norm(_np_loss_and_probs(p, x64, y)[1] - np.eye(3)[y], axis=1) for p in p64], 0)
    ref_grand = np.mean([_grand_fd(p, x64, y) for p in p64], 0)
    # float32 forward / backward vs float64 (finite differences: truncation ~h² = 1e-12): rounding only,
    # measured 6e-8 (EL2N) and 1e-7 (GraNd) relative
    np.testing.assert_allclose(np.asarray(el2n), ref_el2n, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grand), ref_grand, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(el2n_b), np.asarray(el2n), rtol=1e-6)  # 3 batches, the last padded
    jax.tree.map(np.testing.assert_array_equal, seeds, before)
    # the examples sharded over 8 devices: per-example quantities, identical
    sh = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(jnp.asarray(x), sh), jax.device_put(jnp.asarray(y), sh)
    sharded = jax.jit(lambda s, x, y: (el2n_scores(tiny_apply, s, x, y), grand_scores(tiny_apply, s, x, y)))(
        seeds, xs, ys)
    np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(el2n), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sharded[1]), np.asarray(grand), rtol=1e-6)


def test_prune_by_score_matches_reference_rule():
    scores = np.array([0.3, 0.9, 0.1, 0.9, 0.5, 0.0, 0.7, 0.2, 0.6, 0.4], np.float32)
    ref = np.sort(scores.argsort(kind="stable")[-4:])  # data.py subset_train_idxs_by_scores, keep_max_scores
    np.testing.assert_array_equal(np.asarray(prune_by_score(scores, 0.4)), ref)
    np.testing.assert_array_equal(np.asarray(prune_by_score(scores, 0.4, keep="min")),
                                  np.sort(scores.argsort(kind="stable")[:4]))
    # offset from the top: skip the 2 hardest, keep the next 4
    np.testing.assert_array_equal(np.asarray(prune_by_score(scores, 0.4, offset=2)),
                                  np.sort(scores.argsort(kind="stable")[-6:-2]))
    assert prune_by_score(scores, 1.0).dtype == jnp.int32


def test_validation_rejects_bad_input():
    x = np.zeros((4, 5), np.float32)
    y = np.zeros(4, np.int32)
    p = _tiny_params(0)
    with pytest.raises(ValueError, match="non-empty sequence"):
        el2n_scores(tiny_apply, [], x, y)
    with pytest.raises(ValueError, match="non-empty sequence"):
        el2n_scores(tiny_apply, p, x, y)  # a single tree, not a list of trees
    with pytest.raises(ValueError, match="same leaf shapes"):
        grand_scores(tiny_apply, [p, jax.tree.map(lambda a: a[..., :1], p)], x, y)
    with pytest.raises(ValueError, match="y must be integer labels of shape"):
        el2n_scores(tiny_apply, [p], x, y[:3])
    with pytest.raises(TypeError, match="integer labels"):
        el2n_scores(tiny_apply, [p], x, y.astype(np.float32))
    with pytest.raises(ValueError, match="x holds NaN"):
        grand_scores(tiny_apply, [p], np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match="batch_size"):
        grand_scores(tiny_apply, [p], x, y, batch_size=0)
    with pytest.raises(ValueError, match="keep_fraction"):
        prune_by_score(np.ones(4, np.float32), 0.0)
    with pytest.raises(ValueError, match="offset"):
        prune_by_score(np.ones(4, np.float32), 0.5, offset=3)
    with pytest.raises(ValueError, match="keep must be"):
        prune_by_score(np.ones(4, np.float32), 0.5, keep="top")


DIGITS_MLP = MLP(features=(32,), num_outputs=10)


def digits_apply(p, x):
    return DIGITS_MLP.apply({"params": p}, x)


def _digits_params(seed: int, m: int):
    """``m`` stacked inits of DIGITS_MLP drawn with NumPy: normal kernels of variance 1/fan_in, zero biases."""
    r = np.random.default_rng(seed)
    return {"Dense_0": {"kernel": (r.standard_normal((m, 64, 32)) / 8.0).astype(np.float32),
                        "bias": np.zeros((m, 32), np.float32)},
            "Dense_1": {"kernel": (r.standard_normal((m, 32, 10)) / np.sqrt(32)).astype(np.float32),
                        "bias": np.zeros((m, 10), np.float32)}}


def run_data_diet(seed: int):
    """(test accuracy with all data, with the top-EL2N half, with three random halves) for one seed."""
    d = load_digits_split()
    x, y, xt, yt = (jnp.asarray(a) for a in d)
    tx = optax.adam(2e-2)

    @jax.jit
    def train_many(params, masks, steps):
        def one(p, mask):
            def loss(p):
                ce = optax.softmax_cross_entropy_with_integer_labels(digits_apply(p, x), y)
                return jnp.sum(ce * mask) / jnp.sum(mask)

            def body(_, c):
                u, o = tx.update(jax.grad(loss)(c[0]), c[1], c[0])
                return optax.apply_updates(c[0], u), o

            return jax.lax.fori_loop(0, steps, body, (p, tx.init(p)))[0]

        ps = jax.vmap(one)(params, masks)
        return ps, jax.vmap(lambda p: jnp.mean(digits_apply(p, xt).argmax(-1) == yt))(ps)

    m, n = 5, x.shape[0]
    early, _ = train_many(_digits_params(100 + seed, m), jnp.ones((m, n)), 20)
    scores = el2n_scores(digits_apply, [jax.tree.map(lambda a: a[i], early) for i in range(m)], x, y)
    keep = np.asarray(prune_by_score(scores, 0.5))
    assert keep.size == round(0.5 * n)
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n), np.float32)
    masks[0] = 1.0  # full data
    for j, subset in enumerate([keep] + [rng.permutation(n)[:keep.size] for _ in range(3)]):
        masks[j + 1, subset] = 1.0
    _, acc = train_many(_digits_params(1000 + seed, m), jnp.asarray(masks), 100)
    return float(acc[0]), float(acc[1]), np.asarray(acc[2:])


def test_claim_el2n_top_half_keeps_accuracy_random_halves_lose_more():
    """Paul et al.'s claim at digits scale: keeping the 50% highest-EL2N training examples (scores averaged over 5
    MLPs 64-32-10 trained 20 full-batch Adam steps, lr 2e-2: "early in training") keeps test accuracy, while random
    halves lose more. Every model trains 100 full-batch Adam steps (lr 2e-2) from its own init; subsets are loss
    masks over the full set, so one compiled trainer serves scores, full data and halves. Measured test accuracy
    (450 digits), seeds 0/1/2: full data 0.9666 / 0.9666 / 0.9621; EL2N top half 0.9710 / 0.9666 / 0.9666; three
    random halves 0.9621, 0.9555, 0.9599 / 0.9510, 0.9621, 0.9577 / 0.9621, 0.9488, 0.9465. So EL2N half - random
    mean = +1.19 / +0.97 / +1.41 points, EL2N half - best random half = +0.89 / +0.45 / +0.45, EL2N half - full =
    +0.45 / 0.00 / +0.45 (small gaps at this scale, but the paper's sign in every seed)."""
    full, top, rand = run_data_diet(seed=0)
    assert top > rand.mean() + 0.006, (top, rand)  # measured margins >= +0.97 points (3 seeds)
    assert top >= rand.max(), (top, rand)  # measured >= +0.45 points
    assert top >= full - 0.005, (top, full)  # measured >= 0.00 points
