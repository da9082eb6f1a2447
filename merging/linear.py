"""Linear merge / model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time"), as mergekit's ``linear``::

    θ = Σ_t w_t θ_t  /  Σ_t w_t        (normalize=True, the default; without it the plain weighted sum)

The uniform soup is ``weights=1`` for every model (:func:`uniform_soup`). A ``base`` is accepted and
ignored, as mergekit does for ``linear``.
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


def validate_weighted_average(base: Any, models: Sequence[Any], weights, normalize: bool, method: str,
                              check_finite: bool = True) -> tuple[list, list[float]]:
    """Checks shared by the weighted averages (linear, sparse_soup) before any work: compatible trees and dtypes,
    finite values (``check_finite``), one finite weight per model, a non-zero weight sum when normalizing. ``base``
    is ignored (mergekit's rule for methods without a base: it is not part of the average and not checked). Returns
    (models, weights)."""
    del base  # unused by averages (see the package docstring); put it in `models` to include it
    models = C.as_models(models, 1, method)
    C.validate_trees(None, models, method, check_finite=check_finite)
    C.check_leaf_dtypes(None, models, method)
    weights = C.per_model(1.0 if weights is None else weights, len(models), "weights", method)
    for w in weights:
        C.check_finite_param(w, "weights", method)
    if normalize and abs(sum(weights)) < 1e-12:
        raise ValueError(f"{method}: weights sum to zero ({weights}); cannot normalize")
    return models, weights


@register("linear", needs_base=False, per_model=("weight",), defaults={"normalize": True})
def linear(base: Any, models: Sequence[Any], *, weights: float | Sequence[float] | None = None,
           normalize: bool = True, check_finite: bool = True) -> Any:
    """Weighted average ``Σ_t w_t θ_t / Σ_t w_t`` of ``models``; ``weights``: one per model (default 1 each; a
    scalar is used for every model). ``base`` is ignored, as in mergekit: put it in ``models`` to average it."""
    models, weights = validate_weighted_average(base, models, weights, normalize, "linear", check_finite)
    w_arr = jnp.asarray(weights, jnp.float32)

    @compute_in_float32(dtype_from=0)
    def run(models):
        return C.map_leaves(lambda p, _, xs: _linear_leaf(xs, w_arr, normalize=bool(normalize)), None, models)

    return run(models)


def uniform_soup(models: Sequence[Any], *, check_finite: bool = True) -> Any:
    """The uniform soup ``(1/T) Σ_t θ_t`` (Wortsman et al. 2022, eq. 1 with equal weights): the library's one
    validated uniform average (compatible trees and dtypes, finite values; computed in float32, every leaf returned
    in its own dtype)."""
    return linear(None, models, check_finite=check_finite)
