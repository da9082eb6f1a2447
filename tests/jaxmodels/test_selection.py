"""jaxmodels.selection: the exact k-th largest and exact top-k masks (both the lax.top_k/sort path and the radix
path), against NumPy's stable sorts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.selection import TOPK_MAX_N, kth_largest, top_k_mask


def _tied(n, seed):
    rng = np.random.default_rng(seed)
    a = np.abs(rng.standard_normal(n)).astype(np.float32)
    a[: n // 4] = np.round(a[: n // 4] * 8) / 8  # many exact ties
    a[n // 4: n // 3] = 0.0
    rng.shuffle(a)
    return a


def _np_mask(a, k, ties):
    if ties == "first":  # stable descending: the lowest indices first among equal values
        idx = np.argsort(-a, kind="stable")[:k]
    else:  # stable ascending, keep the last k
        idx = np.argsort(a, kind="stable")[a.size - k:]
    m = np.zeros(a.size, bool)
    m[idx] = True
    return m


@pytest.mark.parametrize("n", [3000, 3 * TOPK_MAX_N])
def test_top_k_mask_keeps_exactly_k_with_index_tie_break(n):
    a = _tied(n, n)
    ks = (1, n // 10, n // 4, n // 2, n - n // 3 + 5, n - 1, n)
    for ties in ("first", "last"):
        got = jax.jit(lambda x: [top_k_mask(x, k, ties=ties) for k in ks])(jnp.asarray(a))
        for k, g in zip(ks, got):
            g = np.asarray(g)
            assert g.sum() == k, (ties, k)
            np.testing.assert_array_equal(g, _np_mask(a, k, ties), err_msg=f"{ties} k={k}")
    # traced k (error feedback adapts k under jit): same masks
    f = jax.jit(lambda x, k: top_k_mask(x, k))
    for k in (1, n // 4, n - 1):
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(a), jnp.int32(k))), _np_mask(a, k, "first"))


@pytest.mark.parametrize("n", [3000, 3 * TOPK_MAX_N])
def test_kth_largest_static_traced_and_int_keys(n):
    a = _tied(n, n + 1)
    want = np.sort(a)[::-1]
    for k in (1, n // 3, n):
        assert np.asarray(kth_largest(jnp.asarray(a), k)) == want[k - 1]
        assert np.asarray(jax.jit(kth_largest)(jnp.asarray(a), jnp.int32(k))) == want[k - 1]
    ints = np.random.default_rng(0).integers(0, 1 << 30, n).astype(np.int32)
    assert int(kth_largest(jnp.asarray(ints), n // 5)) == np.sort(ints)[::-1][n // 5 - 1]
    with pytest.raises(ValueError, match="k must be in"):
        kth_largest(jnp.asarray(a), n + 1)


def test_radix_mask_sharded_equals_single_device(mesh):
    a = _tied(8 * 6000, 3).reshape(8, 6000)
    k = a.size // 5
    f = jax.jit(lambda x: top_k_mask(x, k))
    want = np.asarray(f(jnp.asarray(a)))
    got = np.asarray(f(jax.device_put(jnp.asarray(a), NamedSharding(mesh, P(mesh.axis_names[0], None)))))
    np.testing.assert_array_equal(got, want)
    assert want.sum() == k
