"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks"), as mergekit's ``breadcrumbs`` / ``breadcrumbs_ties``.

Each task vector keeps only the middle of its magnitude distribution: the ``floor(gamma · n)`` largest entries
(outliers) and the smallest ones are dropped so that ``floor(density · n)`` remain; then task arithmetic
(``breadcrumbs``) or TIES sign election (``breadcrumbs_ties``)::

    τ̂_t = τ_t ⊙ 1[|τ_t|_(n_bot) ≤ |τ_t| < |τ_t|_(n - n_top)]   (ascending order statistics)
    θ = θ_0 + λ Σ_t w_t τ̂_t

mergekit names: ``weight``, ``density``, ``gamma`` (per model; one gamma per merge here), ``normalize``.
"""

from __future__ import annotations

from typing import Any, Sequence

from merging.gta import generalized_task_arithmetic
from merging.registry import register

__all__ = ["breadcrumbs", "breadcrumbs_ties"]


@register("breadcrumbs", needs_base=True, per_model=("weight", "density", "gamma"),
          defaults={"gamma": 0.01, "normalize": False, "int8_mask": False, "lambda": 1.0, "rescale": False})
def breadcrumbs(base: Any, models: Sequence[Any], *, weights: float | Sequence[float] | None = None,
                density: float | Sequence[float] = 1.0, gamma: float | Sequence[float] = 0.01, normalize: bool = False,
                lambda_: float = 1.0, rescale: bool = False, int8_mask: bool = False, check_finite: bool = True) -> Any:
    """Model Breadcrumbs with task arithmetic (mergekit ``breadcrumbs``): each task vector keeps the middle of its
    magnitude distribution (the ``floor(gamma · n)`` largest entries and the smallest are dropped, ``floor(density ·
    n)`` remain), then ``θ = θ_0 + λ Σ_t w_t τ̂_t`` (``/ Σ_t w_t`` with ``normalize``); see the module docstring.
    ``rescale``: scale each masked task vector back to its L1 norm. Any pytree; returns ``base``'s structure and
    dtypes."""
    return generalized_task_arithmetic(base, models, weights=weights, density=density,
                                       sparsification="magnitude_outliers", gamma=gamma, normalize=normalize, rescale=rescale,
                                       lambda_=lambda_, method="breadcrumbs",
                                       check_finite=check_finite)


@register("breadcrumbs_ties", needs_base=True, per_model=("weight", "density", "gamma"),
          defaults={"gamma": 0.01, "normalize": False, "int8_mask": False, "lambda": 1.0, "consensus": "sum", "rescale": False})
def breadcrumbs_ties(base: Any, models: Sequence[Any], *, weights: float | Sequence[float] | None = None,
                     density: float | Sequence[float] = 1.0, gamma: float | Sequence[float] = 0.01, normalize: bool = False,
                     consensus: str = "sum", lambda_: float = 1.0, rescale: bool = False,
                     int8_mask: bool = False, check_finite: bool = True) -> Any:
    """Model Breadcrumbs with TIES sign election (mergekit ``breadcrumbs_ties``): the same outlier-and-small-entry mask
    as :func:`breadcrumbs`, then ``θ = θ_0 + λ Σ_t m_t w_t τ̂_t`` with ``m_t`` the agreement with the elected sign
    (``consensus`` "sum" or "count"; ``/ Σ_t m_t w_t`` with ``normalize``); see the module docstring."""
    return generalized_task_arithmetic(base, models, weights=weights, density=density,
                                       sparsification="magnitude_outliers", gamma=gamma, consensus=consensus, rescale=rescale,
                                       normalize=normalize, lambda_=lambda_, method="breadcrumbs_ties",
                                       check_finite=check_finite)
