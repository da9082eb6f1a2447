"""Task-vector sparsification used by TIES, DARE, Model Breadcrumbs and DELLA (jit-able, float32 in/out).

- :func:`magnitude` (TIES, Yadav et al. 2023, "TIES-Merging"): keep the ``k = floor(density * n)`` entries of
  largest ``|x|``: ``x * 1[|x| >= |x|_(k)]`` where ``|x|_(k)`` is the k-th largest magnitude.
- :func:`bernoulli` (DARE, Yu et al. 2024, "Language Models are Super Mario"): ``m ~ Bernoulli(density)``,
  ``x * m / density`` (rescale) so that ``E[out] = x``.
- :func:`magnitude_outliers` (Model Breadcrumbs, Davari & Belilovsky 2024): drop the ``floor(gamma * n)``
  largest and then the smallest magnitudes so that ``floor(density * n)`` entries remain (mergekit's rule:
  if that is impossible, fewer large ones are dropped).
- :func:`della_magprune` (DELLA, Deep et al. 2024): per row (last axis for 2-D; the whole tensor for 1-D) keep
  probability ``p_i = density - eps + 2 eps (r_i - 1) / (m - 1)`` with ``r_i`` the ascending magnitude rank,
  ``x_i * m_i / p_i`` (rescale).

Ties in magnitude at the threshold keep all tied entries (mergekit's argsort keeps an arbitrary subset); with
real-valued weights ties only occur among exact zeros, which contribute nothing either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["num_kept", "kth_largest", "kth_largest_radix", "magnitude_mask", "magnitude", "bernoulli", "magnitude_outliers",
           "della_magprune", "rescale_to_norm", "RESCALE_NORMS"]

RESCALE_NORMS = (None, "l1", "l2", "linf")


def rescale_to_norm(x: jax.Array, masked: jax.Array, norm: str | None, eps: float = 1e-7) -> jax.Array:
    """mergekit's norm-matching rescale: ``masked * |x| / |masked|`` in the given norm (unchanged if either norm
    is below ``eps``)."""
    if norm is None:
        return masked
    if norm == "l1":
        before, after = jnp.abs(x).sum(), jnp.abs(masked).sum()
    elif norm == "l2":
        before, after = jnp.linalg.norm(x.reshape(-1)), jnp.linalg.norm(masked.reshape(-1))
    elif norm == "linf":
        before, after = jnp.abs(x).max(), jnp.abs(masked).max()
    else:
        raise ValueError(f"rescale norm must be one of {RESCALE_NORMS}, got {norm!r}")
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def num_kept(density: float, n: int) -> int:
    """``floor(density * n)``, at least 1 (mergekit refuses k=0; a tiny tensor keeps its largest entry)."""
    return max(1, min(n, int(density * n)))


# exact selection: up to _TOPK_MAX_N entries lax.top_k (cheap at that size, no 2^16-bin histograms), beyond that the
# radix select
_TOPK_MAX_N = 1 << 14


def kth_largest(a: jax.Array, k: int) -> jax.Array:
    """The exact k-th largest value (1-based, duplicates counted: ``np.sort(a)[::-1][k - 1]``) of a flat
    non-negative float32 array (e.g. ``|τ|``; NaN counts as the largest, as in the bit order).

    Up to ``2^14`` entries ``lax.top_k``; larger arrays the radix select of :func:`kth_largest_radix` (two
    histogram passes). Why not a sample-bracketed selection: on XLA:CPU a scatter costs ~6 ns per update whatever
    the indices (even all out of bounds), and compaction (``nonzero``, ``cumsum``, ``top_k``, ``sort``) is slower
    still, so restricting a pass to a bracket saves nothing; see ``bench/merge.py``.
    """
    n = a.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest: k must be in [1, {n}], got {k}")
    if k == n:
        return jnp.min(a)
    if n <= _TOPK_MAX_N:
        return jax.lax.top_k(a, k)[0][k - 1]
    return kth_largest_radix(a, k)


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


def kth_largest_radix(a: jax.Array, k: int) -> jax.Array:
    """Exact k-th largest by radix select on the IEEE bits (non-negative floats order like their bits): 2^16-bin
    histograms of the high then the low 16 bits, two passes over ``a``."""
    n = a.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest_radix: k must be in [1, {n}], got {k}")
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)
    hi = jax.lax.shift_right_logical(bits, 16)
    kk = jnp.int32(k)
    b, above_b = _suffix_locate(jnp.zeros(65536, jnp.int32).at[hi].add(1), kk, jnp.int32(0))
    lo = jnp.where(hi == b, bits & 0xFFFF, 65536)
    c, _ = _suffix_locate(jnp.zeros(65537, jnp.int32).at[lo].add(1)[:65536], kk, above_b)
    return jax.lax.bitcast_convert_type(jax.lax.shift_left(b, 16) | c, jnp.float32)


def magnitude_mask(x: jax.Array, density: float) -> jax.Array:
    """Boolean mask of the top-``density`` fraction of ``|x|`` (see module docstring)."""
    if density >= 1.0:
        return jnp.ones(x.shape, bool)
    a = jnp.abs(x.astype(jnp.float32))
    thr = kth_largest(a.reshape(-1), num_kept(density, x.size))
    return a >= thr


def magnitude(x: jax.Array, density: float, rescale_norm: str | None = None) -> jax.Array:
    if density >= 1.0:
        return x
    return rescale_to_norm(x, jnp.where(magnitude_mask(x, density), x, 0.0), rescale_norm).astype(x.dtype)


def bernoulli(x: jax.Array, density: float, key: jax.Array, rescale: bool = True,
              rescale_norm: str | None = None) -> jax.Array:
    """DARE drop: with ``rescale`` and no ``rescale_norm`` the paper's ``1/density``; with ``rescale_norm`` (e.g.
    "l1", what mergekit >= 0.1.5 does) the kept entries are scaled to restore that norm of ``x``."""
    if density >= 1.0:
        return x
    keep = jax.random.bernoulli(key, density, x.shape)
    out = jnp.where(keep, x, 0.0)
    if rescale and rescale_norm is None:
        out = out / density
    elif rescale:
        out = rescale_to_norm(x, out, rescale_norm)
    return out.astype(x.dtype)


def magnitude_outliers(x: jax.Array, density: float, gamma: float = 0.01, rescale_norm: str | None = None) -> jax.Array:
    if density >= 1.0:
        return x
    n = x.size
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    if target == 0:
        return jnp.zeros_like(x)
    a = jnp.abs(x.astype(jnp.float32)).reshape(-1)
    keep = jnp.ones(a.shape, bool)
    if n_bot > 0:  # drop the n_bot smallest: keep |x| >= the (n - n_bot)-th largest
        keep &= a >= kth_largest(a, n - n_bot)
    if n_top > 0:  # drop the n_top largest: keep |x| < the n_top-th largest
        keep &= a < kth_largest(a, n_top)
    return rescale_to_norm(x, jnp.where(keep.reshape(x.shape), x, 0.0), rescale_norm).astype(x.dtype)


def della_magprune(x: jax.Array, density: float, epsilon: float, key: jax.Array, rescale: bool = True,
                   rescale_norm: str | None = None) -> jax.Array:
    if density >= 1.0:
        return x
    shape = x.shape
    x2 = x.reshape(1, -1) if x.ndim < 2 else x
    a = jnp.abs(x2.astype(jnp.float32))
    # DELLA ranks along axis 1 (mergekit's convention for any rank >= 2)
    order = jnp.argsort(a, axis=1)
    ranks = jnp.argsort(order, axis=1).astype(jnp.float32)  # 0-based ascending rank = r - 1
    m = a.shape[1]
    rank_norm = ranks / (m - 1) if m > 1 else jnp.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * (2.0 * epsilon)
    keep = jax.random.uniform(key, probs.shape) < probs
    out = jnp.where(keep, x2.astype(jnp.float32), 0.0)
    if rescale and rescale_norm is None:
        out = out / probs
    elif rescale:
        out = rescale_to_norm(x2.astype(jnp.float32), out, rescale_norm)
    return out.reshape(shape).astype(x.dtype)
