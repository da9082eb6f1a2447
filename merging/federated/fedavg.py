"""FedAvg's server aggregation (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1: ``w_{t+1} ← Σ_k (n_k / n) w^k_{t+1}``), with any non-negative client weights::

    θ_{t+1} = Σ_i w_i θ_i / Σ_i w_i          (θ_i: client i's model after local training; w_i = 0: not in the round)

and ``θ_{t+1} = θ_t`` when ``Σ_i w_i = 0`` (no client participated). ``weights=None`` is the uniform mean over all
clients; the paper's weights are the clients' example counts ``n_k`` among the participants, which is what
:func:`merging.federated.harness.run_federated` passes by default (``participated * counts``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from merging.federated.clients import validate_rule_inputs

PyTree = Any

__all__ = ["fedavg", "weighted_client_mean"]


def weighted_client_mean(global_params: PyTree, client_params: PyTree, weights: jax.Array) -> PyTree:
    """``Σ_i w_i θ_i / Σ_i w_i`` over the client axis of every leaf, in float32, each leaf returned in the dtype of
    its ``global_params`` leaf; ``global_params`` where ``Σ_i w_i = 0``. No validation (the rules' building block,
    traceable under ``jit``); ``weights``: float32 ``[C]``."""
    total = jnp.sum(weights)
    safe = jnp.where(total > 0, total, 1.0)

    def leaf(g, c):
        w = weights.reshape((-1,) + (1,) * (c.ndim - 1))
        mean = jnp.sum(w * c.astype(jnp.float32), axis=0) / safe
        return jnp.where(total > 0, mean, g.astype(jnp.float32)).astype(g.dtype)

    return jax.tree.map(leaf, global_params, client_params)


_weighted_client_mean = jax.jit(weighted_client_mean)


def fedavg(global_params: PyTree, client_params: PyTree, *, weights: Any = None, check_finite: bool = True) -> PyTree:
    """FedAvg: the weighted mean ``Σ_i w_i θ_i / Σ_i w_i`` of the clients' models (module docstring).

    ``global_params``: the server model θ_t (a plain tree; returned as is when every weight is 0).
    ``client_params``: client-stacked tree of the clients' models after local training (leaf shape ``[C, ...]``).
    ``weights``: ``[C]`` non-negative (0 = client did not participate), None = uniform. Checks (shapes, dtypes,
    weights, finite values) run before any work (:func:`~merging.federated.clients.validate_rule_inputs`).
    Jittable; every leaf is computed in float32 and returned in its ``global_params`` dtype.
    """
    _, w = validate_rule_inputs(global_params, client_params, weights, "fedavg", check_finite)
    return _weighted_client_mean(global_params, client_params, w)
