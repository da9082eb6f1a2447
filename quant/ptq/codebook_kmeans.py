"""Codebook quantization step 1: Hessian-weighted k-means (Lloyd/EM) with k-means++ or GPTVQ's Mahalanobis
seeding, and the quadratic-form argmin used by the assignment. Equations in :mod:`quant.ptq.codebook`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


from .codebook_storage import _HI


# ------------------------------------------------------------------------------------------- weighted k-means (1)

def weighted_distances(x, h, c):
    """D[..., i, c] = Σ_j h_ij (x_ij − C_cj)² for points ``x[..., N, d]``, importances ``h[..., N, d]`` and
    centroids ``c[..., k, d]`` (summed coordinate by coordinate: exact zeros for coinciding vectors)."""
    x, h, c = (jnp.asarray(a, jnp.float32) for a in (x, h, c))
    dist = 0.0
    for j in range(x.shape[-1]):
        dist = dist + h[..., :, j, None] * (x[..., :, j, None] - c[..., None, :, j]) ** 2
    return dist


def assign(x, h, c):
    """E-step: a_i = argmin_c Σ_j h_ij (x_ij − C_cj)² (first minimum on ties)."""
    return jnp.argmin(weighted_distances(x, h, c), axis=-1).astype(jnp.int32)


def kmeans_step(x, h, c):
    """One weighted Lloyd step (GPTVQ ``kmeans_vq`` iteration): E-step ``a = assign(x, h, c)``, then
    C_cj = Σ_{i: a_i=c} h_ij x_ij / Σ_{i: a_i=c} h_ij, an entry with zero total importance kept as it is.
    Any leading batch axes (one codebook each). Returns ``(new centroids, assignments)``."""
    x, h, c = (jnp.asarray(a, jnp.float32) for a in (x, h, c))
    a = assign(x, h, c)
    k, d = c.shape[-2:]
    lead = a.shape[:-1]
    G = int(np.prod(lead))
    ids = (a.reshape(G, -1) + k * jnp.arange(G, dtype=jnp.int32)[:, None]).reshape(-1)  # cluster id per point
    num = jax.ops.segment_sum((h * x).reshape(-1, d), ids, num_segments=G * k).reshape(*lead, k, d)
    den = jax.ops.segment_sum(h.reshape(-1, d), ids, num_segments=G * k).reshape(*lead, k, d)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), c), a


def _kpp_one(x, h, k, u):
    """Weighted k-means++ (D² sampling, as GPTVQ ``kpp_parallel_sampled``) for one group ``x[N, d]`` with uniforms
    ``u[k]``: the first seed drawn ∝ the point's total importance, each next one ∝ its importance-weighted squared
    distance to the nearest seed, by inverse CDF (a point at distance 0 is never drawn while another is farther; when
    all are at 0 the first point is taken — a harmless duplicate)."""
    N, d = x.shape

    def draw(p, ui):
        cdf = jnp.cumsum(p)
        idx = jnp.sum(cdf <= ui * cdf[-1])  # first i with cdf_i > u·total: p_i > 0
        last = N - 1 - jnp.argmax(p[::-1] > 0)  # u·total rounded up to the total: the last point with p > 0
        return jnp.where(cdf[-1] > 0, jnp.where(idx < N, idx, last), 0)

    i0 = draw(h.sum(-1), u[0])
    c = jnp.zeros((k, d), jnp.float32).at[0].set(x[i0])
    d2 = (h * (x - x[i0]) ** 2).sum(-1)

    def body(i, carry):
        c, d2 = carry
        idx = draw(d2, u[i])
        return c.at[i].set(x[idx]), jnp.minimum(d2, (h * (x - x[idx]) ** 2).sum(-1))

    return jax.lax.fori_loop(1, k, body, (c, d2))[0]


def _mahalanobis_one(x, k):
    """GPTVQ ``mahalanobis_init`` for one group: the points at ranks round(linspace(0, N−1, k)) of
    (x − μ)ᵀ Σ⁻¹ (x − μ), Σ = Σ_i (x_i − μ)(x_i − μ)ᵀ (pseudo-inverse when singular)."""
    xc = x - x.mean(0, keepdims=True)
    lam = jnp.linalg.pinv(jnp.matmul(xc.T, xc, precision=_HI))
    dist = (jnp.matmul(xc, lam, precision=_HI) * xc).sum(-1)
    order = jnp.argsort(dist)
    idx = jnp.round(jnp.linspace(0, x.shape[0] - 1, k)).astype(jnp.int32)
    return x[order[idx]]


@functools.partial(jax.jit, static_argnames=("iters", "init"))
def _kmeans(x, h, u, iters: int, init: str):
    k = u.shape[-1]
    if init == "kpp":
        c = jax.vmap(_kpp_one, in_axes=(0, 0, None, 0))(x, h, k, u)
    else:
        c = jax.vmap(_mahalanobis_one, in_axes=(0, None))(x, k)
    return jax.lax.fori_loop(0, iters, lambda i, c: kmeans_step(x, h, c)[0], c)


def kmeans(x, h, k: int, iters: int = 10, init: str = "kpp", seed: int = 0):
    """Weighted k-means on ``x[G, N, d]`` with importances ``h[G, N, d]``: one codebook ``[k, d]`` per group,
    seeded by ``init`` ("kpp": weighted k-means++ with uniforms from ``numpy.random.default_rng(seed)``;
    "mahalanobis": GPTVQ's deterministic init), ``iters`` Lloyd steps (:func:`kmeans_step`), then a final E-step.
    Returns ``(centroids[G, k, d], assignments[G, N])``."""
    x = jnp.asarray(x, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    u = jnp.asarray(np.random.default_rng(seed).random((x.shape[0], k)), jnp.float32)
    c = _kmeans(x, h, u, iters, init)
    return c, assign(x, h, c)
