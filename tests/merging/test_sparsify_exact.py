"""Exact-k sparsification inside merges: bf16 task vectors tie constantly, and TIES / Breadcrumbs / DELLA must keep
exactly mergekit's count (``max(1, int(density * n))``) with the documented index tie-break, on the lax.top_k path
(<= 2^14 entries) and the radix path (here 2^15 + entries), sharded or not."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from merging import sparsify as S
from merging.breadcrumbs import breadcrumbs
from merging.ties import ties
from tests.merging.helpers import shard_tree

BF16 = ml_dtypes.bfloat16
SHAPES = {"big": (256, 160), "small": (48, 40)}  # 40960 entries (radix path) and 1920 (lax.top_k path)
DENSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)


@pytest.fixture(scope="module")
def bf16_pair():
    """bf16 base ~N(0, 0.02^2) and a fine-tune with noise 1e-3: the deltas take few distinct values."""
    rng = np.random.default_rng(0)
    base = {k: (0.02 * rng.standard_normal(s)).astype(BF16) for k, s in SHAPES.items()}
    model = {k: (v.astype(np.float32) + 1e-3 * rng.standard_normal(v.shape)).astype(BF16) for k, v in base.items()}
    return base, model


def _delta(base, model, k):
    return model[k].astype(np.float32) - base[k].astype(np.float32)


def test_bf16_deltas_really_tie(bf16_pair):
    base, model = bf16_pair
    d = np.abs(_delta(base, model, "big")).ravel()
    for density in DENSITIES:  # `>=` the k-th largest (the old rule) keeps extra entries at every density
        k = int(density * d.size)
        assert (d >= np.sort(d)[::-1][k - 1]).sum() > k, density


@pytest.mark.parametrize("density", DENSITIES)
def test_ties_keeps_exactly_k_lowest_index_ties(bf16_pair, density):
    """One model, weight 1: the merged delta is the trimmed delta itself (sign election keeps every nonzero)."""
    base, model = bf16_pair
    got = ties(base, [model], density=density)
    for name in SHAPES:
        d = _delta(base, model, name).ravel()
        k = max(1, int(density * d.size))
        keep = np.zeros(d.size, bool)
        keep[np.argsort(-np.abs(d), kind="stable")[:k]] = True  # mergekit's argsort[:k], ties in index order
        want = np.where(keep, model[name].ravel(), base[name].ravel()).reshape(SHAPES[name])
        np.testing.assert_array_equal(np.asarray(got[name]).view(np.uint16), want.view(np.uint16), err_msg=name)
        mask = np.asarray(S.magnitude_mask(jnp.asarray(d), density))
        assert mask.sum() == k, (name, density, mask.sum(), k)


@pytest.mark.parametrize("density,gamma", [(0.2, 0.05), (0.6, 0.1), (0.9, 0.2)])
def test_breadcrumbs_keeps_exactly_the_stable_ascending_slice(bf16_pair, density, gamma):
    base, model = bf16_pair
    got = breadcrumbs(base, [model], density=density, gamma=gamma)
    for name in SHAPES:
        d = _delta(base, model, name).ravel()
        n = d.size
        target, n_top = int(density * n), int(gamma * n)
        n_bot = max(0, n - target - n_top)
        keep = np.zeros(n, bool)
        keep[np.argsort(np.abs(d), kind="stable")[n_bot:n_bot + target]] = True  # mergekit's slice, stable order
        want = np.where(keep, d, 0.0)
        np.testing.assert_array_equal(np.asarray(got[name]).astype(np.float32).ravel(),
                                      (base[name].ravel().astype(np.float32) + want).astype(BF16).astype(np.float32))
        assert np.asarray(S.magnitude_outliers(jnp.asarray(d), density, gamma) != 0).sum() == (keep & (d != 0)).sum()


def test_della_ranks_ties_by_index():
    """DELLA's keep probabilities use stable ascending ranks: equal magnitudes get increasing ranks by index."""
    x = jnp.asarray(np.array([[0.5, -0.5, 0.1, 0.5, 0.0, -0.1]], np.float32))
    ranks = np.argsort(np.argsort(np.abs(np.asarray(x)), axis=1, kind="stable"), axis=1, kind="stable")
    np.testing.assert_array_equal(ranks, [[3, 4, 1, 5, 0, 2]])
    # feed u = p - tiny (keep everything): the inverse-p rescale then exposes p per entry
    probs = 0.5 - 0.2 + 0.4 * ranks / 5
    out = S.della_magprune(x, 0.5, 0.2, jax.random.key(0), rescale_norm="inverse_p")
    kept = np.asarray(out) != 0
    np.testing.assert_allclose(np.asarray(out)[kept], np.asarray(x)[kept] / probs[kept], rtol=1e-6)


def test_ties_radix_path_bf16_sharded_equals_single_device(bf16_pair, mesh):
    base, model = bf16_pair
    want = ties(base, [model], density=0.3)
    got = ties(shard_tree(base, mesh), [shard_tree(model, mesh)], density=0.3)
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(got[k]).view(np.uint16), np.asarray(want[k]).view(np.uint16))
