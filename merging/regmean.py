"""RegMean and RegMean++: merging linear layers by the closed-form solution of a regression on their inputs.

RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023): for every linear
layer with weights ``W_i`` (``[d_in, d_out]``) and input Gram matrices ``G_i = X_iᵀ X_i`` of model ``i`` on its own
data, the merged weight minimizes ``Σ_i ||X_i W − X_i W_i||²``::

    W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i,      G̃_i = α G_i + (1 − α) diag(G_i)

where ``α ∈ [0, 1]`` shrinks the off-diagonal entries (the paper's ``reduce_non_diagonal_ratio``; α = 1 is the exact
least-squares solution, α = 0 gives a per-input-row weighted average). Every other parameter (biases, norms,
embeddings) is the uniform average (:func:`merging.linear.uniform_soup`).

**Rank-deficient Grams.** With fewer calibration tokens than ``d_in`` (usual for wide layers and small calibration
sets) and α = 1, ``A = Σ_i G̃_i`` is singular and the normal equations ``A W = B`` (``B = Σ_i G̃_i W_i``) have a
whole affine space of least-squares solutions; a plain ``solve`` returns an arbitrary, huge one. Here ``A`` is
eigendecomposed (``A = V Λ Vᵀ``, float32) and the solution is the least-squares one closest to the plain average
``W̄ = mean_i W_i``::

    W = W̄ + A⁺ (B − A W̄),      A⁺ = V diag(1/λ_j if λ_j > rcond·λ_max else 0) Vᵀ

(``rcond`` defaults to ``d_in · ε_float32``, NumPy's ``matrix_rank`` tolerance). It equals ``A⁻¹B`` when ``A`` has
full rank; directions of the input space no calibration token spans keep the average (in particular input
dimensions no model ever activates, zero Gram diagonal, keep the average row). A layer whose rank is below its
number of live input dimensions raises a ``UserWarning`` naming the layer, and is listed in the result's
``info["rank_deficient"]``.

**Gram weighting.** :mod:`jaxmodels.capture` Grams are token *sums* ``Σ_t x_t x_tᵀ``, so with ``gram_weighting=
"sum"`` (the default) a model calibrated on more tokens weighs more. The reference code (bloomberg
dataless-model-merging, ``compute_grams``) keeps a running per-token *mean* ``G_i / n_i``, which weighs every model's
Gram equally whatever its calibration size: ``gram_weighting="mean"`` does that, with the token counts ``n_i`` taken
from :class:`jaxmodels.capture.LayerStats` ``count`` (or ``token_counts`` for raw Gram arrays). With equal token
counts the two agree.

RegMean++ (Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model
Merging", 2025): the same solve, but layer by layer in forward order, with the inputs ``X_i^(l)`` of layer ``l``
computed by the *merged* model's earlier layers on task ``i``'s data (instead of model ``i``'s own layers), so the
regression accounts for the distribution shift the earlier merged layers cause.

Layer weights are the ``kernel`` leaves under a module path (see :mod:`jaxmodels.capture`); conv kernels
``[kh, kw, c_in, c_out]`` are solved as ``[kh·kw·c_in, c_out]`` matrices against im2col Gram matrices.

Calling convention (package docstring): ``regmean(base, models, grams)``, ``regmean_from_data(base, models,
apply_fn, batches)``, ``regmean_plusplus(base, models, apply_fn, batches)``; ``base`` is ignored (the merge is
of the models themselves); each returns ``MergeResult(params, info)`` with ``info = {"ranks": {layer: rank},
"rank_deficient": (layers...)}``.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmodels.capture import LayerStats, collect_stats, layer_order
from jaxmodels.progress import progress_bar
from jaxmodels.tree import check_compatible, flatten, unflatten
from merging._common import check_all_finite
from merging.linear import uniform_soup
from merging.result import MergeResult

PyTree = Any

__all__ = ["regmean", "regmean_solve", "regmean_from_data", "regmean_plusplus", "GRAM_WEIGHTINGS"]

GRAM_WEIGHTINGS = ("sum", "mean")


def _check_hparams(alpha: float, gram_weighting: str, rcond: float | None, method: str):
    if not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"{method}: alpha must be in [0, 1], got {alpha}")
    if gram_weighting not in GRAM_WEIGHTINGS:
        raise ValueError(f"{method}: gram_weighting must be one of {GRAM_WEIGHTINGS}, got {gram_weighting!r}")
    if rcond is not None and not (0.0 <= float(rcond) < 1.0):
        raise ValueError(f"{method}: rcond must be in [0, 1) (or None for d_in·eps), got {rcond}")


def _gram(g) -> jax.Array:
    return g.gram if isinstance(g, LayerStats) else jnp.asarray(g)


def _token_count(g, counts, i: int, layer: str, method: str) -> float:
    if counts is not None:
        c = counts[i]
        c = c[layer] if isinstance(c, Mapping) else c
    elif isinstance(g, LayerStats):
        c = g.count
    else:
        raise ValueError(f"{method}: gram_weighting='mean' needs token counts: pass LayerStats (collect_stats) or "
                         f"token_counts=[n_0, n_1, ...] for raw Gram arrays")
    c = float(c)
    if not (c > 0 and np.isfinite(c)):
        raise ValueError(f"{method}: token count of model {i} for layer {layer!r} must be positive, got {c}")
    return c


@jax.jit
def _solve(weights, grams, alpha, rcond):
    shape, dtype = weights[0].shape, weights[0].dtype
    d_in = grams[0].shape[0]
    hi = jax.lax.Precision.HIGHEST
    Ws = [w.astype(jnp.float32).reshape(d_in, -1) for w in weights]
    Gt = [alpha * g + (1.0 - alpha) * jnp.diag(jnp.diag(g)) for g in (g.astype(jnp.float32) for g in grams)]
    A = sum(Gt)
    A = 0.5 * (A + A.T)
    B = sum(jnp.dot(g, w, precision=hi) for g, w in zip(Gt, Ws))
    W_avg = sum(Ws) / len(Ws)
    lam, V = jnp.linalg.eigh(A)
    keep = lam > rcond * jnp.maximum(lam[-1], 0.0)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    R = B - jnp.dot(A, W_avg, precision=hi)
    W = W_avg + jnp.dot(V * inv, jnp.dot(V.T, R, precision=hi), precision=hi)
    rank = jnp.sum(keep)
    live = jnp.sum(jnp.diag(A) > 0)
    return W.reshape(shape).astype(dtype), rank, live


def _rcond(rcond, d_in):
    return jnp.float32(d_in * np.finfo(np.float32).eps if rcond is None else rcond)


def regmean_solve(weights: Sequence[jax.Array], grams: Sequence[jax.Array], alpha: float,
                  rcond: float | None = None) -> jax.Array:
    """``W̄ + A⁺(B − A W̄)`` (= ``(Σ G̃_i)⁻¹ Σ G̃_i W_i`` at full rank) for one layer, ``W_i`` of any shape
    ``[..., d_out]`` with ``prod(...) == d_in``; see the module docstring."""
    return _solve(list(weights), list(grams), jnp.float32(alpha), _rcond(rcond, grams[0].shape[0]))[0]


def _merge_layer(layer, weights, grams, alpha, rcond, ranks, deficient):
    W, rank, live = _solve(weights, grams, jnp.float32(alpha), _rcond(rcond, grams[0].shape[0]))
    if not isinstance(rank, jax.core.Tracer):
        rank, live = int(rank), int(live)
        ranks[layer] = rank
        if rank < live:
            deficient.append(layer)
            warnings.warn(f"regmean: layer {layer!r}: the Gram sum has numerical rank {rank} < {live} live input "
                          f"dimensions (alpha={float(alpha)}; eigenvalues below rcond·λ_max: fewer calibration tokens "
                          "than inputs, or nearly dead inputs); solved by least squares with those directions kept "
                          "at the average (see merging.regmean)", UserWarning, stacklevel=3)
    return W


def _weighted(Gs, raw, counts, gram_weighting, layer, method):
    if gram_weighting == "sum":
        return Gs
    return [G / _token_count(g, counts, i, layer, method) for i, (G, g) in enumerate(zip(Gs, raw))]


def regmean(base: PyTree | None, models: Sequence[PyTree], grams: Sequence[Mapping[str, Any]], *,
            alpha: float = 0.9, gram_weighting: str = "sum", token_counts: Sequence | None = None,
            rcond: float | None = None, check_finite: bool = True) -> MergeResult:
    """RegMean merge. ``base`` is ignored. ``grams[i]`` maps module paths (``"Dense_0"``, ``"block_0/attn/query"``)
    to model ``i``'s Gram matrix (a :class:`jaxmodels.capture.LayerStats` from ``collect_stats`` or a ``[d_in, d_in]``
    array). Layers in ``grams`` get the closed-form merge of their ``kernel``; every other leaf is averaged.
    ``gram_weighting``: ``"sum"`` (Grams as given: token sums) or ``"mean"`` (each divided by its token count, the
    reference code's per-token mean; counts from ``LayerStats.count`` or ``token_counts[i]``, a number or a
    ``{layer: number}`` dict). ``rcond``: relative eigenvalue cut-off of the least-squares solve (None:
    ``d_in·ε_float32``). Returns ``MergeResult(params, {"ranks": {layer: int}, "rank_deficient": tuple})``."""
    del base  # RegMean merges the models themselves
    models = list(models)
    if not models:
        raise ValueError("regmean: needs at least one model")
    _check_hparams(alpha, gram_weighting, rcond, "regmean")
    if len(grams) != len(models):
        raise ValueError(f"regmean: {len(grams)} Gram dicts for {len(models)} models")
    if token_counts is not None and len(token_counts) != len(models):
        raise ValueError(f"regmean: {len(token_counts)} token counts for {len(models)} models")
    check_compatible(*models, names=[f"model_{i}" for i in range(len(models))])
    keys = list(grams[0])
    for i, g in enumerate(grams[1:], 1):
        if set(g) != set(keys):
            raise ValueError(f"regmean: Gram dict {i} has layers {sorted(g)} but dict 0 has {sorted(keys)}")
    flats = [flatten(m) for m in models]
    merged = flatten(uniform_soup(models, check_finite=check_finite))
    todo = []
    for layer in keys:
        kpath = f"{layer}/kernel"
        if kpath not in merged:
            raise ValueError(f"regmean: Gram for layer {layer!r} but the models have no leaf {kpath!r}")
        raw = [g[layer] for g in grams]
        Gs = [_gram(g) for g in raw]
        d_in = int(np.prod(merged[kpath].shape[:-1]))
        for G in Gs:
            if G.shape != (d_in, d_in):
                raise ValueError(f"regmean: Gram of {layer!r} has shape {G.shape}, kernel needs ({d_in}, {d_in})")
        todo.append((layer, kpath, _weighted(Gs, raw, token_counts, gram_weighting, layer, "regmean")))
    if check_finite:
        check_all_finite([[G for _, _, Gs in todo for G in Gs]], ["grams"], "regmean")
    ranks, deficient = {}, []
    for layer, kpath, Gs in todo:
        merged[kpath] = _merge_layer(layer, [f[kpath] for f in flats], Gs, alpha, rcond, ranks, deficient)
    return MergeResult(unflatten(merged, like=models[0]), {"ranks": ranks, "rank_deficient": tuple(deficient)})


def regmean_from_data(base: PyTree | None, models: Sequence[PyTree], apply_fn: Callable,
                      batches: Sequence[Iterable], *, alpha: float = 0.9, gram_weighting: str = "sum",
                      rcond: float | None = None, include=None, exclude=None, mesh: Mesh | None = None,
                      progress: bool | None = None) -> MergeResult:
    """RegMean with each model's Gram matrices collected by running that model on its own ``batches[i]``
    (``include``/``exclude``: regexes on module paths choosing the layers that get the closed form). ``base`` is
    ignored; see :func:`regmean` for the rest."""
    models = list(models)
    _check_hparams(alpha, gram_weighting, rcond, "regmean")
    if len(batches) != len(models):
        raise ValueError(f"regmean: {len(batches)} batch sets for {len(models)} models")
    grams = [collect_stats(apply_fn, m, b, include=include, exclude=exclude, mesh=mesh, progress=progress)
             for m, b in zip(models, batches)]
    return regmean(base, models, grams, alpha=alpha, gram_weighting=gram_weighting, rcond=rcond)


def regmean_plusplus(base: PyTree | None, models: Sequence[PyTree], apply_fn: Callable,
                     batches: Sequence[Sequence], *, alpha: float = 0.9, gram_weighting: str = "sum",
                     rcond: float | None = None, include=None, exclude=None, mesh: Mesh | None = None,
                     progress: bool | None = None) -> MergeResult:
    """RegMean++: layers merged in forward order; the Gram of layer ``l`` for task ``i`` is collected by running the
    current merged model (earlier layers already merged, all non-linear parameters averaged) on ``batches[i]``.
    ``batches[i]`` must be re-iterable (a list). ``base`` is ignored; see :func:`regmean` for the rest."""
    del base
    models = list(models)
    _check_hparams(alpha, gram_weighting, rcond, "regmean_plusplus")
    if len(batches) != len(models):
        raise ValueError(f"regmean_plusplus: {len(batches)} batch sets for {len(models)} models")
    check_compatible(*models, names=[f"model_{i}" for i in range(len(models))])
    merged = uniform_soup(models)
    first = next(iter(batches[0]))
    order = layer_order(apply_fn, merged, first, include=include, exclude=exclude)
    if not order:
        raise ValueError("regmean_plusplus: no Dense/Conv layer matched include/exclude")
    flats = [flatten(m) for m in models]
    flat_merged = flatten(merged)
    ranks, deficient = {}, []
    for layer in progress_bar(order, progress, desc="regmean++", leave=False):
        pat = "^" + re.escape(layer) + "$"
        stats = [collect_stats(apply_fn, merged, b, include=pat, mesh=mesh, progress=False)[layer] for b in batches]
        Gs = _weighted([s.gram for s in stats], stats, None, gram_weighting, layer, "regmean_plusplus")
        kpath = f"{layer}/kernel"
        flat_merged[kpath] = _merge_layer(layer, [f[kpath] for f in flats], Gs, alpha, rcond, ranks, deficient)
        merged = unflatten(flat_merged, like=models[0])
    return MergeResult(merged, {"ranks": ranks, "rank_deficient": tuple(deficient)})
