"""Small helpers shared by the ``jaxmodels.optim`` modules (validation, path-regex masks, norms)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxmodels.tree import select

PyTree = Any

#: Raised by transforms that need ``params`` when ``update`` is called without them (optax >= 0.2.5 has no
#: public constant for it).
NO_PARAMS_MSG = "this transform needs the current params: call update(updates, state, params)"


def check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    """Reject an invalid (Python scalar) hyper-parameter before any work. Arrays / schedules are not checked."""
    if callable(value) or isinstance(value, jax.Array):
        return
    v = float(value)
    bad = (lo is not None and (v < lo or (lo_open and v == lo))) or (
        hi is not None and (v > hi or (hi_open and v == hi)))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'}{rb}, got {value!r}")


def path_mask(mask: PyTree | Callable | None, exclude: str | None) -> PyTree | Callable | None:
    """Combine an optax-style ``mask`` (tree of bools or callable) with an ``exclude`` path regex into one mask
    callable for ``optax.masked`` / ``add_decayed_weights``. ``None`` means "every leaf"."""
    if exclude is None:
        return mask
    if mask is None:
        return lambda tree: select(tree, exclude=exclude)

    def combined(tree):
        user = mask(tree) if callable(mask) else mask
        return jax.tree.map(lambda a, b: bool(a) and bool(b), user, select(tree, exclude=exclude))

    return combined


def norm(x: jax.Array, axis=None, keepdims=False) -> jax.Array:
    """L2 norm computed in float32 (bf16 params / updates are upcast)."""
    x = jnp.asarray(x, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims))
