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

__all__ = ["num_kept", "kth_largest", "magnitude_mask", "magnitude", "bernoulli", "magnitude_outliers",
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


def kth_largest(a: jax.Array, k: int) -> jax.Array:
    """The k-th largest value (1-based) of a flat non-negative float32 array.

    Exact radix select on the IEEE bit pattern (non-negative floats order like their uint32 bits): two passes
    with 2^16-bin histograms (high then low 16 bits) instead of a full O(n log n) sort.
    """
    n = a.shape[0]
    if k >= n:
        return jnp.min(a)
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    hi = (bits >> 16).astype(jnp.int32)
    hist_hi = jnp.zeros(65536, jnp.int32).at[hi].add(1)
    # count of elements with high part >= b, for each bucket b (suffix sum)
    ge_hi = jnp.cumsum(hist_hi[::-1])[::-1]
    # bucket containing the k-th largest: the largest b with ge_hi[b] >= k
    b = jnp.max(jnp.where(ge_hi >= k, jnp.arange(65536), -1))
    above = jnp.where(b + 1 < 65536, ge_hi[jnp.minimum(b + 1, 65535)], 0)
    above = jnp.where(b == 65535, 0, above)
    k2 = k - above  # rank inside bucket b
    lo = (bits & 0xFFFF).astype(jnp.int32)
    in_b = hi == b
    hist_lo = jnp.zeros(65536, jnp.int32).at[lo].add(in_b.astype(jnp.int32))
    ge_lo = jnp.cumsum(hist_lo[::-1])[::-1]
    c = jnp.max(jnp.where(ge_lo >= k2, jnp.arange(65536), -1))
    kth_bits = (b.astype(jnp.uint32) << 16) | c.astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(kth_bits, jnp.float32)


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
