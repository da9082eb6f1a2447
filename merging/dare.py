"""DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch"): Drop And REscale task vectors, then merge linearly (``dare_linear``) or with TIES sign election
(``dare_ties``), as mergekit::

    m_t ~ Bernoulli(density_t),   τ̂_t = (m_t ⊙ τ_t) · ‖τ_t‖_1 / ‖m_t ⊙ τ_t‖_1    (rescale=True, τ_t = θ_t - θ_0)
    dare_linear: θ = θ_0 + λ Σ_t w_t τ̂_t              (normalize: / Σ_t w_t; default False)
    dare_ties:   TIES election + disjoint sum over τ̂_t (normalize default False, as mergekit)

``rescale_norm`` (one name for DARE and DELLA): ``"l1"`` (default) is mergekit 0.1.5's ``rescale: true``, L1-norm
matching of the kept delta; ``"l2"``/``"linf"`` match those norms; ``"inverse_p"`` is the DARE paper's
``τ̂_t = m_t ⊙ τ_t / density_t`` (unbiased: ``E[τ̂_t] = τ_t``). ``rescale=False`` keeps ``m_t ⊙ τ_t``.

The drop masks come from an explicit ``key`` (``jax.random.key``), folded with each tensor's path and model
index, so a merge is reproducible and identical whether the tree is merged whole or streamed tensor by tensor.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from merging.gta import generalized_task_arithmetic
from merging.registry import register

__all__ = ["dare_linear", "dare_ties"]


@register("dare_linear", needs_base=True, per_model=("weight", "density"),
          defaults={"normalize": False, "rescale": True, "rescale_norm": "l1", "int8_mask": False, "lambda": 1.0}, stochastic=True)
def dare_linear(base: Any, models: Sequence[Any], *, key: jax.Array | None = None,
                weights: float | Sequence[float] | None = None, density: float | Sequence[float] = 1.0,
                normalize: bool = False, rescale: bool = True, rescale_norm: str = "l1", lambda_: float = 1.0, int8_mask: bool = False,
                check_finite: bool = True) -> Any:
    """DARE with a linear merge (mergekit ``dare_linear``): drop each task-vector entry with probability
    ``1 - density_t`` (``m_t ~ Bernoulli(density_t)``, from ``key``), rescale the kept entries (``rescale_norm``, see
    the module docstring), then ``θ = θ_0 + λ Σ_t w_t τ̂_t`` (``/ Σ_t w_t`` with ``normalize``). Any pytree; the same
    ``key`` gives the same merge, whole or streamed tensor by tensor."""
    return generalized_task_arithmetic(base, models, weights=weights, density=density, sparsification="random",
                                       consensus=None, normalize=normalize, rescale=rescale, rescale_norm=rescale_norm, lambda_=lambda_,
                                       key=key, method="dare_linear", check_finite=check_finite)


@register("dare_ties", needs_base=True, per_model=("weight", "density"),
          defaults={"normalize": False, "rescale": True, "rescale_norm": "l1", "int8_mask": False, "lambda": 1.0, "consensus": "sum"},
          stochastic=True)
def dare_ties(base: Any, models: Sequence[Any], *, key: jax.Array | None = None,
              weights: float | Sequence[float] | None = None, density: float | Sequence[float] = 1.0,
              normalize: bool = False, rescale: bool = True, rescale_norm: str = "l1", consensus: str = "sum", lambda_: float = 1.0,
              int8_mask: bool = False, check_finite: bool = True) -> Any:
    """DARE with TIES sign election (mergekit ``dare_ties``): the random drop and rescale of :func:`dare_linear`, then
    ``θ = θ_0 + λ Σ_t m_t w_t τ̂_t`` with ``m_t`` the agreement with the elected sign (``consensus`` "sum" or "count";
    ``/ Σ_t m_t w_t`` with ``normalize``)."""
    return generalized_task_arithmetic(base, models, weights=weights, density=density, sparsification="random",
                                       consensus=consensus, normalize=normalize, rescale=rescale, rescale_norm=rescale_norm, lambda_=lambda_,
                                       key=key, method="dare_ties", check_finite=check_finite)
