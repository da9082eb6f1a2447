"""Client-stacked pytrees: the params pytree with a leading client axis ``C`` on every leaf (leaf shape ``[C, ...]``).

One array per leaf holds all clients, so local training is one ``jax.vmap`` over the client axis and sharding that
axis over the mesh's ``data`` axis simulates ``C / devices`` clients per device. :func:`validate_rule_inputs` is the
check every aggregation rule runs first (see the package docstring for the rule convention).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.tree import flatten, is_concrete
from merging import _common as C

PyTree = Any

__all__ = ["stack_clients", "unstack_clients", "num_clients", "broadcast_clients", "shard_clients",
           "client_sharding", "client_shapes", "validate_rule_inputs"]


def stack_clients(trees: Sequence[PyTree]) -> PyTree:
    """One client-stacked tree from a list of per-client trees (same paths, shapes and dtypes; the first
    difference is named). Leaf ``p`` of the result is ``stack([t[p] for t in trees])``, shape ``[C, ...]``."""
    trees = C.as_models(trees, 1, "stack_clients")
    C.validate_trees(None, trees, "stack_clients", check_finite=False)
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def num_clients(tree: PyTree) -> int:
    """The client count ``C`` of a client-stacked tree: the common leading dimension of every leaf. Raises
    ``ValueError`` naming the first leaf that is a scalar or whose leading dimension differs."""
    flat = flatten(tree)
    if not flat:
        raise ValueError("num_clients: the tree has no leaves")
    n = None
    for p, leaf in flat.items():
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(f"num_clients: leaf {p!r} is a scalar; a client-stacked leaf has shape [C, ...]")
        if n is None:
            n, first = shape[0], p
        elif shape[0] != n:
            raise ValueError(f"num_clients: leaf {p!r} has {shape[0]} clients on its leading axis but {first!r} "
                             f"has {n}")
    return int(n)


def unstack_clients(tree: PyTree) -> list[PyTree]:
    """The per-client trees of a client-stacked tree (the inverse of :func:`stack_clients`)."""
    n = num_clients(tree)
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def broadcast_clients(params: PyTree, n: int) -> PyTree:
    """``n`` copies of ``params`` as a client-stacked tree (leaf shape ``[n, ...]``, same dtypes)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"broadcast_clients: n must be a positive integer, got {n!r}")
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (int(n),) + np.shape(x)), params)


def client_sharding(mesh: Mesh, n: int, ndim: int, axis: str = "data") -> NamedSharding:
    """``NamedSharding`` with ``P(axis)`` on the leading (client) axis of an ``ndim``-dimensional leaf when ``n`` is a
    multiple of the mesh's ``axis`` size, else replicated."""
    if axis not in mesh.shape:
        raise ValueError(f"shard_clients: mesh has no axis {axis!r} (axes {tuple(mesh.shape)})")
    if ndim and n % mesh.shape[axis] == 0:
        return NamedSharding(mesh, P(axis, *([None] * (ndim - 1))))
    return NamedSharding(mesh, P())


def shard_clients(tree: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
    """``jax.device_put`` every leaf of a client-stacked tree with ``NamedSharding(mesh, P(axis))`` on the client
    axis when ``C`` is a multiple of the mesh's ``axis`` size, else replicated on the mesh (works for any leaf
    whose leading axis is the client axis: params, optimizer states, :class:`~merging.federated.partitions.
    ClientData` fields)."""
    n = num_clients(tree)
    return jax.tree.map(lambda x: jax.device_put(x, client_sharding(mesh, n, np.ndim(x), axis)), tree)


def client_shapes(client_params: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` per leaf with the client axis removed: what one client's tree looks like."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)), client_params)


def validate_rule_inputs(global_params: PyTree, client_params: PyTree, weights: Any, method: str,
                         check_finite: bool = True) -> tuple[int, jax.Array]:
    """The checks every aggregation rule runs before any work; returns ``(C, weights)`` with ``weights`` a float32
    ``[C]`` array (ones for ``weights=None``).

    * ``client_params`` is client-stacked (one leading dimension ``C`` on every leaf) and, without that axis, has
      the paths, shapes and dtypes of ``global_params`` (the first differing path is named);
    * floating leaves only; with ``check_finite``, no NaN/Inf in either tree (skipped for tracers under ``jit``);
    * ``weights`` has shape ``[C]`` and, when concrete, is finite and non-negative. A zero total weight (no client
      participated) is allowed: rules then return ``global_params`` unchanged.
    """
    n = num_clients(client_params)
    try:
        C.validate_trees(global_params, [client_shapes(client_params)], method, check_finite=False)
    except ValueError as e:
        raise ValueError(str(e).replace("'model_0'", "'client_params' (per client)").replace("'base'",
                                                                                            "'global_params'")) \
            from None
    C.check_leaf_dtypes(global_params, [], method)
    if check_finite:
        C.check_all_finite([global_params, client_params], ["global_params", "client_params"], method)
    if weights is None:
        return n, jnp.ones((n,), jnp.float32)
    if np.shape(weights) != (n,):
        raise ValueError(f"{method}: `weights` must have shape ({n},) (one per client), got {np.shape(weights)}")
    if is_concrete(weights):
        w = np.asarray(jax.device_get(weights), np.float32)
        if not np.all(np.isfinite(w)):
            raise ValueError(f"{method}: `weights` must be finite, got {w}")
        if np.any(w < 0):
            raise ValueError(f"{method}: `weights` must be non-negative (0 = did not participate), got {w}")
    return n, jnp.asarray(weights, jnp.float32)
