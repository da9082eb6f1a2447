"""Sharding helpers: a ``data``/``model`` mesh, regex rules to ``NamedSharding`` pytrees, and jit with shardings.

Rules are data, in the style of big_vision / t5x partitioning rules::

    rules = [
        (r"attn/(query|key|value)/kernel$", P(None, "model")),   # column-parallel
        (r"attn/out/kernel$",               P("model", None)),   # row-parallel
        (r".*",                              P()),                # everything else replicated
    ]

The first rule whose regex ``re.search``-es a leaf's path wins; unmatched leaves are replicated. A spec whose mesh
axes do not divide the leaf's shape (or has more entries than the leaf has dimensions) falls back to replicated with
a warning, so one set of rules serves every model size.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.tree import path_to_str

PyTree = Any
Rules = Sequence[tuple[str, P]]

DATA, MODEL = "data", "model"

__all__ = [
    "DATA",
    "MODEL",
    "P",
    "make_mesh",
    "spec_for",
    "rules_to_shardings",
    "shard",
    "jit_sharded",
    "data_sharding",
    "replicated",
]


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D mesh with axes ``("data", "model")``.

    By default all devices go to the ``data`` axis. ``data=None`` means "all remaining devices": ``make_mesh(model=2)``
    on 8 devices gives a 4x2 mesh. Raises ``ValueError`` if ``data * model`` is not the number of devices used.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1:
        raise ValueError(f"make_mesh: model axis size must be >= 1, got {model}")
    if data is None:
        if len(devices) % model:
            raise ValueError(f"make_mesh: model={model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data < 1 or data * model > len(devices):
        raise ValueError(f"make_mesh: data={data} x model={model} needs {data * model} devices, have {len(devices)}")
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh`` (``NamedSharding(mesh, PartitionSpec())``): every device holds the
    whole array."""
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Shard the leading (batch) axis over ``data``; other axes replicated."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def spec_for(path: str, shape: tuple[int, ...], rules: Rules, mesh: Mesh, warn: bool = True) -> P:
    """The PartitionSpec the rules give a leaf, after the divisibility fallback."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            break
    else:
        return P()
    if len(spec) > len(shape):
        if warn:
            warnings.warn(f"sharding: {path!r} spec {spec} has more entries than shape {shape}; replicating",
                          stacklevel=3)
        return P()
    for dim, entry in zip(shape, spec):
        size = _axis_size(mesh, entry)
        if dim % size:
            if warn:
                warnings.warn(
                    f"sharding: {path!r} spec {spec} does not divide shape {shape} on mesh {dict(mesh.shape)}; "
                    "replicating", stacklevel=3)
            return P()
    return spec


def rules_to_shardings(tree: PyTree, rules: Rules, mesh: Mesh, warn: bool = True) -> PyTree:
    """A pytree of ``NamedSharding`` with ``tree``'s structure (leaves may be arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(path_to_str(path), tuple(np.shape(leaf)), rules, mesh, warn))

    return jax.tree_util.tree_map_with_path(one, tree)


def shard(tree: PyTree, rules: Rules, mesh: Mesh) -> PyTree:
    """``jax.device_put`` every leaf with the sharding the rules give it."""
    return jax.device_put(tree, rules_to_shardings(tree, rules, mesh))


def jit_sharded(
    fn: Callable,
    in_shardings: Any = None,
    out_shardings: Any = None,
    **jit_kwargs,
) -> Callable:
    """``jax.jit`` with explicit in/out shardings (what ``pjit`` was). Shardings are pytree prefixes of the
    arguments/outputs; ``None`` lets XLA choose (inputs keep their committed sharding)."""
    kwargs = dict(jit_kwargs)
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return jax.jit(fn, **kwargs)
