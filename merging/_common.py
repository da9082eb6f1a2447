"""Shared plumbing for merge methods: validation of inputs and hyper-parameters (before any work), per-model
hyper-parameter broadcasting, per-leaf random keys derived from the leaf's path, and the leaf-wise driver.

Every method computes leaf by leaf with a jitted kernel (cached by shape/dtype, so the CLI's tensor-by-tensor
streaming reuses compilations), in float32, and returns every leaf in its own input dtype
(:func:`jaxmodels.tree.compute_in_float32`). Inputs holding NaN/Inf are rejected before any work
(:func:`validate_trees` with ``check_finite=True``; skipped for traced inputs under ``jax.jit``).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import LOW_PRECISION_DTYPES, check_compatible, flatten, is_concrete, unflatten

PyTree = Any


def as_models(models: Sequence[PyTree], min_n: int = 1, method: str = "merge") -> list[PyTree]:
    if isinstance(models, dict) or not isinstance(models, (list, tuple)):
        raise TypeError(f"{method}: `models` must be a list/tuple of pytrees, got {type(models).__name__}")
    models = list(models)
    if len(models) < min_n:
        raise ValueError(f"{method}: needs at least {min_n} model(s), got {len(models)}")
    return models


def validate_trees(base: PyTree | None, models: Sequence[PyTree], method: str, check_dtype: bool = True,
                   check_finite: bool = True) -> None:
    """check_compatible over base (if any) and all models, naming them 'base', 'model_0', ...; then, with
    ``check_finite``, :func:`check_all_finite` (NaN/Inf rejected, naming the tree and the leaf path)."""
    trees = ([base] if base is not None else []) + list(models)
    names = (["base"] if base is not None else []) + [f"model_{i}" for i in range(len(models))]
    try:
        check_compatible(*trees, names=names, check_dtype=check_dtype)
    except ValueError as e:
        raise ValueError(f"{method}: {e}") from None
    if check_finite:
        check_all_finite(trees, names, method)


@jax.jit
def _count_nonfinite(x):
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def check_all_finite(trees: Sequence[PyTree], names: Sequence[str], method: str) -> None:
    """Raise ``ValueError`` naming the first tree and leaf path holding a NaN or ±Inf (and how many entries).

    One reduction per floating leaf on the leaf's own device(s) (sharded inputs stay sharded) and one host
    transfer of the counts for all leaves. Leaves that are tracers (the merge is being traced by ``jax.jit``,
    ``jax.eval_shape``, ...) have no values to check and are skipped: check concrete inputs before jitting (or
    call the merge outside ``jit``). Non-floating leaves are not counted (integers are always finite).
    """
    where, counts = [], []
    for name, tree in zip(names, trees):
        for p, leaf in flatten(tree).items():
            if not is_concrete(leaf):
                continue
            d = getattr(leaf, "dtype", None)
            if d is None or not jnp.issubdtype(d, jnp.inexact):
                continue
            n_bad = _count_nonfinite(leaf)
            if not is_concrete(n_bad):  # a concrete leaf closed over inside a trace: no value here
                continue
            where.append((name, p))
            counts.append(n_bad)
    if not counts:
        return
    bad = np.asarray(jax.device_get(counts))
    for (name, p), n in zip(where, bad):
        if n:
            raise ValueError(f"{method}: {name} has {int(n)} non-finite value(s) (NaN or Inf) at {p!r}; a merge "
                             "would spread or silently drop them. Fix the checkpoint, or pass check_finite=False "
                             "to merge anyway")


def per_model(value: Any, n: int, name: str, method: str) -> tuple[float, ...]:
    """Broadcast a scalar hyper-parameter to one value per model, or check a sequence has length n."""
    if isinstance(value, (list, tuple, np.ndarray)) or (hasattr(value, "shape") and np.ndim(value) > 0):
        vals = tuple(float(v) for v in np.asarray(value).reshape(-1))
        if len(vals) != n:
            raise ValueError(f"{method}: `{name}` has {len(vals)} entries for {n} models")
        return vals
    try:
        return (float(value),) * n
    except (TypeError, ValueError):
        raise TypeError(f"{method}: `{name}` must be a number or one number per model, got {value!r}") from None


def concrete_scalar(value: Any, name: str, method: str) -> float | None:
    """``float(value)`` for a concrete scalar hyper-parameter, None for a tracer (a factor traced by ``jax.jit``:
    its value cannot be validated at trace time and is used as is). Raises for a non-scalar."""
    if not is_concrete(value):
        if np.ndim(value) != 0:
            raise ValueError(f"{method}: `{name}` must be a scalar, got shape {np.shape(value)}")
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{method}: `{name}` must be a real scalar, got {value!r}") from None


def check_finite_param(value: float, name: str, method: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{method}: `{name}` must be finite, got {value}")


def check_density(densities: Sequence[float], method: str) -> None:
    for d in densities:
        if not (0.0 < d <= 1.0):
            raise ValueError(f"{method}: density must be in (0, 1], got {d}")


def check_unit_interval(value: float, name: str, method: str, open_low: bool = False, open_high: bool = False) -> None:
    lo_ok = value > 0 if open_low else value >= 0
    hi_ok = value < 1 if open_high else value <= 1
    if not (lo_ok and hi_ok and math.isfinite(value)):
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{method}: `{name}` must be in {lo}0, 1{hi}, got {value}")


def cycle_batches(batches, method: str):
    """Yield the batches of a re-iterable forever, one pass after another (the learned-coefficient methods take one
    batch per step); an empty iterable raises ``ValueError`` naming ``method`` at the first ``next``."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError(f"{method}: `batches` is empty")


def path_seed(path: str) -> int:
    """A stable 31-bit seed from a leaf path: the same tensor gets the same random stream whether the tree is
    merged whole or streamed tensor by tensor by the CLI."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(key, path_seed(path))


def _out_dtype(x: Any) -> Any:
    return x.dtype


def f32(x: jax.Array) -> jax.Array:
    d = jnp.result_type(x)
    if any(d == jnp.dtype(t) for t in LOW_PRECISION_DTYPES) or jnp.issubdtype(d, jnp.floating):
        return x.astype(jnp.float32)
    return x


def map_leaves(fn: Callable[..., Any], base: PyTree | None, models: Sequence[PyTree]) -> PyTree:
    """Apply ``fn(path, base_leaf_or_None, model_leaves_tuple)`` to every leaf; return a tree shaped like the
    first tree (base if given, else model 0)."""
    template = base if base is not None else models[0]
    flat_models = [flatten(m) for m in models]
    flat_base = flatten(base) if base is not None else None
    out = {}
    for p in flatten(template):
        out[p] = fn(p, None if flat_base is None else flat_base[p], tuple(fm[p] for fm in flat_models))
    return unflatten(out, like=template)


def check_leaf_dtypes(base: PyTree | None, models: Sequence[PyTree], method: str) -> None:
    for tree in ([base] if base is not None else []) + list(models):
        for p, leaf in flatten(tree).items():
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise TypeError(f"{method}: leaf {p!r} has non-floating dtype {jnp.result_type(leaf)}; "
                                "merge methods need floating parameters")
