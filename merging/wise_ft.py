"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): interpolate the zero-shot (base) and
fine-tuned weights::

    θ_α = (1 - α) θ_0 + α θ_ft
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.tree import compute_in_float32
from merging import _common as C
from merging.registry import register

__all__ = ["wise_ft"]


@jax.jit
def _wise_leaf(b, x, alpha):
    b = b.astype(jnp.float32)
    return b + alpha * (x.astype(jnp.float32) - b)


@register("wise_ft", needs_base=True, defaults={"alpha": 0.5})
def wise_ft(base: Any, models: Sequence[Any], *, alpha: float | jax.Array = 0.5, check_finite: bool = True) -> Any:
    """``(1-α) base + α models[0]``; ``models`` holds exactly one fine-tuned model. α ∈ [0, 1] (checked when
    concrete; under ``jax.jit`` α may be a traced scalar, used as is)."""
    models = C.as_models(models, 1, "wise_ft")
    if len(models) != 1:
        raise ValueError(f"wise_ft: interpolates one fine-tuned model with the base, got {len(models)} models")
    if base is None:
        raise ValueError("wise_ft: needs the zero-shot model as `base`")
    C.validate_trees(base, models, "wise_ft", check_finite=check_finite)
    C.check_leaf_dtypes(base, models, "wise_ft")
    a_val = C.concrete_scalar(alpha, "alpha", "wise_ft")
    if a_val is not None:
        C.check_unit_interval(a_val, "alpha", "wise_ft")
    a32 = jnp.asarray(alpha, jnp.float32)

    @compute_in_float32
    def run(base, models):
        return C.map_leaves(lambda p, b, xs: _wise_leaf(b, xs[0], a32), base, models)

    return run(base, models)
