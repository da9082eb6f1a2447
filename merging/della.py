"""DELLA-Merging (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling"), as mergekit's ``della`` (with TIES election) / ``della_linear``.

MagPrune: within each row, the entry of ascending magnitude rank ``r`` (1..m) is kept with probability
``p_r = density - ε + 2ε (r - 1)/(m - 1)`` (ties in magnitude ranked by index, a stable sort) and rescaled;
then elect (della) and fuse::

    θ = θ_0 + λ Σ_t m_t w_t τ̂_t  (/ Σ_t m_t w_t with normalize)

mergekit names: ``weight``, ``density``, ``epsilon`` (default 0.15), ``lambda`` (default 1), ``normalize``
(default True for della, False for della_linear), ``rescale`` (default True). Random: explicit ``key``.

``rescale_norm`` (one name for DARE and DELLA): ``"l1"`` (default) is mergekit 0.1.5's ``rescale: true``,
``τ̂ = (m ⊙ τ) · ‖τ‖_1 / ‖m ⊙ τ‖_1``; ``"l2"``/``"linf"`` match those norms; ``"inverse_p"`` is the DELLA paper's
``τ̂_r = m_r τ_r / p_r``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from merging.gta import generalized_task_arithmetic
from merging.registry import register

__all__ = ["della", "della_linear"]


@register("della", needs_base=True, per_model=("weight", "density", "epsilon"),
          defaults={"epsilon": 0.15, "lambda": 1.0, "normalize": True, "rescale": True, "rescale_norm": "l1", "int8_mask": False,
                    "consensus": "sum"}, stochastic=True)
def della(base: Any, models: Sequence[Any], *, key: jax.Array | None = None, weights: float | Sequence[float] | None = None,
          density: float | Sequence[float] = 1.0, epsilon: float | Sequence[float] = 0.15, lambda_: float = 1.0,
          normalize: bool = True, rescale: bool = True, rescale_norm: str = "l1", consensus: str = "sum", int8_mask: bool = False,
          check_finite: bool = True) -> Any:
    """DELLA-Merging with TIES sign election (mergekit ``della``): MagPrune keeps the entry of ascending magnitude rank
    ``r`` in each row with probability ``p_r = density - ε + 2ε (r - 1)/(m - 1)`` (from ``key``) and rescales it
    (``rescale_norm``), then ``θ = θ_0 + λ Σ_t m_t w_t τ̂_t / Σ_t m_t w_t`` (``normalize``, default True); see the
    module docstring."""
    return generalized_task_arithmetic(base, models, weights=weights, density=density, sparsification="della_magprune",
                                       epsilon=epsilon, consensus=consensus, normalize=normalize, rescale=rescale, rescale_norm=rescale_norm,
                                       lambda_=lambda_, key=key, method="della", check_finite=check_finite)


@register("della_linear", needs_base=True, per_model=("weight", "density", "epsilon"),
          defaults={"epsilon": 0.15, "lambda": 1.0, "normalize": False, "rescale": True, "rescale_norm": "l1", "int8_mask": False},
          stochastic=True)
def della_linear(base: Any, models: Sequence[Any], *, key: jax.Array | None = None,
                 weights: float | Sequence[float] | None = None, density: float | Sequence[float] = 1.0,
                 epsilon: float | Sequence[float] = 0.15, lambda_: float = 1.0, normalize: bool = False, rescale: bool = True, rescale_norm: str = "l1",
                 int8_mask: bool = False, check_finite: bool = True) -> Any:
    """DELLA-Merging without the election (mergekit ``della_linear``): MagPrune as :func:`della`, then
    ``θ = θ_0 + λ Σ_t w_t τ̂_t`` (``/ Σ_t w_t`` with ``normalize``, default False)."""
    return generalized_task_arithmetic(base, models, weights=weights, density=density, sparsification="della_magprune",
                                       epsilon=epsilon, consensus=None, normalize=normalize, rescale=rescale, rescale_norm=rescale_norm,
                                       lambda_=lambda_, key=key, method="della_linear", check_finite=check_finite)
