"""FedAU (Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated Averaging",
ICLR 2024): FedAvg whose aggregation weight of each client is an online estimate of its mean participation interval
(≈ 1 / p_i for an unknown participation probability p_i), so the rarely seen clients count as much as the others in
the original objective ``(1/N) Σ_i f_i``.

Transcribed from the authors' code (github.com/IBM/fedau, main.py, ``weighting_method == 'adaptive'``). Per client
the server keeps ``M_i`` (rounds since its last participation) and the list of its past intervals (here: their sum
and number); in every round, for every client::

    participates:  ω_i = mean(intervals_i) if any interval is recorded, else 1     (the weight of THIS round)
                   intervals_i.append(M_i + 1);  M_i = 0                            (used from the next round on)
    absent:        M_i += 1;  if M_i >= K: intervals_i.append(M_i); M_i = 0        (the cutoff K on an interval)

    x ← x + η_g Σ_{i ∈ S_t} ω_i Δ_i / N,        Δ_i = θ_i - x                        (N: all clients)

``cutoff=None`` never cuts (the reference's default ``-k-adaptive 100000``). With objective weights ``q_i`` (the
``weights`` argument; :func:`~merging.federated.harness.run_federated` passes the example counts with
``weighting="counts"``, ones with ``"uniform"``) the update generalizes to ``η_g Σ_{i∈S_t} ω_i q_i Δ_i / Σ_i q_i``,
which is the reference's for ``q_i = 1``. Only the Bernoulli participation of the paper's main experiments is
simulated by the harness; the weight rule does not depend on the participation pattern.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import is_concrete
from merging import _common as C
from merging.federated.clients import validate_rule_inputs
from merging.federated.harness import ServerRule

PyTree = Any

__all__ = ["FedAUState", "fedau_init", "fedau_weights", "fedau_step", "fedau_update", "fedau"]


class FedAUState(NamedTuple):
    """Per-client participation statistics (all ``[C]`` int32): ``since`` = M_i, rounds since the client last
    participated (or since its last cut interval); ``interval_sum`` / ``interval_count``: the sum and number of its
    recorded intervals (their mean is the client's weight)."""
    since: jax.Array
    interval_sum: jax.Array
    interval_count: jax.Array


def fedau_init(global_params: PyTree, n_clients: int) -> FedAUState:
    """No history: every counter 0 (the first participation of each client has weight 1). ``global_params`` is
    unused (the :class:`~merging.federated.harness.ServerRule` ``init`` signature)."""
    del global_params
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"fedau_init: n_clients must be a positive integer, got {n_clients!r}")
    z = jnp.zeros((int(n_clients),), jnp.int32)
    return FedAUState(z, z, z)


def fedau_weights(state: FedAUState) -> jax.Array:
    """ω_i = mean of client i's recorded intervals, 1 where none is recorded yet (float32 ``[C]``)."""
    count = state.interval_count
    return jnp.where(count > 0, state.interval_sum.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32),
                     1.0)


def _check_cutoff(cutoff: Any, method: str) -> int | None:
    if cutoff is None:
        return None
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, np.integer)) or cutoff < 1:
        raise ValueError(f"{method}: cutoff K must be a positive integer or None, got {cutoff!r}")
    return int(cutoff)


def fedau_step(state: FedAUState, participated: jax.Array, *, cutoff: int | None = None
               ) -> tuple[jax.Array, FedAUState]:
    """One round of the weight estimation: ``(ω, new_state)`` with ``ω`` the float32 ``[C]`` weights of this round
    (0 for the absent clients) and the statistics updated by this round's participation (module docstring)."""
    return _step(state, jnp.asarray(participated), cutoff=_check_cutoff(cutoff, "fedau_step"))


@functools.partial(jax.jit, static_argnames=("cutoff",))
def _step(state: FedAUState, participated: jax.Array, *, cutoff: int | None) -> tuple[jax.Array, FedAUState]:
    part = participated.astype(bool)
    omega = jnp.where(part, fedau_weights(state), 0.0)
    since_absent = state.since + 1
    cut = jnp.zeros_like(part) if cutoff is None else since_absent >= cutoff
    record = part | cut  # a participation closes an interval of M_i + 1 rounds, a cut one of M_i + 1 = K
    new = FedAUState(since=jnp.where(record, 0, since_absent).astype(jnp.int32),
                     interval_sum=(state.interval_sum + jnp.where(record, since_absent, 0)).astype(jnp.int32),
                     interval_count=(state.interval_count + record.astype(jnp.int32)).astype(jnp.int32))
    return omega, new


@functools.partial(jax.jit, static_argnames=("cutoff",))
def _update(global_params, client_params, state, participated, q, lr, *, cutoff):
    omega, new_state = _step(state, participated, cutoff=cutoff)
    coef = omega * q / jnp.maximum(jnp.sum(q), 1e-30)

    def leaf(g, c):
        g32 = g.astype(jnp.float32)
        w = coef.reshape((-1,) + (1,) * (c.ndim - 1))
        return (g32 + lr * jnp.sum(w * (c.astype(jnp.float32) - g32[None]), axis=0)).astype(g.dtype)

    return jax.tree.map(leaf, global_params, client_params), new_state


def fedau_update(global_params: PyTree, client_params: PyTree, state: FedAUState, *, participated: Any,
                 weights: Any = None, lr_global: float = 1.0, cutoff: int | None = None,
                 check_finite: bool = True) -> tuple[PyTree, FedAUState]:
    """FedAU's server step: ``x ← x + η_g Σ_{i∈S_t} ω_i q_i Δ_i / Σ_i q_i`` with this round's ω from
    :func:`fedau_step`; returns ``(new_global_params, new_state)``.

    ``client_params``: client-stacked models after local training (``Δ_i = θ_i - x`` is computed here; absent
    clients' entries are ignored). ``participated``: bool ``[C]`` (S_t). ``weights``: the objective weights ``q``
    ``[C]`` of ALL clients (None = uniform, the paper's ``1/N``); ``lr_global``: η_g (> 0); ``cutoff``: K (None =
    no cut). Pure and jittable; checks run before any work; float32 compute, each leaf back in its dtype.
    """
    method = "fedau"
    n, q = validate_rule_inputs(global_params, client_params, weights, method, check_finite)
    cutoff = _check_cutoff(cutoff, method)
    lr = C.concrete_scalar(lr_global, "lr_global", method)
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"{method}: lr_global must be a positive finite number, got {lr}")
    if np.shape(participated) != (n,):
        raise ValueError(f"{method}: `participated` must have shape ({n},), got {np.shape(participated)}")
    for name, field in zip(FedAUState._fields, state):
        if np.shape(field) != (n,):
            raise ValueError(f"{method}: state.{name} has shape {np.shape(field)}; the clients are {n}")
    if is_concrete(weights) and weights is not None and not float(np.sum(np.asarray(weights))) > 0:
        raise ValueError(f"{method}: the objective weights must not all be 0")
    return _update(global_params, client_params, state, jnp.asarray(participated), q,
                   jnp.asarray(lr_global, jnp.float32), cutoff=cutoff)


def fedau(*, lr_global: float = 1.0, cutoff: int | None = None) -> ServerRule:
    """FedAU as a :class:`~merging.federated.harness.ServerRule` for :func:`run_federated` (hyper-parameters
    bound): ``init = fedau_init``, ``update = fedau_update(..., lr_global=lr_global, cutoff=cutoff)``."""
    _check_cutoff(cutoff, "fedau")
    lr = C.concrete_scalar(lr_global, "lr_global", "fedau")
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"fedau: lr_global must be a positive finite number, got {lr}")

    def update(global_params, client_params, state, *, participated, weights=None):
        return fedau_update(global_params, client_params, state, participated=participated, weights=weights,
                            lr_global=lr_global, cutoff=cutoff)

    return ServerRule(fedau_init, update)
