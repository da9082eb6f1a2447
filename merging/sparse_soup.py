"""Sparse Model Soups (Zimmer et al. 2023, "Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging").

Models retrained from one pruned network with the *same* sparsity mask ``m`` (after a prune step of IMP) are
averaged, and the mask is kept, so the soup is exactly as sparse as its ingredients::

    θ = m ⊙ ( Σ_t w_t θ_t / Σ_t w_t )        (normalize=True, the default; without it the plain weighted sum)

The shared mask is either given (``mask=``, a pytree of booleans shaped like the models) or read off the models:
``m = 1[θ_0 ≠ 0]``, and every model must have the same zero pattern (otherwise a ``ValueError`` names the first path
where the patterns differ and how many entries differ). A ``base`` is accepted and ignored (as ``linear``).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.tree import check_compatible, compute_in_float32, flatten
from merging import _common as C
from merging.linear import validate_weighted_average
from merging.registry import register

__all__ = ["sparse_soup", "shared_mask", "check_shared_mask"]


@jax.jit
def _mask_mismatch(xs):
    m0 = xs[0] != 0
    return sum(jnp.sum((x != 0) != m0) for x in xs[1:])


@jax.jit
def _outside_mask(xs, m):
    return sum(jnp.sum((x != 0) & ~m) for x in xs)


@functools.partial(jax.jit, static_argnames=("normalize",))
def _sparse_soup_leaf(xs, weights, mask, *, normalize):
    acc = weights[0] * xs[0].astype(jnp.float32)
    for i in range(1, len(xs)):
        acc = acc + weights[i] * xs[i].astype(jnp.float32)
    if normalize:
        acc = acc / weights.sum()
    return jnp.where(mask, acc, jnp.zeros_like(acc))


def shared_mask(model: Any) -> Any:
    """The sparsity mask ``1[θ ≠ 0]`` of a model, as a pytree of boolean arrays."""
    return jax.tree.map(lambda x: x != 0, model)


def check_shared_mask(models: Sequence[Any], method: str = "sparse_soup") -> None:
    """Raise ``ValueError`` naming the first leaf path where the models' zero patterns differ."""
    flats = [flatten(m) for m in models]
    for p, x0 in flats[0].items():
        xs = (x0,) + tuple(f[p] for f in flats[1:])
        n_diff = int(_mask_mismatch(xs))
        if n_diff:
            which = next(i for i in range(1, len(xs)) if bool(jnp.any((xs[i] != 0) != (x0 != 0))))
            raise ValueError(f"{method}: models do not share one sparsity mask: model_{which} differs from model_0 at "
                             f"{p!r} ({n_diff} entries differ in total over the models); pass `mask=` to impose one")


@register("sparse_soup", needs_base=False, per_model=("weight",), defaults={"normalize": True})
def sparse_soup(base: Any, models: Sequence[Any], *, weights: float | Sequence[float] | None = None,
                normalize: bool = True, mask: Any = None, check_finite: bool = True) -> Any:
    """Weighted average of models sharing one sparsity mask, re-masked (see module docstring). ``weights``: one per
    model (default 1 each); ``base`` is ignored, as by :func:`merging.linear.linear`.

    ``mask``: optional pytree of booleans shaped like the models (True = kept weight). Without it, the mask is the
    non-zero pattern of ``models[0]`` and all models must share it. With it, a weight that is non-zero outside the
    mask in any model is rejected (the models were not pruned with that mask).
    """
    models, weights = validate_weighted_average(base, models, weights, normalize, "sparse_soup", check_finite)
    if mask is None:
        check_shared_mask(models)
        mask = shared_mask(models[0])
    else:
        try:
            check_compatible(models[0], mask, names=["model_0", "mask"], check_dtype=False)
        except ValueError as e:
            raise ValueError(f"sparse_soup: {e}") from None
        mask = jax.tree.map(lambda m: jnp.asarray(m).astype(bool), mask)
        fm = flatten(mask)
        flats = [flatten(m) for m in models]
        for p in fm:
            n_out = int(_outside_mask(tuple(f[p] for f in flats), fm[p]))
            if n_out:
                raise ValueError(f"sparse_soup: {n_out} non-zero weights outside `mask` at {p!r}; the models were "
                                 "not pruned with this mask")
    w_arr = jnp.asarray(weights, jnp.float32)
    flat_mask = flatten(mask)

    @compute_in_float32(dtype_from=0)
    def run(models):
        return C.map_leaves(lambda p, _, xs: _sparse_soup_leaf(xs, w_arr, flat_mask[p], normalize=bool(normalize)),
                            None, models)

    return run(models)
