"""PCB-Merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging"), per tensor.

For the task vectors ``τ_i = θ_i - θ_0`` (i = 1..n) of one tensor, flattened to rows of length d (the reference
implementation, duguodong7/pcb-merging, flattens the whole model; merging per tensor keeps the merge streamable)::

    clip:   |τ_i| clamped to its [0.01%, 99.99%] quantiles (sorted[int(d·1e-4)], sorted[int(d·(1-1e-4))-1]),
            τ̃_i = sign(τ_i)|τ_i|_clamped
    intra:  β_intra,i = exp(n · Norm(|τ̃_i|)²)            Norm(x) = (x - min x)/(max x - min x) over the row
    inter:  β_inter,i = tanh(τ_i ⊙ Σ_j τ_j)
    β_i = β_intra,i ⊙ β_inter,i
    drop:   β̂_i = Norm(max(β_i, β_i,(1-ratio)))           (scores below the (1-ratio) quantile -> 0)
    merge:  θ = θ_0 + λ Σ_i β̂_i τ̃_i / max(Σ_i β̂_i, 1e-12)

(The paper writes both balancing terms as softmaxes; their normalizers cancel in the per-row min-max Norm, which
is what the reference code computes.) A row whose scores are all equal gets β̂ = 0 there (no competition signal).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.tree import compute_in_float32
from merging import _common as C
from merging.registry import register

__all__ = ["pcb", "pcb_scores"]


def _minmax(x):
    lo = x.min(axis=1, keepdims=True)
    hi = x.max(axis=1, keepdims=True)
    rng = hi - lo
    return jnp.where(rng > 0, (x - lo) / jnp.where(rng > 0, rng, 1.0), 0.0)


def _clamp(x, min_ratio, max_ratio):
    d = x.shape[1]
    s = jnp.sort(x, axis=1)
    lo = s[:, int(d * min_ratio)][:, None]
    hi = s[:, max(int(d * (1 - max_ratio)) - 1, 0)][:, None]
    return jnp.clip(x, lo, hi)


def pcb_scores(tvs: jax.Array, ratio: float):
    """``(β̂, τ̃)`` for task vectors ``tvs`` of shape [n, d] (see module docstring)."""
    n = tvs.shape[0]
    a = _clamp(jnp.abs(tvs), 1e-4, 1e-4)
    clamped = jnp.sign(tvs) * a
    intra = jnp.exp(n * _minmax(a) ** 2)
    inter = jnp.tanh(tvs * tvs.sum(0, keepdims=True))
    scale = _minmax(_clamp(intra * inter, 1.0 - ratio, 0.0))
    return scale, clamped


@functools.partial(jax.jit, static_argnames=("ratio",))
def _pcb_leaf(b, xs, lambda_, *, ratio):
    b = b.astype(jnp.float32)
    tvs = jnp.stack([x.astype(jnp.float32).reshape(-1) - b.reshape(-1) for x in xs])
    scale, clamped = pcb_scores(tvs, ratio)
    merged = (clamped * scale).sum(0) / jnp.maximum(scale.sum(0), 1e-12)
    return b + lambda_ * merged.reshape(b.shape)


@register("pcb", needs_base=True, defaults={"ratio": 0.1, "lambda": 1.0})
def pcb(base: Any, models: Sequence[Any], *, ratio: float = 0.1, lambda_: float = 1.0,
        check_finite: bool = True) -> Any:
    """PCB merge; ``ratio`` ∈ (0, 1] is the fraction of parameters kept per task, ``lambda_`` the scaling."""
    models = C.as_models(models, 1, "pcb")
    if base is None:
        raise ValueError("pcb: needs a base model")
    C.validate_trees(base, models, "pcb", check_finite=check_finite)
    C.check_leaf_dtypes(base, models, "pcb")
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"pcb: ratio must be in (0, 1], got {ratio}")
    C.check_finite_param(float(lambda_), "lambda", "pcb")

    @compute_in_float32
    def run(base, models):
        return C.map_leaves(lambda p, b, xs: _pcb_leaf(b, xs, jnp.float32(lambda_), ratio=float(ratio)), base,
                            models)

    return run(base, models)
