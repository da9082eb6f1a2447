"""NuSLERP (mergekit's ``nuslerp``): SLERP with weights and optional base, row-wise or over the flattened tensor.

With per-model weights ``w_0, w_1``: ``t = w_1 / (w_0 + w_1)`` (t = 0.5 if the sum is 0). Vectors ``v_i`` are the
models, or their task vectors ``θ_i - θ_0`` when a base is given (then ``θ = θ_0 + nuslerp(...)``). Along the
chosen axis (every row when ``nuslerp_row_wise``, else every column/last-axis vector; the whole tensor when
``nuslerp_flatten``, the default)::

    Ω = arccos(clip(<v0/|v0|, v1/|v1|>, -1, 1))
    res = (sin((1-t)Ω) v0 + sin(tΩ) v1) / sin Ω,   and (1-t) v0 + t v1 where 1 - cos²Ω ≤ 1e-16 (colinear).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.tree import compute_in_float32
from merging import _common as C
from merging.registry import register

__all__ = ["nuslerp", "nuslerp_arrays"]


def nuslerp_arrays(t, v0, v1, *, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8):
    """The NuSLERP rule on two arrays of the same shape (see the module docstring): ``(sin((1-t)Ω) v0 + sin(tΩ) v1) /
    sin Ω`` with ``Ω`` the angle between the normalised vectors, linear interpolation where they are colinear
    (``1 - cos²Ω ≤ eps²``). The vectors are the whole flattened tensor (``flatten=True``, the default), else the
    slices along axis 0 (``row_wise=True``, mergekit's ``dim = 0``) or along the last axis. Returns a float32 array
    of ``v0``'s shape."""
    shape = v0.shape
    v0 = v0.astype(jnp.float32)
    v1 = v1.astype(jnp.float32)
    dim = 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1 and v0.ndim > 1:
        v0, v1 = jnp.swapaxes(v0, dim, -1), jnp.swapaxes(v1, dim, -1)

    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)

    cos = jnp.clip(jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1.0, 1.0)
    colinear = (1 - cos * cos) <= eps * eps
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
    sin = jnp.sin(theta)
    safe = jnp.where(colinear, 1.0, sin)
    res = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / safe
    res = jnp.where(colinear, (1 - t) * v0 + t * v1, res)
    if not flatten and dim != -1 and res.ndim > 1:
        res = jnp.swapaxes(res, dim, -1)
    return res.reshape(shape)


@functools.partial(jax.jit, static_argnames=("row_wise", "flatten", "has_base"))
def _nuslerp_leaf(b, x0, x1, t, *, row_wise, flatten, has_base):
    if has_base:
        b = b.astype(jnp.float32)
        return b + nuslerp_arrays(t, x0.astype(jnp.float32) - b, x1.astype(jnp.float32) - b, row_wise=row_wise,
                                  flatten=flatten)
    return nuslerp_arrays(t, x0, x1, row_wise=row_wise, flatten=flatten)


@register("nuslerp", needs_base="optional", per_model=("weight",),
          defaults={"nuslerp_row_wise": False, "nuslerp_flatten": True})
def nuslerp(base: Any, models: Sequence[Any], *, weights: float | Sequence[float] | None = None,
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True, check_finite: bool = True) -> Any:
    """NuSLERP of ``models[0]`` and ``models[1]`` with ``t = w_1 / (w_0 + w_1)`` from ``weights`` (one per model,
    default 1 each). ``base`` is optional: given, the task vectors are interpolated and added to it; None
    interpolates the models themselves (mergekit's two modes)."""
    models = C.as_models(models, 2, "nuslerp")
    if len(models) != 2:
        raise ValueError(f"nuslerp: merges exactly two models (plus an optional base), got {len(models)}")
    C.validate_trees(base, models, "nuslerp", check_finite=check_finite)
    C.check_leaf_dtypes(base, models, "nuslerp")
    w = C.per_model(1.0 if weights is None else weights, 2, "weights", "nuslerp")
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    static = dict(row_wise=bool(nuslerp_row_wise), flatten=bool(nuslerp_flatten), has_base=base is not None)

    @compute_in_float32(dtype_from=1)
    def run(base, models):
        return C.map_leaves(lambda p, b, xs: _nuslerp_leaf(b, xs[0], xs[1], jnp.float32(t), **static), base, models)

    return run(base, models)
