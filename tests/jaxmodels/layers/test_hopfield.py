"""Modern Hopfield layers (Ramsauer et al. 2021): update equation, one-step retrieval, pooling/lookup variants."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.layers import Hopfield, HopfieldLayer, HopfieldPooling, hopfield_update

from .helpers import assert_sharded_matches, assert_trains, train_digits


def np_softmax(a, axis):
    a = a - a.max(axis, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis, keepdims=True)


def np_update(X, xi, beta):
    """Paper's column form: X is [d, N], xi is [d]; xi_new = X softmax(beta X^T xi)."""
    return X @ np_softmax(beta * X.T @ xi, 0)


def test_update_matches_numpy_column_form():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 10)).astype(np.float32)  # d=16, N=10
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    out = jax.jit(hopfield_update, static_argnums=3)(jnp.asarray(X.T), jnp.asarray(queries), 0.5, 1)
    ref = np.stack([np_update(X.astype(np.float64), q, 0.5) for q in queries])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_one_step_retrieval_of_stored_pattern():
    # Theorem 4 of the paper: with well separated patterns and large beta, one update retrieves the pattern whose
    # basin the noisy query lies in, with exponentially small error.
    rng = np.random.default_rng(1)
    d, n = 64, 32
    X = rng.choice([-1.0, 1.0], size=(n, d)).astype(np.float32)  # binary patterns, separation ~ d
    target = 7
    noisy = X[target] * np.where(rng.random(d) < 0.2, -1.0, 1.0)  # flip 20% of the signs
    noisy = (noisy + 0.1 * rng.normal(size=d)).astype(np.float32)
    out = hopfield_update(jnp.asarray(X), jnp.asarray(noisy[None]), beta=1.0)[0]
    # Overlap with the target is ~0.6 d = 38, with others ~N(0, 8): softmax weight on the target > 1 - 1e-6.
    np.testing.assert_allclose(out, X[target], atol=1e-4)
    # And the raw layer (no projections) does the same.
    layer = Hopfield(use_projections=False, beta=1.0)
    y = layer.apply({}, jnp.asarray(noisy[None, None]), jnp.asarray(X[None]))
    np.testing.assert_allclose(y[0, 0], X[target], atol=1e-4)
    # Small beta does not retrieve (averages patterns): the claim depends on beta.
    far = hopfield_update(jnp.asarray(X), jnp.asarray(noisy[None]), beta=0.01)[0]
    assert np.abs(np.asarray(far) - X[target]).max() > 0.5


def test_hopfield_with_projections_matches_numpy():
    rng = np.random.default_rng(2)
    r = rng.normal(size=(2, 3, 8)).astype(np.float32)
    y = rng.normal(size=(2, 5, 6)).astype(np.float32)
    m = Hopfield(hidden_features=8, out_features=4, num_heads=2, update_steps=2)
    v = m.init(jax.random.key(0), r, y)
    out = jax.jit(m.apply)(v, r, y)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    dense = lambda x, n: x @ p[n]["kernel"] + p[n]["bias"]  # noqa: E731
    q, k, val = dense(r, "query"), dense(y, "key"), dense(y, "value")
    beta = 1 / np.sqrt(4)
    outs = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        qh, kh, vh = q[..., sl], k[..., sl], val[..., sl]
        qh = np_softmax(beta * qh @ kh.transpose(0, 2, 1), -1) @ kh  # one update in key space
        outs.append(np_softmax(beta * qh @ kh.transpose(0, 2, 1), -1) @ vh)
    ref = dense(np.concatenate(outs, -1), "out")
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)  # float32 vs float64, two softmax rounds


def test_bad_input_rejected():
    with pytest.raises(ValueError, match="update_steps"):
        Hopfield(update_steps=0).init(jax.random.key(0), jnp.zeros((1, 2, 4)), jnp.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match="widths"):
        hopfield_update(jnp.zeros((3, 4)), jnp.zeros((2, 5)), 1.0)


def test_sharded_equals_unsharded(mesh):
    x = jax.random.normal(jax.random.key(0), (16, 8, 8))
    for m in (HopfieldPooling(num_queries=2), HopfieldLayer(num_patterns=8)):
        v = m.init(jax.random.key(1), x)
        assert_sharded_matches(functools.partial(m.apply, v), x, mesh)


class _RowsAsSet(nn.Module):
    """Digits as a set of 8 row vectors; Hopfield pooling or lookup; linear classifier."""

    kind: str

    @nn.compact
    def __call__(self, x, train=False):
        s = nn.Dense(16)(x.reshape(x.shape[0], 8, 8))
        s = s + self.param("pos", nn.initializers.normal(0.1), (8, 16))  # row identity
        if self.kind == "pooling":
            h = HopfieldPooling(num_queries=4, hidden_features=16)(s)
        else:
            h = HopfieldLayer(num_patterns=32, hidden_features=16)(s).reshape(x.shape[0], -1)
        return nn.Dense(10)(h)


@pytest.mark.parametrize("kind", ["pooling", "layer"])
def test_trains_on_digits(kind):
    losses, acc = train_digits(_RowsAsSet(kind), steps=120)
    # Held-out accuracy measured over init/batch seeds 0-7 (CPU, 449 test digits):
    #   120 steps: pooling 0.889-0.913 (seed 0: 0.891), lookup 0.878-0.931 (seed 0: 0.878);
    #    40 steps (the old setting): pooling 0.64-0.76, lookup 0.70-0.91 -- not converged, so too seed-dependent
    #   to pin. The steps cost ~1 s (compilation dominates). 0.85 sits ~0.03 (13 test digits, about twice the
    #   seed-to-seed std of ~0.015) under the worst of the 8 seeds: room for platform rounding, while a layer that
    #   retrieves poorly (the 40-step runs, or chance 0.1) fails.
    assert_trains(losses, acc, min_acc=0.85)
