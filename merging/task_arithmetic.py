"""Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic").

A task vector is ``τ_t = θ_t - θ_0``. Adding, negating and scaling task vectors edits a model::

    θ = θ_0 + λ Σ_t w_t τ_t        (``normalize=True`` divides Σ_t w_t τ_t by Σ_t w_t, as mergekit)

Negation (forgetting a task) is a negative weight. mergekit names (YAML -> Python): per-model ``weight`` ->
``weights`` (one per model), ``normalize`` (default False), ``lambda`` -> ``lambda_``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.tree import check_compatible
from merging.gta import generalized_task_arithmetic
from merging.registry import register

__all__ = ["task_vector", "apply_task_vector", "negate", "scale", "add", "task_arithmetic"]


def task_vector(base: Any, finetuned: Any) -> Any:
    """``τ = θ_ft - θ_0`` (computed in float32, returned in the inputs' dtype)."""
    check_compatible(base, finetuned, names=["base", "finetuned"])
    return jax.tree.map(lambda b, f: (f.astype(jnp.float32) - b.astype(jnp.float32)).astype(b.dtype), base, finetuned)


def apply_task_vector(base: Any, tau: Any, scaling: float = 1.0) -> Any:
    """``θ_0 + scaling * τ``."""
    check_compatible(base, tau, names=["base", "task_vector"], check_dtype=False)
    return jax.tree.map(lambda b, t: (b.astype(jnp.float32) + scaling * t.astype(jnp.float32)).astype(b.dtype),
                        base, tau)


def negate(tau: Any) -> Any:
    """``-τ`` for every leaf of a task vector (forgetting a task: ``apply_task_vector(base, negate(tau))``)."""
    return jax.tree.map(lambda t: -t, tau)


def scale(tau: Any, factor: float) -> Any:
    """``factor · τ`` for every leaf (computed in float32, returned in each leaf's dtype)."""
    return jax.tree.map(lambda t: (factor * t.astype(jnp.float32)).astype(t.dtype), tau)


def add(*taus: Any) -> Any:
    """``Σ_t τ_t`` of task vectors with the same structure and shapes (checked first; computed in float32, returned in
    the first tree's dtypes)."""
    check_compatible(*taus, check_dtype=False)
    return jax.tree.map(lambda *ts: sum(t.astype(jnp.float32) for t in ts).astype(ts[0].dtype), *taus)


@register("task_arithmetic", needs_base=True, per_model=("weight",),
          defaults={"normalize": False, "lambda": 1.0, "int8_mask": False})
def task_arithmetic(base: Any, models: Sequence[Any], *, weights: float | Sequence[float] | None = None,
                    normalize: bool = False, lambda_: float = 1.0, int8_mask: bool = False,
                    check_finite: bool = True) -> Any:
    """``θ_0 + λ Σ_t w_t (θ_t - θ_0)`` (``/ Σ_t w_t`` if ``normalize``). ``int8_mask`` is accepted for mergekit
    configs and has no effect (it only sets mergekit's mask storage dtype)."""
    return generalized_task_arithmetic(base, models, weights=weights, normalize=normalize, lambda_=lambda_,
                                       method="task_arithmetic", check_finite=check_finite)
