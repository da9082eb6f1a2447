"""Singular-vector alignment of corresponding layers of two models (Ito, Yamada & Kumagai, "Analysis of Linear Mode
Connectivity via Permutation-Based Weight Matching", ICLR 2025).

A permutation ``W' = P_out W P_inᵀ`` leaves a layer's singular values unchanged and only moves its singular vectors
(``u' = P_out u``, ``v' = P_in v``). With ``W_A = Σ_i σ_i^A u_i^A v_i^Aᵀ`` and ``W_B = Σ_j σ_j^B u_j^B v_j^Bᵀ``, the
weight-matching objective of a layer is::

    ⟨W_A, W_B⟩_F = Σ_{i,j} σ_i^A σ_j^B · M_ij,        M_ij = (u_i^Aᵀ u_j^B) (v_i^Aᵀ v_j^B)

so matching chiefly aligns the singular vectors of the *large* singular values, which is what Ito et al. show
explains linear mode connectivity (and why the L2 distance itself barely drops). :func:`singular_alignment`
computes, for the ``top_k`` largest singular values of one pair of matrices, the cosines ``|u_i^Aᵀ u_i^B|``,
``|v_i^Aᵀ v_i^B|``, the signed alignment ``a_i = M_ii`` (invariant to the SVD's sign choice, since ``(u, v)`` flip
together; 1 when the i-th rank-one components coincide in direction, ≈0 for unrelated ones) and the ``k x k`` matrix
``M``. Its ``score`` is ``mean_i a_i`` over the top ``k``. The exact per-layer statistic the paper plots could not be
sourced here (only its abstract and summaries); this module implements the decomposition above that its analysis
rests on, index by index, and ``score`` (with the σ-weighted ``weighted_score = Σ_i σ_i^A σ_i^B a_i / Σ_i σ_i^A
σ_i^B``) are this library's scalar summaries. :func:`l2_distance_ratio` is ``‖θ_A − π(θ_B)‖ / ‖θ_A − θ_B‖``, how
much a permutation shortens the L2 distance (the paper compares the distance with and without the permutation; its
normalised statistic is not reproduced exactly).

Kernels are in Flax layout (Dense ``[in, out]``, Conv ``[kh, kw, in, out]`` read as ``[kh·kw·in, out]``), so ``u``
lives on the input side and ``v`` on the output units; the measure is symmetric in this choice. Everything computes
in float32; :func:`singular_alignment` and :func:`layer_singular_alignment` are jit-able, the two scalar summaries
(:func:`mean_singular_alignment`, :func:`l2_distance_ratio`) return Python floats.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import check_compatible, flatten, is_concrete

PyTree = Any

__all__ = ["SingularAlignment", "singular_alignment", "layer_singular_alignment", "mean_singular_alignment",
           "l2_distance_ratio"]


class SingularAlignment(NamedTuple):
    """Top-``k`` singular-vector alignment of two matrices (module docstring): ``sigma_a``, ``sigma_b`` ``[k]``
    (descending singular values), ``left_cos``, ``right_cos`` ``[k]`` (``|u_i^Aᵀ u_i^B|``, ``|v_i^Aᵀ v_i^B|``),
    ``alignment [k]`` (``a_i = (u_i^Aᵀ u_i^B)(v_i^Aᵀ v_i^B)``), ``cross [k, k]`` (``M_ij``), ``score``
    (``mean_i a_i``) and ``weighted_score`` (``Σ σ_i^A σ_i^B a_i / Σ σ_i^A σ_i^B``)."""

    sigma_a: jax.Array
    sigma_b: jax.Array
    left_cos: jax.Array
    right_cos: jax.Array
    alignment: jax.Array
    cross: jax.Array
    score: jax.Array
    weighted_score: jax.Array


def _as_matrix(w: jax.Array) -> jax.Array:
    return jnp.reshape(w.astype(jnp.float32), (-1, w.shape[-1]))


@functools.partial(jax.jit, static_argnames=("k",))
def _alignment(w_a: jax.Array, w_b: jax.Array, k: int) -> SingularAlignment:
    ua, sa, vat = jnp.linalg.svd(_as_matrix(w_a), full_matrices=False)
    ub, sb, vbt = jnp.linalg.svd(_as_matrix(w_b), full_matrices=False)
    ua, ub, va, vb = ua[:, :k], ub[:, :k], vat[:k].T, vbt[:k].T
    hi = jax.lax.Precision.HIGHEST
    cu = jnp.dot(ua.T, ub, precision=hi)  # [k, k] u_i^A · u_j^B
    cv = jnp.dot(va.T, vb, precision=hi)
    cross = cu * cv
    diag = jnp.diagonal(cross)
    sa, sb = sa[:k], sb[:k]
    w = sa * sb
    weighted = jnp.sum(w * diag) / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)
    return SingularAlignment(sa, sb, jnp.abs(jnp.diagonal(cu)), jnp.abs(jnp.diagonal(cv)), diag, cross,
                             jnp.mean(diag), weighted)


def _check_matrix(w: Any, what: str) -> None:
    if getattr(w, "ndim", 0) < 2:
        raise ValueError(f"singular_alignment: {what} must have ndim >= 2, got shape {np.shape(w)}")
    if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
        raise ValueError(f"singular_alignment: {what} must be floating, got {jnp.result_type(w)}")
    if is_concrete(w):
        bad = jnp.sum(~jnp.isfinite(jnp.asarray(w)))
        if is_concrete(bad) and int(bad):
            raise ValueError(f"singular_alignment: {what} has {int(bad)} non-finite value(s) (NaN or Inf)")


def singular_alignment(w_a: jax.Array, w_b: jax.Array, *, top_k: int = 8) -> SingularAlignment:
    """The alignment of the ``top_k`` largest singular triplets of two same-shaped matrices (module docstring);
    ``top_k`` is clipped to the rank bound ``min(rows, cols)`` of the ``[-1, out]`` matrix. Jit-able (``top_k``
    static); the finiteness check runs on concrete inputs only.

    >>> r = singular_alignment(params_a["Dense_0"]["kernel"], permuted_b["Dense_0"]["kernel"], top_k=4)
    >>> r.score, r.alignment   # mean and per-index (u_iᴬ·u_iᴮ)(v_iᴬ·v_iᴮ)
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"singular_alignment: top_k must be an integer >= 1, got {top_k!r}")
    _check_matrix(w_a, "w_a")
    _check_matrix(w_b, "w_b")
    if tuple(w_a.shape) != tuple(w_b.shape):
        raise ValueError(f"singular_alignment: shapes differ: {tuple(w_a.shape)} vs {tuple(w_b.shape)}")
    rows = int(np.prod(w_a.shape[:-1]))
    k = min(int(top_k), rows, int(w_a.shape[-1]))
    return _alignment(w_a, w_b, k)


def layer_singular_alignment(params_a: PyTree, params_b: PyTree, *, top_k: int = 8, include: str = r"kernel$",
                             exclude: str | None = None) -> dict[str, SingularAlignment]:
    """:func:`singular_alignment` of every leaf with ``ndim >= 2`` whose path matches ``include`` (regex, default
    the kernels) and not ``exclude``: ``{path: SingularAlignment}`` in tree order. Compare ``params_a`` with a model
    before and after :func:`merging.permutation.apply_permutation` to see what the permutation aligned.

    >>> before = layer_singular_alignment(params_a, params_b)
    >>> after = layer_singular_alignment(params_a, apply_permutation(params_b, spec, weight_matching(a, b, spec)))
    """
    try:
        check_compatible(params_a, params_b, names=["params_a", "params_b"], check_dtype=False)
    except ValueError as e:
        raise ValueError(f"layer_singular_alignment: {e}") from None
    inc, exc = re.compile(include), re.compile(exclude) if exclude else None
    fb = flatten(params_b)
    out = {}
    for path, wa in flatten(params_a).items():
        if not inc.search(path) or (exc is not None and exc.search(path)) or getattr(wa, "ndim", 0) < 2:
            continue
        try:
            out[path] = singular_alignment(wa, fb[path], top_k=top_k)
        except ValueError as e:
            raise ValueError(f"layer_singular_alignment: at {path!r}: {e}") from None
    if not out:
        raise ValueError(f"layer_singular_alignment: no leaf with ndim >= 2 matches include={include!r}")
    return out


def mean_singular_alignment(params_a: PyTree, params_b: PyTree, *, top_k: int = 8, include: str = r"kernel$",
                            exclude: str | None = None, weighted: bool = False) -> float:
    """The mean over layers of :func:`layer_singular_alignment`'s ``score`` (``weighted_score`` with
    ``weighted=True``): one number that rises when a permutation aligns the top singular vectors.

    >>> mean_singular_alignment(params_a, aligned_b) > mean_singular_alignment(params_a, params_b)
    """
    layers = layer_singular_alignment(params_a, params_b, top_k=top_k, include=include, exclude=exclude)
    vals = [r.weighted_score if weighted else r.score for r in layers.values()]
    return float(np.mean(jax.device_get(vals)))


def l2_distance_ratio(params_a: PyTree, params_b: PyTree, permuted_b: PyTree) -> float:
    """``‖θ_A − π(θ_B)‖₂ / ‖θ_A − θ_B‖₂`` over all leaves (``permuted_b`` is ``π(θ_B)``): how much the permutation
    shortened the distance (1: not at all; Ito et al. find weight matching shortens it only a little).

    >>> l2_distance_ratio(params_a, params_b, apply_permutation(params_b, spec, perm))
    """
    try:
        check_compatible(params_a, params_b, permuted_b, names=["params_a", "params_b", "permuted_b"],
                         check_dtype=False)
    except ValueError as e:
        raise ValueError(f"l2_distance_ratio: {e}") from None
    num, den = jax.device_get(_sq_distances(flatten(params_a), flatten(params_b), flatten(permuted_b)))
    if not (np.isfinite(num) and np.isfinite(den)):
        raise ValueError("l2_distance_ratio: the parameters hold non-finite values")
    if den == 0.0:
        raise ValueError("l2_distance_ratio: params_a and params_b are identical (‖θ_A − θ_B‖ = 0)")
    return float(np.sqrt(num / den))


@jax.jit
def _sq_distances(fa, fb, fp):
    def sq(x, y):
        return sum(jnp.sum(jnp.square(x[k].astype(jnp.float32) - y[k].astype(jnp.float32))) for k in x)

    return sq(fa, fp), sq(fa, fb)
