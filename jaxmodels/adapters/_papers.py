"""Small helpers shared by the adapter-paper modules (bone, eva, lift, mos, scalearn, mhr): input validation
before any work, kernel selection by path regex, the 2-D view of a kernel."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import filter_paths, flatten

PyTree = Any

__all__ = ["check_finite", "check_positive_int", "check_real", "kernel_paths", "as_matrix", "uniform_arrays"]


@jax.jit
def _count_nonfinite(x):
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


#: leaves up to this many entries are checked on the host (no per-shape compile); larger ones on their devices
HOST_CHECK_MAX = 1 << 16


def check_finite(tree: PyTree, name: str, method: str) -> None:
    """Raise ``ValueError`` naming the first leaf path of ``tree`` holding a NaN or ±Inf. Tracers are skipped
    (values unknown at trace time: validate concrete inputs before jitting). Small leaves are checked on the host,
    large ones by one reduction on their own devices (sharded leaves stay sharded)."""
    where, counts = [], []
    for p, leaf in flatten(tree).items():
        if isinstance(leaf, jax.core.Tracer):
            continue
        d = getattr(leaf, "dtype", None)
        if d is None or not jnp.issubdtype(d, jnp.inexact):
            continue
        if np.size(leaf) <= HOST_CHECK_MAX:
            n_bad = np.int32(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf, np.float32))))
        else:
            n_bad = _count_nonfinite(leaf)
        if isinstance(n_bad, jax.core.Tracer):
            continue
        where.append(p)
        counts.append(n_bad)
    if not counts:
        return
    for p, n in zip(where, np.asarray(jax.device_get(counts))):
        if n:
            raise ValueError(f"{method}: {name} has {int(n)} non-finite value(s) (NaN or Inf) at {p!r}")


def check_positive_int(value, name: str, method: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{method}: `{name}` must be a positive integer, got {value!r}")
    return int(value)


def check_real(value, name: str, method: str, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{method}: `{name}` must be a real number, got {value!r}") from None
    bad = not math.isfinite(v) or (lo is not None and (v < lo or (lo_open and v == lo))) or (
        hi is not None and (v > hi or (hi_open and v == hi)))
    if bad:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{method}: `{name}` must be in {lb}{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'}{rb}, got {value!r}")
    return v


def kernel_paths(params: PyTree, include: str | None, exclude: str | None, method: str) -> list[str]:
    """Paths (as :func:`jaxmodels.flatten`) of the floating leaves with ndim >= 2 selected by the regexes.
    Raises if nothing is selected."""
    flat = filter_paths(params, include, exclude)
    out = [p for p, x in flat.items() if getattr(x, "ndim", 0) >= 2 and jnp.issubdtype(x.dtype, jnp.floating)]
    if not out:
        raise ValueError(f"{method}: no floating kernel with ndim >= 2 matches include={include!r} "
                         f"exclude={exclude!r}")
    return out


def as_matrix(kernel: jax.Array) -> jax.Array:
    """The ``[d_in, d_out]`` view of a kernel (Dense ``[d_in, d_out]``; Conv ``[kh, kw, c_in, c_out]`` ->
    ``[kh·kw·c_in, c_out]``, the layout of :mod:`jaxmodels.capture`)."""
    return kernel.reshape(-1, kernel.shape[-1])


@functools.partial(jax.jit, static_argnums=(1,))
def _uniform_arrays(key, specs):
    return [jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32, -b, b)
            for i, (shape, b) in enumerate(specs)]


def uniform_arrays(key: jax.Array, specs: list[tuple[tuple[int, ...], float]]) -> list[jax.Array]:
    """``U(-b, b)`` float32 arrays of the given ``(shape, b)`` specs from ``fold_in(key, i)``, in ONE compiled
    program (eager random ops compile one by one: seconds for a handful of arrays on CPU)."""
    return _uniform_arrays(key, tuple((tuple(int(d) for d in s), float(b)) for s, b in specs))
