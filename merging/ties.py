"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"), as mergekit.

Per tensor, with task vectors ``τ_t = θ_t - θ_0`` and weights ``w_t``::

    trim:   τ̂_t = τ_t ⊙ 1[|τ_t| ≥ top-k(|τ_t|)],  k = floor(density_t · n)
    elect:  s = sign(Σ_t w_t τ̂_t)   ("sum", the paper's total mass)  or  sign(Σ_t sign(w_t τ̂_t))  ("count")
    merge:  Δ = Σ_t 1[sign(w_t τ̂_t) = s] w_t τ̂_t  /  Σ_t 1[sign(w_t τ̂_t) = s] w_t     (normalize, disjoint mean)
    θ = θ_0 + λ Δ

mergekit names (YAML -> Python): per-model ``weight`` -> ``weights``, ``density`` (per model), ``normalize`` (default
True), ``int8_mask``, ``lambda`` -> ``lambda_``.
"""

from __future__ import annotations

from typing import Any, Sequence

from merging.gta import generalized_task_arithmetic, sign_consensus_mask
from merging.registry import register

__all__ = ["ties", "sign_consensus_mask"]


@register("ties", needs_base=True, per_model=("weight", "density"),
          defaults={"normalize": True, "int8_mask": False, "lambda": 1.0, "consensus": "sum", "rescale": False})
def ties(base: Any, models: Sequence[Any], *, weights: float | Sequence[float] | None = None,
         density: float | Sequence[float] = 1.0, normalize: bool = True, consensus: str = "sum",
         lambda_: float = 1.0, rescale: bool = False, int8_mask: bool = False, check_finite: bool = True) -> Any:
    """TIES merge (see module docstring). ``consensus``: "sum" (mergekit ``ties``) or "count". ``rescale``:
    scale each trimmed task vector back to its L1 norm (mergekit's ``rescale``, default off)."""
    return generalized_task_arithmetic(base, models, weights=weights, density=density, sparsification="magnitude",
                                       consensus=consensus, normalize=normalize, rescale=rescale, lambda_=lambda_,
                                       method="ties", check_finite=check_finite)
