"""Sparse Model Soups, Robust Weight Signatures and MC-SMoE expert merging: NumPy references written from the
papers' equations, invariants, sharded == unsharded, bf16 in/out, and input validation.

Tolerances: the JAX kernels and the NumPy references both compute in float32 with the same operations in a
different order, so results agree to a few ulps of O(1) values (rtol=atol=1e-5 leaves ~100 ulps of margin).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import merging
from jaxmodels.tree import flatten
from merging.sparse_soup import sparse_soup
from tests.merging.helpers import assert_trees_close, assert_trees_equal, make_tree, np_tree, shard_tree

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Sparse Model Soups

def sparse_family(n, seed=0, density=0.3, dtype=np.float32):
    """n models retrained from one pruned net: same magnitude mask (IMP keeps the largest weights), different values."""
    base = make_tree(seed)
    rng = np.random.default_rng(seed + 100)
    masks = jax.tree.map(lambda b: np.abs(b) >= np.quantile(np.abs(b), 1 - density), base)
    models = [jax.tree.map(lambda b, m: ((b + 0.1 * rng.standard_normal(b.shape)) * m).astype(dtype), base, masks)
              for _ in range(n)]
    return masks, models


def np_sparse_soup(models, weights, normalize=True):
    w = np.asarray(weights, np.float32)
    out = {}
    for p, x0 in flatten(np_tree(models[0])).items():
        xs = np.stack([flatten(np_tree(m))[p] for m in models])
        avg = np.tensordot(w, xs, axes=1)
        if normalize:
            avg = avg / w.sum()
        out[p] = avg * (x0 != 0)
    return out


def test_sparse_soup_matches_numpy_reference_and_keeps_the_mask():
    masks, models = sparse_family(3)
    weights = [1.0, 2.0, 0.5]
    got = sparse_soup(None, models, weight=weights)
    want = np_sparse_soup(models, weights)
    for p, g in flatten(got).items():
        np.testing.assert_allclose(np.asarray(g), want[p], **TOL)
    # sparsity preserved exactly: zero where the mask is off, and the averaged survivors are (generically) non-zero
    for p, g in flatten(got).items():
        m = flatten(masks)[p]
        assert np.all(np.asarray(g)[~m] == 0)
        assert np.all(np.asarray(g)[m] != 0)
    dense = sum(int(np.sum(np.asarray(x) != 0)) for x in jax.tree.leaves(got))
    assert dense == sum(int(np.sum(m)) for m in jax.tree.leaves(masks))


def test_sparse_soup_explicit_mask_and_unnormalized():
    masks, models = sparse_family(2, seed=3)
    got = sparse_soup(None, models, weight=[0.3, 0.7], normalize=False, mask=masks)
    want = np_sparse_soup(models, [0.3, 0.7], normalize=False)
    for p, g in flatten(got).items():
        np.testing.assert_allclose(np.asarray(g), want[p], **TOL)


def test_sparse_soup_of_copies_is_the_model():
    _, models = sparse_family(1)
    got = sparse_soup(None, [models[0]] * 4)
    # (4x)/4 in float32: x + x + x + x is exact for these magnitudes, /4 is exact (power of two)
    assert_trees_equal(got, models[0])


def test_sparse_soup_registered():
    assert merging.get("sparse_soup").fn is sparse_soup


def test_sparse_soup_sharded_equals_unsharded(mesh):
    _, models = sparse_family(3)
    want = sparse_soup(None, models)
    got = sparse_soup(None, [shard_tree(m, mesh) for m in models])
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    assert_trees_equal(jax.tree.map(lambda x: np.asarray(x) == 0, got), jax.tree.map(lambda x: np.asarray(x) == 0, want))


def test_sparse_soup_bf16_in_bf16_out():
    masks, models = sparse_family(2, dtype=jnp.bfloat16)
    got = sparse_soup(None, models)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    want = sparse_soup(None, [jax.tree.map(lambda x: x.astype(jnp.float32), m) for m in models])
    # float32 soup of the same bf16 values rounded once to bf16: within 1 bf16 ulp (2^-8 relative)
    assert_trees_close(got, want, rtol=2 ** -7, atol=1e-6)
    for p, g in flatten(got).items():
        assert np.all(np.asarray(g, np.float32)[~flatten(masks)[p]] == 0)


def test_sparse_soup_rejects_different_masks_naming_the_path():
    _, models = sparse_family(2)
    bad = jax.tree.map(lambda x: x, models[1])
    bad["out"]["kernel"] = bad["out"]["kernel"].copy()
    z = np.argwhere(bad["out"]["kernel"] == 0)[0]
    bad["out"]["kernel"][tuple(z)] = 1.0
    with pytest.raises(ValueError, match=r"model_1 differs from model_0 at 'out/kernel'"):
        sparse_soup(None, [models[0], bad])
    masks, _ = sparse_family(2)
    with pytest.raises(ValueError, match="outside `mask`"):
        sparse_soup(None, [models[0], bad], mask=masks)
    with pytest.raises(ValueError, match="no base"):
        sparse_soup(models[0], models)
    with pytest.raises(ValueError, match="sum to zero"):
        sparse_soup(None, models, weight=[1.0, -1.0])
    with pytest.raises(ValueError, match="entries"):
        sparse_soup(None, models, weight=[1.0, 1.0, 1.0])
