"""Exact order statistics and exact top-k masks (jit-able, sharding-safe, no sort on large arrays).

- :func:`kth_largest`: the exact k-th largest value of a flat array of non-negative float32 (e.g. ``|x|``) or
  non-negative int32 values, duplicates counted: ``np.sort(a)[::-1][k - 1]``.
- :func:`top_k_mask`: a boolean mask with EXACTLY ``k`` True entries, the ``k`` largest values; entries tied with
  the k-th largest value are broken by flat index, ``ties="first"`` keeping the lowest indices (the order of a
  stable descending sort, ``torch.argsort(a, descending=True, stable=True)[:k]``) and ``ties="last"`` the highest
  (the complement of a stable ascending sort's first ``n - k``)::

      mask = 1[a > a_(k)]  ∪  {the first (or last) k - #{a > a_(k)} indices i with a_i = a_(k)}

``k`` is a Python int (validated: ``1 <= k <= n``) or a traced integer scalar (clipped to ``[1, n]``).
Up to ``2^14`` entries ``lax.top_k`` (static k; its documented order puts the lower index first among equal values)
or a sort (traced k); above, a radix select on the bits (non-negative floats order like their int32 bit patterns):
two 2^16-bin histogram passes for the threshold and, only when entries tie with it, two more over the tied
indices. NaN (positive bit pattern above +inf) counts as the largest value. Integer histograms make the result
identical whether the input is sharded or not. Why not a sample-bracketed selection or a cumsum over the ties: on
XLA:CPU a scatter costs ~2 ns per entry and a cumsum ~25 ns (``bench/merge.py --primitives``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["kth_largest", "top_k_mask", "TOPK_MAX_N"]

# up to TOPK_MAX_N entries lax.top_k / sort (cheap at that size, no 2^16-bin histograms); beyond that radix select
TOPK_MAX_N = 1 << 14


def _is_static(k) -> bool:
    return isinstance(k, (int, np.integer)) and not isinstance(k, bool)


def _as_bits(a: jax.Array) -> jax.Array:
    """Flat int32 keys ordered like ``a``: the IEEE bits of non-negative floats (as float32), or the ints."""
    a = a.reshape(-1)
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    if a.dtype != jnp.int32:
        raise TypeError(f"kth_largest: expected a float or int32 array, got {a.dtype}")
    return a


def _check_k(k, n: int, where: str):
    if _is_static(k):
        if not 1 <= int(k) <= n:
            raise ValueError(f"{where}: k must be in [1, {n}], got {k}")
        return int(k)
    return jnp.clip(jnp.asarray(k, jnp.int32), 1, n)


def _suffix_locate(hist: jax.Array, k: jax.Array, above: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For a histogram ``hist`` (bins in increasing value order) with ``above`` entries beyond its last bin, the
    bin ``j`` holding the k-th largest entry and the number of entries above that bin. Two levels of suffix sums
    (rows of 512 bins) instead of one long cumsum."""
    nb = hist.shape[0]
    cols = min(512, nb)
    rows = -(-nb // cols)
    h = jnp.pad(hist, (0, rows * cols - nb)).reshape(rows, cols)
    row_tot = h.sum(1)
    row_suffix = jnp.cumsum(row_tot[::-1])[::-1] + above  # entries >= start of row r
    r = jnp.max(jnp.where(row_suffix >= k, jnp.arange(rows), 0))
    above_row = row_suffix[r] - row_tot[r]
    col_suffix = jnp.cumsum(h[r][::-1])[::-1] + above_row
    c = jnp.max(jnp.where(col_suffix >= k, jnp.arange(cols), 0))
    j = r * cols + c
    return j, col_suffix[c] - h[r, c]


def _radix_bits(bits: jax.Array, k) -> jax.Array:
    """k-th largest of non-negative int32 keys: 2^16-bin histograms of the high then the low 16 bits."""
    hi = jax.lax.shift_right_logical(bits, 16)
    kk = jnp.asarray(k, jnp.int32)
    b, above_b = _suffix_locate(jnp.zeros(65536, jnp.int32).at[hi].add(1), kk, jnp.int32(0))
    lo = jnp.where(hi == b, bits & 0xFFFF, 65536)
    c, _ = _suffix_locate(jnp.zeros(65537, jnp.int32).at[lo].add(1)[:65536], kk, above_b)
    return jax.lax.shift_left(b.astype(jnp.int32), 16) | c.astype(jnp.int32)


def _select_bits(bits: jax.Array, k, radix: bool | None = None) -> jax.Array:
    n = bits.shape[0]
    if radix is None:
        radix = n > TOPK_MAX_N
    if _is_static(k) and k == n:
        return jnp.min(bits)
    if radix:
        return _radix_bits(bits, k)
    if _is_static(k):
        return jax.lax.top_k(bits, k)[0][k - 1]
    return jnp.sort(bits)[n - k]


def kth_largest(a: jax.Array, k, *, radix: bool | None = None) -> jax.Array:
    """The exact k-th largest value (1-based, duplicates counted) of ``a`` (flattened; non-negative floats, taken
    as float32, or non-negative int32). ``radix`` forces (True) or forbids (False) the radix select; by default it
    is used above ``TOPK_MAX_N`` entries. See the module docstring."""
    bits = _as_bits(a)
    k = _check_k(k, bits.shape[0], "kth_largest")
    out = _select_bits(bits, k, radix)
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(out, jnp.float32)
    return out


def top_k_mask(a: jax.Array, k, *, ties: str = "first", radix: bool | None = None) -> jax.Array:
    """Boolean mask of ``a``'s shape with exactly ``k`` True entries: the ``k`` largest values of ``a``
    (non-negative, e.g. ``|x|``), ties at the k-th value broken by flat index (``ties="first"``: lowest indices,
    ``"last"``: highest). See the module docstring."""
    if ties not in ("first", "last"):
        raise ValueError(f"top_k_mask: ties must be 'first' or 'last', got {ties!r}")
    shape = a.shape
    bits = _as_bits(a)
    n = bits.shape[0]
    k = _check_k(k, n, "top_k_mask")
    if _is_static(k) and k == n:
        return jnp.ones(shape, bool)
    if radix is None:
        radix = n > TOPK_MAX_N
    if _is_static(k) and not radix:
        src = bits if ties == "first" else bits[::-1]
        mask = jnp.zeros(n, bool).at[jax.lax.top_k(src, k)[1]].set(True)
        return (mask if ties == "first" else mask[::-1]).reshape(shape)
    t = _select_bits(bits, k, radix)
    gt = bits > t
    need = k - jnp.sum(gt, dtype=jnp.int32)  # >= 1: #{a >= t} >= k > #{a > t}
    tie = bits == t

    def resolve(_):
        idx = jnp.arange(n, dtype=jnp.int32)
        key = jnp.where(tie, n - idx if ties == "first" else idx + 1, 0)  # larger key = preferred tie
        return gt | (key >= _select_bits(key, need, radix))

    exact = jnp.sum(tie, dtype=jnp.int32) == need  # every tied entry fits: no index selection needed
    return jax.lax.cond(exact, lambda _: gt | tie, resolve, None).reshape(shape)
