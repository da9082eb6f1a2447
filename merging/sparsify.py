"""Task-vector sparsification used by TIES, DARE, Model Breadcrumbs and DELLA (jit-able, float32 in/out).

- :func:`magnitude` (TIES, Yadav et al. 2023, "TIES-Merging"): keep EXACTLY the ``k = max(1, floor(density * n))``
  entries of largest ``|x|`` (mergekit 0.1.5's ``argsort(|x|, descending=True)[:k]``).
- :func:`bernoulli` (DARE, Yu et al. 2024, "Language Models are Super Mario"): ``m ~ Bernoulli(density)``,
  ``x ⊙ m`` then rescaled (``rescale_norm``, below).
- :func:`magnitude_outliers` (Model Breadcrumbs, Davari & Belilovsky 2024): in ascending ``|x|`` order drop the
  ``n_bot`` smallest, keep the next ``floor(density * n)`` and drop the ``n_top`` largest, with
  ``n_top = floor(gamma * n)`` reduced when needed (mergekit's ``indices[n_bot : n_bot + target]``).
- :func:`della_magprune` (DELLA, Deep et al. 2024): per row (last axis for 2-D; the whole tensor for 1-D) keep
  probability ``p_i = density - eps + 2 eps (r_i - 1) / (m - 1)`` with ``r_i`` the ascending magnitude rank, then
  rescaled (``rescale_norm``).

Ties: exactly the requested number of entries is kept (bf16/fp16 deltas tie constantly). Entries tied in ``|x|``
are ordered by flat index as a STABLE sort does: TIES keeps the lowest-index ties (stable descending sort),
Breadcrumbs keeps ascending-stable ranks ``[n_bot, n_bot + target)`` (at the low cut the highest-index ties stay,
at the high cut the lowest-index ones) and DELLA ranks ties by index (stable ascending ``argsort``). mergekit
uses torch's default unstable sort, whose order among ties is an implementation detail of torch (on CPU it is not
index order); the parity fixtures are generated with torch's ``stable=True`` sort (see
``scripts/make_mergekit_reference.py``). Selection: :mod:`jaxmodels.selection` (exact, sharding-safe).

Rescale (``rescale_norm``; ``None`` = no rescale):

- ``"l1"`` / ``"l2"`` / ``"linf"``: mergekit's norm matching, ``x̂ = (x ⊙ m) · ‖x‖ / ‖x ⊙ m‖`` (unchanged if either
  norm is below 1e-7). mergekit >= 0.1.5 uses ``"l1"`` whenever ``rescale: true``; it is the default of every
  method here.
- ``"inverse_p"`` (random sparsifiers only): the DARE / DELLA papers' ``x̂_i = x_i m_i / p_i`` (``p_i = density``
  for DARE), so that ``E[x̂] = x``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmodels.selection import TOPK_MAX_N as _TOPK_MAX_N
from jaxmodels.selection import kth_largest, top_k_mask

__all__ = ["num_kept", "kth_largest", "kth_largest_radix", "magnitude_mask", "magnitude", "bernoulli",
           "magnitude_outliers", "della_magprune", "rescale_to_norm", "random_uniform", "RESCALE_NORMS",
           "NORM_RESCALES"]

NORM_RESCALES = ("l1", "l2", "linf")
RESCALE_NORMS = NORM_RESCALES + ("inverse_p",)


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
        raise ValueError(f"rescale norm must be one of {NORM_RESCALES}, got {norm!r}")
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def num_kept(density: float, n: int) -> int:
    """``floor(density * n)``, at least 1 (mergekit: ``max(1, int(density * n))``)."""
    return max(1, min(n, int(density * n)))


def kth_largest_radix(a: jax.Array, k) -> jax.Array:
    """:func:`jaxmodels.selection.kth_largest` forced onto its radix-select path."""
    return kth_largest(a, k, radix=True)


def random_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The float32 uniforms ``u`` of the random sparsifiers (kept where ``u < p``; ``jax.random.bernoulli`` is
    exactly this). One function so that a test can feed a given drop mask (e.g. mergekit's)."""
    return jax.random.uniform(key, shape, jnp.float32)


def magnitude_mask(x: jax.Array, density: float) -> jax.Array:
    """Boolean mask of exactly ``num_kept(density, n)`` largest ``|x|``, lowest-index ties first."""
    if density >= 1.0:
        return jnp.ones(x.shape, bool)
    return top_k_mask(jnp.abs(x.astype(jnp.float32)), num_kept(density, x.size), ties="first")


def _check_norm(norm, random: bool):
    allowed = RESCALE_NORMS if random else NORM_RESCALES
    if norm is not None and norm not in allowed:
        raise ValueError(f"rescale_norm must be None or one of {allowed}, got {norm!r}")


def magnitude(x: jax.Array, density: float, rescale_norm: str | None = None) -> jax.Array:
    """TIES trim: keep exactly the ``k = max(1, floor(density · n))`` entries of largest ``|x|`` (ties: lowest flat
    index first, :func:`magnitude_mask`), zero the rest, then rescale (``rescale_norm``: None, "l1", "l2" or "linf";
    see the module docstring). ``density >= 1`` returns ``x``; same shape and dtype as ``x``."""
    _check_norm(rescale_norm, False)
    if density >= 1.0:
        return x
    return rescale_to_norm(x, jnp.where(magnitude_mask(x, density), x, 0.0), rescale_norm).astype(x.dtype)


def _rescale_random(x, out, p, norm):
    if norm == "inverse_p":
        return out / p
    return rescale_to_norm(x, out, norm)


def bernoulli(x: jax.Array, density: float, key: jax.Array, rescale_norm: str | None = "l1") -> jax.Array:
    """DARE drop ``m = 1[u < density]`` (``u`` from :func:`random_uniform`) and rescale (module docstring)."""
    _check_norm(rescale_norm, True)
    if density >= 1.0:
        return x
    x32 = x.astype(jnp.float32)
    keep = random_uniform(key, x.shape) < density
    out = jnp.where(keep, x32, 0.0)
    return _rescale_random(x32, out, density, rescale_norm).astype(x.dtype)


def magnitude_outliers(x: jax.Array, density: float, gamma: float = 0.01, rescale_norm: str | None = None) -> jax.Array:
    """Model Breadcrumbs mask: in ascending ``|x|`` order drop the ``n_bot`` smallest entries, keep the next
    ``floor(density · n)`` and drop the ``n_top = floor(gamma · n)`` largest (``n_top`` reduced when
    ``n_bot = n - target - n_top`` would be negative), then rescale (``rescale_norm``); ties as in the module docstring.
    ``density >= 1`` returns ``x``; a zero target returns zeros. Same shape and dtype as ``x``."""
    _check_norm(rescale_norm, False)
    if density >= 1.0:
        return x
    n = x.size
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    if target == 0:
        return jnp.zeros_like(x)
    n_top = n - n_bot - target  # reduced when n_bot would be negative
    a = jnp.abs(x.astype(jnp.float32))
    # ascending stable ranks [n_bot, n_bot + target) = the (n - n_bot) largest minus the n_top largest, in the
    # reverse order (|x| descending, index descending): ties="last"
    keep = top_k_mask(a, n - n_bot, ties="last") if n_bot > 0 else jnp.ones(x.shape, bool)
    if n_top > 0:
        keep &= ~top_k_mask(a, n_top, ties="last")
    return rescale_to_norm(x, jnp.where(keep, x, 0.0), rescale_norm).astype(x.dtype)


def della_magprune(x: jax.Array, density: float, epsilon: float, key: jax.Array,
                   rescale_norm: str | None = "l1") -> jax.Array:
    """DELLA MagPrune (module docstring): ``m_i = 1[u_i < p_i]`` with ``u`` from :func:`random_uniform`."""
    _check_norm(rescale_norm, True)
    if density >= 1.0:
        return x
    shape = x.shape
    x2 = x.reshape(1, -1) if x.ndim < 2 else x
    a = jnp.abs(x2.astype(jnp.float32))
    # DELLA ranks along axis 1 (mergekit's convention for any rank >= 2); stable: ties ranked by index
    order = jnp.argsort(a, axis=1, stable=True)
    ranks = jnp.argsort(order, axis=1, stable=True).astype(jnp.float32)  # 0-based ascending rank = r - 1
    m = a.shape[1]
    rank_norm = ranks / (m - 1) if m > 1 else jnp.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * (2.0 * epsilon)
    keep = random_uniform(key, probs.shape) < probs
    x32 = x2.astype(jnp.float32)
    out = jnp.where(keep, x32, 0.0)
    return _rescale_random(x32, out, probs, rescale_norm).reshape(shape).astype(x.dtype)
