"""Byzantine-robust aggregation rules: coordinate-wise median, coordinate-wise trimmed mean, Krum and multi-Krum.

All follow the package's rule convention ``rule(global_params, client_params, *, weights=None, **hparams)``
(:mod:`merging.federated`). They aggregate the clients' models θ_i (``Δ_i = θ_i - θ_t`` would give the same result:
every rule here commutes with a common shift). ``f`` is the number of Byzantine clients to tolerate.

**Coordinate-wise median** (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates", Option I), per coordinate ``k`` of every leaf, over the ``n`` participating clients::

    θ_{t+1}[k] = median_i θ_i[k]        (the mean of the two middle values when n is even)

**Coordinate-wise trimmed mean** (Yin et al. 2018, Option II, with β n = f values cut per side)::

    θ_{t+1}[k] = 1/(n - 2f) Σ_{j=f}^{n-f-1} sort_i(θ_i[k])_j          (needs n > 2f)

**Krum** (Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", Section 4), with distances over the whole model (the flattened concatenation of all leaves)::

    s(i) = Σ_{i→j} ‖θ_i - θ_j‖²       (i→j: the n - f - 2 clients j ≠ i closest to i, squared Euclidean)
    Krum = θ_{i*},   i* = argmin_i s(i)  (ties: the lowest client index)          (needs n > 2f + 2)

**Multi-Krum** (the same paper's variant): the mean of the ``m`` models with the lowest scores (``m = 1`` is Krum,
``m = n`` the plain mean); default ``m = n - f`` (weightlab's choice: as many as can be honest; an ``m`` above
``n`` takes all participants; ties in the ranking: lower index first).

Participation. ``weights`` only marks who takes part: clients with ``weights == 0`` are absent and excluded from
every order statistic, distance and score (under ``jit`` by masking: absent entries sort last as ``+inf`` and are
never selected); the magnitudes of positive weights are ignored (these rules weigh every participant equally, as
the papers). ``n`` is the number of participants. With nobody participating the rules return ``global_params``
unchanged (the package convention); with too few participants for ``f`` (``n ≤ 2f`` for the trimmed mean,
``n ≤ 2f + 2`` for Krum) they raise ``ValueError`` when ``weights`` is concrete and, under ``jit`` with traced
weights (where nothing can be raised), return ``global_params`` unchanged: the round is skipped.

Checks (client trees against the global tree, weights, NaN/Inf, ``f``/``m``) run before any work. ``f`` and ``m``
are passed to the compiled kernels as values: every ``f`` / ``m`` shares one compilation. Every leaf is
computed in float32 and returned in its ``global_params`` dtype. Jittable and sharding-agnostic: leaves may be
sharded on the client axis (:func:`~merging.federated.clients.shard_clients`) or on any other.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import is_concrete
from merging.federated.clients import validate_rule_inputs

PyTree = Any

__all__ = ["coordinate_median", "trimmed_mean", "krum", "multi_krum", "krum_scores", "pairwise_sq_distances"]


# ------------------------------------------------------------------------------------------------ validation


def _check_int(value: Any, name: str, method: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{method}: `{name}` must be an integer >= {low}, got {value!r}")
    return int(value)


def _n_present(weights: jax.Array) -> int | None:
    """The number of participants (``weights > 0``) when ``weights`` is concrete, else None."""
    if not is_concrete(weights):
        return None
    return int(np.sum(np.asarray(jax.device_get(weights)) > 0))


def _check_enough(n_clients: int, n_present: int | None, need: int, f: int, method: str, rule: str) -> None:
    """Raise unless ``need`` (the minimum participant count for ``f``) is met by the C clients and, when known, by
    the participants (0 participants is allowed: the rule returns ``global_params``)."""
    if n_clients < need:
        raise ValueError(f"{method}: {rule} needs n >= {need} clients for f={f}, but client_params has "
                         f"{n_clients}; lower `f`")
    if n_present is not None and 0 < n_present < need:
        raise ValueError(f"{method}: {rule} needs n >= {need} participating clients for f={f}, but only "
                         f"{n_present} have weight > 0; lower `f`")


# ------------------------------------------------------------------------------------------------ kernels


def _mask_like(present: jax.Array, x: jax.Array) -> jax.Array:
    return present.reshape((-1,) + (1,) * (x.ndim - 1))


def _sorted_present(x: jax.Array, present: jax.Array) -> jax.Array:
    """``x`` [C, ...] sorted along the client axis with the absent clients' entries last (as +inf)."""
    return jnp.sort(jnp.where(_mask_like(present, x), x.astype(jnp.float32), jnp.inf), axis=0)


def _finish(ok: jax.Array, agg: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.where(ok, agg, g.astype(jnp.float32)).astype(g.dtype)


@jax.jit
def _median_tree(global_params, client_params, weights):
    present = weights > 0
    n = jnp.sum(present, dtype=jnp.int32)
    cmax = weights.shape[0] - 1
    lo, hi = jnp.clip((n - 1) // 2, 0, cmax), jnp.clip(n // 2, 0, cmax)

    def leaf(g, c):
        s = _sorted_present(c, present)
        med = 0.5 * jnp.take(s, lo, axis=0) + 0.5 * jnp.take(s, hi, axis=0)
        return _finish(n > 0, med, g)

    return jax.tree.map(leaf, global_params, client_params)


@jax.jit
def _trimmed_tree(global_params, client_params, weights, f):
    present = weights > 0
    n = jnp.sum(present, dtype=jnp.int32)
    kept = n - 2 * f

    def leaf(g, c):
        s = _sorted_present(c, present)
        pos = jnp.arange(s.shape[0]).reshape((-1,) + (1,) * (s.ndim - 1))
        keep = (pos >= f) & (pos < n - f)
        mean = jnp.sum(jnp.where(keep, s, 0.0), axis=0) / jnp.maximum(kept, 1).astype(jnp.float32)
        return _finish(kept > 0, mean, g)

    return jax.tree.map(leaf, global_params, client_params)


def pairwise_sq_distances(client_params: PyTree) -> jax.Array:
    """``D[i, j] = ‖θ_i - θ_j‖²`` over the flattened concatenation of all leaves of a client-stacked tree, in
    float32, ``[C, C]`` (exactly symmetric, zero diagonal). Computed as differences (not from a Gram matrix, which
    cancels catastrophically when the models are close to each other), one client row at a time per leaf
    (``lax.map``: memory ``C x`` a leaf, not ``C² x``). No validation; traceable."""
    total = None
    for leaf in jax.tree.leaves(client_params):
        x = leaf.astype(jnp.float32).reshape(leaf.shape[0], -1)
        d = jax.lax.map(lambda xi, x=x: jnp.sum(jnp.square(x - xi), axis=1), x)
        total = d if total is None else total + d
    return total


def _scores(d: jax.Array, present: jax.Array, f: int) -> jax.Array:
    c = d.shape[0]
    n = jnp.sum(present, dtype=jnp.int32)
    pair = present[:, None] & present[None, :] & ~jnp.eye(c, dtype=bool)
    s = jnp.sort(jnp.where(pair, d, jnp.inf), axis=1)
    near = jnp.arange(c)[None, :] < (n - f - 2)
    return jnp.where(present, jnp.sum(jnp.where(near, s, 0.0), axis=1), jnp.inf)


@jax.jit
def _scores_tree(client_params, weights, f):
    return _scores(pairwise_sq_distances(client_params), weights > 0, f)


@functools.partial(jax.jit, static_argnames=("one",))
def _multi_krum_tree(global_params, client_params, weights, f, m, *, one):
    """one: Krum (the argmin's model itself); else multi-Krum with ``m`` (``-1``: ``n - f``). ``f``, ``m``: traced
    int32 scalars (one compilation for every value)."""
    present = weights > 0
    n = jnp.sum(present, dtype=jnp.int32)
    ok = n > 2 * f + 2
    scores = _scores(pairwise_sq_distances(client_params), present, f)
    if one:
        i = jnp.argmin(scores)
        return jax.tree.map(lambda g, c: _finish(ok, jnp.take(c, i, axis=0).astype(jnp.float32), g),
                            global_params, client_params)
    m_eff = jnp.where(m < 0, n - f, jnp.minimum(m, n))
    order = jnp.argsort(scores, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    sel = (rank < m_eff) & present
    count = jnp.maximum(jnp.sum(sel), 1).astype(jnp.float32)

    def leaf(g, c):
        x = c.astype(jnp.float32)
        mean = jnp.sum(jnp.where(_mask_like(sel, x), x, 0.0), axis=0) / count
        return _finish(ok, mean, g)

    return jax.tree.map(leaf, global_params, client_params)


# ------------------------------------------------------------------------------------------------ rules


def coordinate_median(global_params: PyTree, client_params: PyTree, *, weights: Any = None,
                      check_finite: bool = True) -> PyTree:
    """Coordinate-wise median of the participating clients' models (module docstring; Yin et al. 2018).

    ``global_params``: the server model θ_t (returned when nobody participates). ``client_params``: client-stacked
    tree ``[C, ...]``. ``weights``: ``[C]``, ``0`` = absent (excluded), positive magnitudes ignored. Jittable.
    """
    _, w = validate_rule_inputs(global_params, client_params, weights, "coordinate_median", check_finite)
    return _median_tree(global_params, client_params, w)


def trimmed_mean(global_params: PyTree, client_params: PyTree, *, f: int, weights: Any = None,
                 check_finite: bool = True) -> PyTree:
    """Coordinate-wise trimmed mean: per coordinate, drop the ``f`` largest and ``f`` smallest values among the
    ``n`` participants and average the other ``n - 2f`` (module docstring; Yin et al. 2018). Needs ``n > 2f``.
    ``f = 0`` is the plain (unweighted) mean of the participants. Jittable."""
    f = _check_int(f, "f", "trimmed_mean", 0)
    n, w = validate_rule_inputs(global_params, client_params, weights, "trimmed_mean", check_finite)
    _check_enough(n, _n_present(w), 2 * f + 1, f, "trimmed_mean", "the trimmed mean")
    return _trimmed_tree(global_params, client_params, w, jnp.int32(f))


def krum_scores(global_params: PyTree, client_params: PyTree, *, f: int, weights: Any = None,
                check_finite: bool = True) -> jax.Array:
    """Krum's scores ``s(i) = Σ_{i→j} ‖θ_i - θ_j‖²`` (sum over the ``n - f - 2`` nearest other participants;
    distances over all leaves flattened together), float32 ``[C]``, ``+inf`` for absent clients. Needs
    ``n > 2f + 2``. :func:`krum` returns the model with the lowest score. ``global_params`` is only validated
    against (the scores do not depend on it)."""
    f = _check_int(f, "f", "krum_scores", 0)
    n, w = validate_rule_inputs(global_params, client_params, weights, "krum_scores", check_finite)
    _check_enough(n, _n_present(w), 2 * f + 3, f, "krum_scores", "Krum (n > 2f + 2)")
    return _scores_tree(client_params, w, jnp.int32(f))


def krum(global_params: PyTree, client_params: PyTree, *, f: int, weights: Any = None,
         check_finite: bool = True) -> PyTree:
    """Krum (Blanchard et al. 2017): the participating client's model with the lowest :func:`krum_scores` (ties:
    the lowest index), every leaf of that one client. Needs ``n > 2f + 2`` participants. Jittable."""
    f = _check_int(f, "f", "krum", 0)
    n, w = validate_rule_inputs(global_params, client_params, weights, "krum", check_finite)
    _check_enough(n, _n_present(w), 2 * f + 3, f, "krum", "Krum (n > 2f + 2)")
    return _multi_krum_tree(global_params, client_params, w, jnp.int32(f), jnp.int32(1), one=True)


def multi_krum(global_params: PyTree, client_params: PyTree, *, f: int, m: int | None = None, weights: Any = None,
               check_finite: bool = True) -> PyTree:
    """Multi-Krum (Blanchard et al. 2017): the unweighted mean of the ``m`` participants with the lowest
    :func:`krum_scores` (``m=None``: ``n - f``; an ``m`` above the participant count ``n`` takes all of them).
    Needs ``n > 2f + 2`` participants and ``1 <= m <= C``. Jittable."""
    f = _check_int(f, "f", "multi_krum", 0)
    n, w = validate_rule_inputs(global_params, client_params, weights, "multi_krum", check_finite)
    if m is not None:
        m = _check_int(m, "m", "multi_krum", 1)
        if m > n:
            raise ValueError(f"multi_krum: `m` must be at most the number of clients {n}, got {m}")
    _check_enough(n, _n_present(w), 2 * f + 3, f, "multi_krum", "multi-Krum (n > 2f + 2)")
    return _multi_krum_tree(global_params, client_params, w, jnp.int32(f), jnp.int32(-1 if m is None else m),
                            one=False)
