"""TALL masks and Consensus merging (Wang et al. 2024, "Localizing Task Information for Improved Model Merging and
Compression").

With task vectors ``τ_t = θ_t - θ_0`` and the multi-task vector ``τ_MTL = Σ_t τ_t`` (task arithmetic)::

    TALL mask:       m_t = 1[|τ_t| ≥ λ_t |τ_MTL - τ_t|]        (where task t dominates the others)
    task model:      θ_t ≈ θ_0 + m_t ⊙ τ_MTL                    (one merged vector + one bit per weight per task)
    consensus mask:  m_k = 1[Σ_t m_t ≥ k]                        (drop "selfish" (k=2: used by one task) and
                                                                 "catastrophic" (used by none) weights)
    consensus merge: θ = θ_0 + λ (m_k ⊙ τ_MTL)                 (consensus task arithmetic)
                     θ = θ_0 + m_k ⊙ (TIES(θ_0, θ_t) - θ_0)     (consensus TIES)

Names: ``tall_lambda`` is the mask threshold λ_t (one per task or one for all; it is not a mergekit parameter, and
the YAML name is the same), ``lambda_`` the task-vector scaling λ (YAML ``lambda``, as in task arithmetic and TIES),
``weights``/``density`` as in :func:`merging.ties.ties`. All hyper-parameters are keyword-only.

Masks are boolean pytrees; :func:`pack_mask` / :func:`unpack_mask` store them as packed bits (``np.packbits``,
8 weights per byte).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import compute_in_float32, flatten, unflatten
from merging import _common as C
from merging.registry import register

__all__ = ["tall_masks", "consensus_mask", "tall_mask_models", "consensus_task_arithmetic", "consensus_ties",
           "pack_mask", "unpack_mask"]


@jax.jit
def _tall_leaf(b, xs, lambdas):
    b = b.astype(jnp.float32)
    taus = jnp.stack([x.astype(jnp.float32) - b for x in xs])
    mtl = taus.sum(0)
    lam = lambdas.reshape((-1,) + (1,) * b.ndim)
    return jnp.abs(taus) >= lam * jnp.abs(mtl[None] - taus)


def _check(base, models, method, check_finite=True):
    models = C.as_models(models, 1, method)
    if base is None:
        raise ValueError(f"{method}: needs the pre-trained model as `base`")
    C.validate_trees(base, models, method, check_finite=check_finite)
    C.check_leaf_dtypes(base, models, method)
    return models


def tall_masks(base: Any, models: Sequence[Any], *, tall_lambda: float | Sequence[float] = 0.4,
               check_finite: bool = True) -> list[Any]:
    """One boolean mask tree per task: ``|τ_t| ≥ λ_t |τ_MTL - τ_t|`` with ``tall_lambda`` λ_t ≥ 0 (the paper tunes
    λ ∈ [0.2, 0.6])."""
    models = _check(base, models, "tall_masks", check_finite)
    lams = C.per_model(tall_lambda, len(models), "tall_lambda", "tall_masks")
    if any(not (l >= 0) for l in lams):
        raise ValueError(f"tall_masks: tall_lambda must be >= 0, got {lams}")
    lam_arr = jnp.asarray(lams, jnp.float32)
    up = compute_in_float32(lambda b, ms: C.map_leaves(lambda p, bl, xs: _tall_leaf(bl, xs, lam_arr), b, ms))
    stacked = flatten(up(base, models))
    return [unflatten({p: m[t] for p, m in stacked.items()}, like=base) for t in range(len(models))]


def consensus_mask(masks: Sequence[Any], k: int = 2) -> Any:
    """``Σ_t m_t ≥ k``: weights that at least ``k`` tasks use."""
    if not masks:
        raise ValueError("consensus_mask: needs at least one mask")
    if not (1 <= k <= len(masks)):
        raise ValueError(f"consensus_mask: k must be in [1, {len(masks)}], got {k}")
    return jax.tree.map(lambda *ms: sum(m.astype(jnp.int32) for m in ms) >= k, *masks)


def tall_mask_models(base: Any, models: Sequence[Any], *, tall_lambda: float | Sequence[float] = 0.4,
                     lambda_: float = 1.0, check_finite: bool = True) -> list[Any]:
    """Reconstruct each task's model from the merged vector: ``θ_0 + m_t ⊙ λ τ_MTL``."""
    masks = tall_masks(base, models, tall_lambda=tall_lambda, check_finite=check_finite)
    C.check_finite_param(float(lambda_), "lambda_", "tall_mask_models")
    scale = float(lambda_)

    @compute_in_float32
    def one(base, models, mask):
        return C.map_leaves(
            lambda p, b, xs: b + scale * jnp.where(flatten(mask)[p], sum(x - b for x in xs), 0.0), base, models)

    return [one(base, models, m) for m in masks]


@functools.partial(jax.jit, static_argnames=("k",))
def _consensus_ta_leaf(b, xs, lambdas, scale, *, k):
    m = _tall_leaf(b, xs, lambdas)
    keep = m.astype(jnp.int32).sum(0) >= k
    b = b.astype(jnp.float32)
    mtl = sum(x.astype(jnp.float32) - b for x in xs)
    return b + scale * jnp.where(keep, mtl, 0.0)


@register("consensus_task_arithmetic", needs_base=True, defaults={"k": 2, "tall_lambda": 0.4, "lambda": 1.0})
def consensus_task_arithmetic(base: Any, models: Sequence[Any], *, k: int = 2,
                              tall_lambda: float | Sequence[float] = 0.4, lambda_: float = 1.0,
                              check_finite: bool = True) -> Any:
    """``θ_0 + λ (m_k ⊙ Σ_t τ_t)`` with the consensus of the TALL masks (``tall_lambda``) of ≥ ``k`` tasks."""
    models = _check(base, models, "consensus_task_arithmetic", check_finite)
    lams = C.per_model(tall_lambda, len(models), "tall_lambda", "consensus_task_arithmetic")
    if not (1 <= int(k) <= len(models)):
        raise ValueError(f"consensus_task_arithmetic: k must be in [1, {len(models)}], got {k}")
    C.check_finite_param(float(lambda_), "lambda_", "consensus_task_arithmetic")
    lam_arr = jnp.asarray(lams, jnp.float32)

    @compute_in_float32
    def run(base, models):
        return C.map_leaves(lambda p, b, xs: _consensus_ta_leaf(b, xs, lam_arr, jnp.float32(lambda_), k=int(k)),
                            base, models)

    return run(base, models)


@register("consensus_ties", needs_base=True, per_model=("weight", "density"),
          defaults={"k": 2, "tall_lambda": 0.4, "lambda": 1.0, "normalize": True})
def consensus_ties(base: Any, models: Sequence[Any], *, k: int = 2, tall_lambda: float | Sequence[float] = 0.4,
                   weights: float | Sequence[float] | None = None, density: float | Sequence[float] = 1.0,
                   normalize: bool = True, lambda_: float = 1.0, check_finite: bool = True) -> Any:
    """TIES merge whose task-vector sum is restricted to the consensus mask: ``θ_0 + m_k ⊙ (θ_TIES - θ_0)``."""
    from merging.ties import ties

    models = _check(base, models, "consensus_ties", check_finite)
    merged = ties(base, models, weights=weights, density=density, normalize=normalize, lambda_=lambda_,
                  check_finite=False)
    masks = tall_masks(base, models, tall_lambda=tall_lambda, check_finite=False)
    cons = consensus_mask(masks, int(k))
    return jax.tree.map(
        lambda b, m, keep: jnp.where(keep, m.astype(jnp.float32), b.astype(jnp.float32)).astype(b.dtype),
        base, merged, cons)


def pack_mask(mask: Any) -> dict[str, Any]:
    """Pack a boolean mask tree into ``{path: (uint8 bits, shape)}`` (1 bit per weight, ``np.packbits``)."""
    return {p: (np.packbits(np.asarray(m, bool).reshape(-1)), tuple(np.shape(m))) for p, m in flatten(mask).items()}


def unpack_mask(packed: dict[str, Any], like: Any | None = None) -> Any:
    """Inverse of :func:`pack_mask` (a flat dict, or ``like``'s structure)."""
    flat = {p: np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
            for p, (bits, shape) in packed.items()}
    return unflatten(flat, like=like) if like is not None else flat
