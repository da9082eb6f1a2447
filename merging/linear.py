"""Linear merge / model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time"), as mergekit's ``linear``::

    θ = Σ_t w_t θ_t  /  Σ_t w_t        (normalize=True, the default; without it the plain weighted sum)

The uniform soup is ``weight=1`` for every model. No base model is used.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.tree import compute_in_float32
from merging import _common as C
from merging.registry import register

__all__ = ["linear", "uniform_soup"]


@functools.partial(jax.jit, static_argnames=("normalize",))
def _linear_leaf(xs, weights, *, normalize):
    acc = weights[0] * xs[0].astype(jnp.float32)
    for i in range(1, len(xs)):
        acc = acc + weights[i] * xs[i].astype(jnp.float32)
    if normalize:
        acc = acc / weights.sum()
    return acc


def validate_weighted_average(base: Any, models: Sequence[Any], weight, normalize: bool,
                              method: str) -> tuple[list, list[float]]:
    """Checks shared by the weighted averages (linear, sparse_soup) before any work: no base, compatible trees and
    dtypes, one finite weight per model, a non-zero weight sum when normalizing. Returns (models, weights)."""
    models = C.as_models(models, 1, method)
    if base is not None:
        raise ValueError(f"{method}: takes no base model (put it in `models` to include it in the average)")
    C.validate_trees(None, models, method)
    C.check_leaf_dtypes(None, models, method)
    weights = C.per_model(weight, len(models), "weight", method)
    for w in weights:
        C.check_finite_param(w, "weight", method)
    if normalize and abs(sum(weights)) < 1e-12:
        raise ValueError(f"{method}: weights sum to zero ({weights}); cannot normalize")
    return models, weights


@register("linear", needs_base=False, per_model=("weight",), defaults={"normalize": True})
def linear(base: Any, models: Sequence[Any], *, weight: float | Sequence[float] = 1.0, normalize: bool = True) -> Any:
    """Weighted average of ``models`` (``base`` must be None: include the base in ``models`` to average it)."""
    models, weights = validate_weighted_average(base, models, weight, normalize, "linear")
    w_arr = jnp.asarray(weights, jnp.float32)

    @compute_in_float32(dtype_from=0)
    def run(models):
        return C.map_leaves(lambda p, _, xs: _linear_leaf(xs, w_arr, normalize=bool(normalize)), None, models)

    return run(models)


def uniform_soup(models: Sequence[Any]) -> Any:
    """The uniform soup ``(1/T) Σ_t θ_t``."""
    return linear(None, models)
