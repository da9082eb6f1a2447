"""RegMean and RegMean++: merging linear layers by the closed-form solution of a regression on their inputs.

RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023): for every linear
layer with weights ``W_i`` (``[d_in, d_out]``) and input Gram matrices ``G_i = X_iᵀ X_i`` of model ``i`` on its own
data, the merged weight minimizes ``Σ_i ||X_i W − X_i W_i||²``::

    W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i,      G̃_i = α G_i + (1 − α) diag(G_i)

where ``α ∈ [0, 1]`` shrinks the off-diagonal entries (the paper's ``reduce_non_diagonal_ratio``; α = 1 is the exact
least-squares solution, α = 0 gives a per-input-row weighted average). Every other parameter (biases, norms,
embeddings) is averaged. Input dimensions no model ever activates (zero Gram diagonal) keep the average row.

RegMean++ (Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model
Merging", 2025): the same solve, but layer by layer in forward order, with the inputs ``X_i^(l)`` of layer ``l``
computed by the *merged* model's earlier layers on task ``i``'s data (instead of model ``i``'s own layers), so the
regression accounts for the distribution shift the earlier merged layers cause.

Layer weights are the ``kernel`` leaves under a module path (see :mod:`jaxmodels.capture`); conv kernels
``[kh, kw, c_in, c_out]`` are solved as ``[kh·kw·c_in, c_out]`` matrices against im2col Gram matrices.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmodels.capture import LayerStats, collect_stats, layer_order
from jaxmodels.progress import progress_bar
from jaxmodels.tree import check_compatible, flatten, unflatten

PyTree = Any

__all__ = ["regmean", "regmean_solve", "regmean_from_data", "regmean_plusplus", "average"]


def _check_alpha(alpha: float, method: str):
    if not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"{method}: alpha must be in [0, 1], got {alpha}")


def _gram(g) -> jax.Array:
    return g.gram if isinstance(g, LayerStats) else jnp.asarray(g)


@jax.jit
def _average(models):
    return jax.tree.map(lambda *a: (sum(x.astype(jnp.float32) for x in a) / len(a)).astype(a[0].dtype), *models)


def average(models: Sequence[PyTree]) -> PyTree:
    """Uniform average (computed in float32, input dtype returned)."""
    return _average(list(models))


@jax.jit
def regmean_solve(weights: Sequence[jax.Array], grams: Sequence[jax.Array], alpha: float) -> jax.Array:
    """``(Σ G̃_i)⁻¹ Σ G̃_i W_i`` for one layer, ``W_i`` of any shape ``[..., d_out]`` with ``prod(...) == d_in``."""
    shape, dtype = weights[0].shape, weights[0].dtype
    d_in = grams[0].shape[0]
    Ws = [w.astype(jnp.float32).reshape(d_in, -1) for w in weights]
    Gs = [g.astype(jnp.float32) for g in grams]
    Gt = [alpha * g + (1.0 - alpha) * jnp.diag(jnp.diag(g)) for g in Gs]
    A = sum(Gt)
    hi = jax.lax.Precision.HIGHEST
    B = sum(jnp.dot(g, w, precision=hi) for g, w in zip(Gt, Ws))
    # Dimensions with zero total input energy are unconstrained: pin them to the plain average.
    dead = jnp.diag(A) <= 0
    A = A + jnp.diag(dead.astype(jnp.float32))
    B = jnp.where(dead[:, None], sum(Ws) / len(Ws), B)
    W = jnp.linalg.solve(A, B)
    return W.reshape(shape).astype(dtype)


def regmean(models: Sequence[PyTree], grams: Sequence[Mapping[str, Any]], *, alpha: float = 0.9) -> PyTree:
    """RegMean merge. ``grams[i]`` maps module paths (``"Dense_0"``, ``"block_0/attn/query"``) to model ``i``'s Gram
    matrix (a :class:`jaxmodels.capture.LayerStats` from ``collect_stats`` or a ``[d_in, d_in]`` array). Layers in
    ``grams`` get the closed-form merge of their ``kernel``; every other leaf is averaged."""
    models = list(models)
    if not models:
        raise ValueError("regmean: needs at least one model")
    _check_alpha(alpha, "regmean")
    if len(grams) != len(models):
        raise ValueError(f"regmean: {len(grams)} Gram dicts for {len(models)} models")
    check_compatible(*models, names=[f"model_{i}" for i in range(len(models))])
    keys = list(grams[0])
    for i, g in enumerate(grams[1:], 1):
        if set(g) != set(keys):
            raise ValueError(f"regmean: Gram dict {i} has layers {sorted(g)} but dict 0 has {sorted(keys)}")
    flats = [flatten(m) for m in models]
    merged = flatten(average(models))
    for layer in keys:
        kpath = f"{layer}/kernel"
        if kpath not in merged:
            raise ValueError(f"regmean: Gram for layer {layer!r} but the models have no leaf {kpath!r}")
        Gs = [_gram(g[layer]) for g in grams]
        d_in = int(np.prod(merged[kpath].shape[:-1]))
        for G in Gs:
            if G.shape != (d_in, d_in):
                raise ValueError(f"regmean: Gram of {layer!r} has shape {G.shape}, kernel needs ({d_in}, {d_in})")
        merged[kpath] = regmean_solve([f[kpath] for f in flats], Gs, jnp.float32(alpha))
    return unflatten(merged, like=models[0])


def regmean_from_data(apply_fn: Callable, models: Sequence[PyTree], batches: Sequence[Iterable], *,
                      alpha: float = 0.9, include=None, exclude=None, mesh: Mesh | None = None,
                      progress: bool | None = None) -> PyTree:
    """RegMean with each model's Gram matrices collected by running that model on its own ``batches[i]``
    (``include``/``exclude``: regexes on module paths choosing the layers that get the closed form)."""
    _check_alpha(alpha, "regmean")
    if len(batches) != len(models):
        raise ValueError(f"regmean: {len(batches)} batch sets for {len(models)} models")
    grams = [collect_stats(apply_fn, m, b, include=include, exclude=exclude, mesh=mesh, progress=progress)
             for m, b in zip(models, batches)]
    return regmean(models, grams, alpha=alpha)


def regmean_plusplus(apply_fn: Callable, models: Sequence[PyTree], batches: Sequence[Sequence], *,
                     alpha: float = 0.9, include=None, exclude=None, mesh: Mesh | None = None,
                     progress: bool | None = None) -> PyTree:
    """RegMean++: layers merged in forward order; the Gram of layer ``l`` for task ``i`` is collected by running the
    current merged model (earlier layers already merged, all non-linear parameters averaged) on ``batches[i]``.
    ``batches[i]`` must be re-iterable (a list)."""
    models = list(models)
    _check_alpha(alpha, "regmean_plusplus")
    if len(batches) != len(models):
        raise ValueError(f"regmean_plusplus: {len(batches)} batch sets for {len(models)} models")
    check_compatible(*models, names=[f"model_{i}" for i in range(len(models))])
    merged = average(models)
    first = next(iter(batches[0]))
    order = layer_order(apply_fn, merged, first, include=include, exclude=exclude)
    if not order:
        raise ValueError("regmean_plusplus: no Dense/Conv layer matched include/exclude")
    flats = [flatten(m) for m in models]
    flat_merged = flatten(merged)
    for layer in progress_bar(order, progress, desc="regmean++", leave=False):
        pat = "^" + re.escape(layer) + "$"
        Gs = [collect_stats(apply_fn, merged, b, include=pat, mesh=mesh, progress=False)[layer].gram
              for b in batches]
        kpath = f"{layer}/kernel"
        flat_merged[kpath] = regmean_solve([f[kpath] for f in flats], Gs, jnp.float32(alpha))
        merged = unflatten(flat_merged, like=models[0])
    return merged
