"""SLERP between two models (Shoemake 1985; mergekit's ``slerp``), per tensor::

    cos Ω = <v0/|v0|, v1/|v1|>  (whole-tensor norms; a norm ≤ 1e-8 is not normalized)
    |cos Ω| > 0.9995:  θ = (1-t) v0 + t v1          (nearly colinear: plain lerp)
    else:              θ = sin((1-t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1

``v0`` is the base model, ``v1`` the other model; ``t`` ∈ [0, 1] (t=0 gives the base).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.tree import compute_in_float32
from merging import _common as C
from merging.registry import register

__all__ = ["slerp", "slerp_arrays"]

DOT_THRESHOLD = 0.9995


def slerp_arrays(t: jax.Array, v0: jax.Array, v1: jax.Array, eps: float = 1e-8) -> jax.Array:
    """The SLERP rule on two arrays of the same shape (whole-tensor norms; see the module docstring):
    ``sin((1-t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1`` with ``cos Ω = <v0/|v0|, v1/|v1|>``, and ``(1-t) v0 + t v1``
    where ``|cos Ω| > 0.9995`` (:data:`DOT_THRESHOLD`); a norm ``≤ eps`` is not normalized. Float32 result, jit-able
    (``t`` may be traced)."""
    v0 = v0.astype(jnp.float32)
    v1 = v1.astype(jnp.float32)
    n0 = jnp.linalg.norm(v0.reshape(-1))
    n1 = jnp.linalg.norm(v1.reshape(-1))
    u0 = jnp.where(n0 > eps, v0 / jnp.where(n0 > eps, n0, 1.0), v0)
    u1 = jnp.where(n1 > eps, v1 / jnp.where(n1 > eps, n1, 1.0), v1)
    dot = jnp.sum(u0 * u1)
    lerp = (1 - t) * v0 + t * v1
    theta = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
    sin_theta = jnp.sin(theta)
    safe = jnp.where(jnp.abs(dot) > DOT_THRESHOLD, 1.0, sin_theta)
    s0 = jnp.sin(theta - theta * t) / safe
    s1 = jnp.sin(theta * t) / safe
    return jnp.where(jnp.abs(dot) > DOT_THRESHOLD, lerp, s0 * v0 + s1 * v1)


_slerp_leaf = jax.jit(slerp_arrays)


@register("slerp", needs_base=True, defaults={"t": 0.5})
def slerp(base: Any, models: Sequence[Any], *, t: float | jax.Array = 0.5, check_finite: bool = True) -> Any:
    """Spherical interpolation from ``base`` (t=0) to ``models[0]`` (t=1). ``t`` may be a traced scalar under
    ``jax.jit`` (a concrete ``t`` must be finite)."""
    models = C.as_models(models, 1, "slerp")
    if len(models) != 1 or base is None:
        raise ValueError("slerp: interpolates exactly two models: `base` and one entry in `models`")
    C.validate_trees(base, models, "slerp", check_finite=check_finite)
    C.check_leaf_dtypes(base, models, "slerp")
    t_val = C.concrete_scalar(t, "t", "slerp")
    if t_val is not None:
        C.check_finite_param(t_val, "t", "slerp")
    t32 = jnp.asarray(t, jnp.float32)

    @compute_in_float32
    def run(base, models):
        return C.map_leaves(lambda p, b, xs: _slerp_leaf(t32, b, xs[0]), base, models)

    return run(base, models)
