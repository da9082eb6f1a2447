"""Gossip averaging over a graph, with the variance correction of the "vanishing variance" paper.

Tian, Al-Ars, Kitsak, Hofstee, "Vanishing Variance Problem in Fully Decentralized Neural-Network Systems" (2024;
arXiv:2404.04616; the authors' code: github.com/twoentartian/DFL_torch, ``py_src/model_average.py`` and
``py_src/model_variance_correct.py``). Nodes i = 1..C hold their own models θ_i (a client-stacked tree, leaf
``[C, ...]``); one gossip step mixes them with a row-stochastic matrix W (W_ij > 0 only for neighbours j of i)::

    θ_i ← Σ_j W_ij θ_j

Averaging k *uncorrelated* models (independently initialized, or drifted apart) divides each layer's weight
variance by ~k (by Σ_j W_ij² for general weights) and undoes the Xavier initialization's scale: the vanishing
variance problem. The correction
rescales every layer (leaf) l of every node back to a target variance, keeping its mean (the reference's
``scale_tensor_to_variance``, ε = 1e-4, unbiased variances as ``torch.var``)::

    y = (x − mean(x)) · √((t + ε) / (var(x) + ε)) + mean(x),      x = θ_i^l after mixing

with the target t_i^l from the pre-mixing variances v_j^l = var(θ_j^l) (transcribed from the authors' code; the
paper's full text was not available here, only its abstract)::

    target="others":  t_i = Σ_{j≠i} W_ij v_j / Σ_{j≠i} W_ij   (``FollowOthers``: the mean variance of the received
                                                               models; the reference's "VC" preset)
    target="mixed":   t_i = Σ_j W_ij v_j                       (``FollowConservative`` with conservative = W_ii)
    target="self":    t_i = v_i                                (``FollowSelfVariance``)

A node with no neighbour (no off-diagonal weight) keeps its own variance under ``"others"``. Leaves with one entry
per node (the reference skips ``numel() == 1``) and leaves matching ``exclude`` (the reference skips BatchNorm's
running statistics) are mixed but not rescaled. Mixing matrices: :func:`metropolis_hastings` gives the symmetric,
doubly stochastic W_ij = 1 / (1 + max(d_i, d_j)) on the edges (the Metropolis weights of Xiao, Boyd & Lall 2005),
for the graphs of :func:`ring_graph`, :func:`random_regular_graph` and :func:`complete_graph` (complete: W = 1/C,
one step = FedAvg); :func:`neighbor_average` is the reference's ``ConservativeModelAverager`` (W_ii = c,
W_ij = (1 − c)/d_i), so the authors' "VC" preset is ``gossip_step(θ, neighbor_average(adjacency, 0.5),
variance_correction=True, target="others")``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import flatten, is_concrete, unflatten
from merging import _common as C
from merging.federated.clients import num_clients

PyTree = Any

__all__ = ["ring_graph", "complete_graph", "random_regular_graph", "metropolis_hastings", "neighbor_average",
           "mixing_matrix", "check_mixing_matrix", "layer_variances", "rescale_to_variance", "gossip_step",
           "TARGETS"]

#: Names of the variance targets of :func:`gossip_step` (see the module docstring).
TARGETS = ("others", "mixed", "self")
_HI = jax.lax.Precision.HIGHEST


def _check_n(n: Any, name: str = "n", lo: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {n!r}")
    return int(n)


def ring_graph(n: int) -> np.ndarray:
    """Adjacency ``[n, n]`` (bool, no self loops) of the cycle 0 - 1 - ... - (n-1) - 0 (n ≥ 3)."""
    n = _check_n(n, lo=3)
    a = np.zeros((n, n), bool)
    i = np.arange(n)
    a[i, (i + 1) % n] = a[(i + 1) % n, i] = True
    return a


def complete_graph(n: int) -> np.ndarray:
    """Adjacency ``[n, n]`` of the complete graph (every pair connected, no self loops; n ≥ 2)."""
    n = _check_n(n, lo=2)
    return ~np.eye(n, dtype=bool)


def _connected(a: np.ndarray) -> bool:
    seen, stack = {0}, [0]
    while stack:
        for j in np.flatnonzero(a[stack.pop()]):
            if j not in seen:
                seen.add(int(j))
                stack.append(int(j))
    return len(seen) == len(a)


def random_regular_graph(n: int, degree: int, *, seed: int, max_tries: int = 1000) -> np.ndarray:
    """Adjacency ``[n, n]`` of a uniformly-ish random connected simple ``degree``-regular graph (random stub pairing
    that only pairs stubs still allowed, restarted on a dead end or a disconnected result; Steger & Wormald 1999).
    Needs ``1 ≤ degree < n`` and ``n · degree`` even; deterministic in ``seed``."""
    n = _check_n(n, lo=2)
    degree = _check_n(degree, "degree")
    if degree >= n or (n * degree) % 2 or (degree == 1 and n > 2):
        raise ValueError(f"random_regular_graph: needs degree < n, n * degree even and (connected) degree >= 2 for "
                         f"n > 2, got n={n}, degree={degree}")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        a = np.zeros((n, n), bool)
        free = np.full(n, degree)
        ok = True
        while free.sum():
            u = int(rng.choice(np.flatnonzero(free)))
            cand = np.flatnonzero((free > 0) & ~a[u])
            cand = cand[cand != u]
            if not len(cand):
                ok = False
                break
            v = int(rng.choice(cand, p=free[cand] / free[cand].sum()))
            a[u, v] = a[v, u] = True
            free[u] -= 1
            free[v] -= 1
        if ok and _connected(a):
            return a
    raise RuntimeError(f"random_regular_graph: no connected {degree}-regular graph on {n} nodes in {max_tries} tries")


def _adjacency(adjacency: Any, method: str) -> np.ndarray:
    a = np.asarray(adjacency)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise ValueError(f"{method}: adjacency must be a square [n, n] matrix, got shape {a.shape}")
    a = a.astype(bool)
    if not np.array_equal(a, a.T):
        raise ValueError(f"{method}: adjacency must be symmetric (an undirected graph)")
    np.fill_diagonal(a, False)
    return a


def metropolis_hastings(adjacency: Any) -> np.ndarray:
    """Metropolis-Hastings mixing weights ``[n, n]`` float32 of an undirected graph: W_ij = 1 / (1 + max(d_i, d_j))
    on the edges, W_ii = 1 − Σ_{j≠i} W_ij, 0 elsewhere (symmetric, doubly stochastic, non-negative)."""
    a = _adjacency(adjacency, "metropolis_hastings")
    d = a.sum(1)
    w = np.where(a, 1.0 / (1.0 + np.maximum(d[:, None], d[None, :])), 0.0)
    w[np.diag_indices_from(w)] = 1.0 - w.sum(1)
    return w.astype(np.float32)


def neighbor_average(adjacency: Any, self_weight: float = 0.5) -> np.ndarray:
    """The reference's ``ConservativeModelAverager(c)``: W_ii = c, W_ij = (1 − c) / d_i for the d_i neighbours of
    i (a node without neighbours keeps W_ii = 1). Row stochastic; doubly stochastic when the graph is regular."""
    a = _adjacency(adjacency, "neighbor_average")
    c = float(self_weight)
    C.check_unit_interval(c, "self_weight", "neighbor_average")
    d = a.sum(1)
    w = np.where(a, (1.0 - c) / np.maximum(d, 1)[:, None], 0.0)
    w[np.diag_indices_from(w)] = np.where(d > 0, c, 1.0)
    return w.astype(np.float32)


def mixing_matrix(topology: str, n: int, *, degree: int | None = None, seed: int | None = None) -> np.ndarray:
    """Metropolis-Hastings weights of a ``"ring"``, ``"regular"`` (random ``degree``-regular, needs ``degree`` and
    ``seed``) or ``"complete"`` graph on ``n`` nodes."""
    if topology == "ring":
        a = ring_graph(n)
    elif topology == "complete":
        a = complete_graph(n)
    elif topology == "regular":
        if degree is None or seed is None:
            raise ValueError("mixing_matrix('regular', ...) needs `degree` and `seed`")
        a = random_regular_graph(n, degree, seed=seed)
    else:
        raise ValueError(f"mixing_matrix: topology must be 'ring', 'regular' or 'complete', got {topology!r}")
    return metropolis_hastings(a)


def check_mixing_matrix(mixing: Any, *, doubly_stochastic: bool = True, atol: float = 1e-5,
                        method: str = "check_mixing_matrix") -> None:
    """Raise ``ValueError`` unless ``mixing`` is a square, finite, non-negative matrix whose rows (and, with
    ``doubly_stochastic``, columns) sum to 1 within ``atol``."""
    w = np.asarray(jax.device_get(mixing), np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"{method}: the mixing matrix must be square [C, C], got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{method}: the mixing matrix has non-finite entries")
    if np.any(w < 0):
        raise ValueError(f"{method}: the mixing matrix must be non-negative, min entry {w.min()}")
    rows = np.abs(w.sum(1) - 1).max()
    if rows > atol:
        raise ValueError(f"{method}: every row of the mixing matrix must sum to 1 (max deviation {rows:.3g})")
    cols = np.abs(w.sum(0) - 1).max()
    if doubly_stochastic and cols > atol:
        raise ValueError(f"{method}: every column must sum to 1 for a doubly stochastic matrix (max deviation "
                         f"{cols:.3g})")


def _var(x: jax.Array) -> jax.Array:
    """Unbiased variance of each node's slice of a ``[C, ...]`` leaf, float32 ``[C]`` (torch.var's ddof = 1)."""
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    return jnp.var(x, axis=1, ddof=1)


def _rescale(x: jax.Array, target: jax.Array, eps: float) -> jax.Array:
    xf = x.reshape(x.shape[0], -1).astype(jnp.float32)
    mean = jnp.mean(xf, axis=1, keepdims=True)
    var = jnp.var(xf, axis=1, ddof=1, keepdims=True)
    scale = jnp.sqrt((target[:, None] + eps) / (var + eps))
    return ((xf - mean) * scale + mean).reshape(x.shape)


def _corrected_paths(flat: dict, exclude: Any) -> tuple[str, ...]:
    pats = [] if exclude is None else [re.compile(p) for p in ([exclude] if isinstance(exclude, str) else exclude)]
    return tuple(p for p, x in flat.items()
                 if int(np.prod(np.shape(x)[1:])) > 1 and not any(q.search(p) for q in pats))


def _check_eps(eps: Any, method: str) -> float:
    e = C.concrete_scalar(eps, "eps", method)
    if e is None:
        raise TypeError(f"{method}: `eps` must be a concrete number")
    C.check_finite_param(e, "eps", method)
    if e < 0:
        raise ValueError(f"{method}: `eps` must be >= 0, got {e}")
    return e


@jax.jit
def _variances(flat: dict) -> dict:
    return {p: _var(x) if int(np.prod(x.shape[1:])) > 1 else jnp.zeros(x.shape[:1], jnp.float32)
            for p, x in flat.items()}


def layer_variances(client_params: PyTree) -> PyTree:
    """Per node and leaf the unbiased variance of the node's weights: a tree of float32 ``[C]`` arrays (0 for
    leaves with a single entry per node, as the reference). One jitted program per tree structure."""
    num_clients(client_params)
    return unflatten(_variances(flatten(client_params)), like=client_params)


def rescale_to_variance(client_params: PyTree, target_variance: PyTree, *, eps: float = 1e-4,
                        exclude: Any = None) -> PyTree:
    """The correction alone: rescale each node's leaf to its target variance (a tree of ``[C]`` arrays or scalars
    with ``client_params``' structure, e.g. :func:`layer_variances` of the models before averaging, or Xavier's
    2 / (fan_in + fan_out)), keeping its mean. Single-entry and ``exclude``-matched leaves pass unchanged."""
    method = "rescale_to_variance"
    n = num_clients(client_params)
    e = _check_eps(eps, method)
    C.check_leaf_dtypes(None, [client_params], method)
    flat, tflat = flatten(client_params), flatten(target_variance)
    if set(tflat) != set(flat):
        raise ValueError(f"{method}: target_variance must have the paths of client_params; missing "
                         f"{sorted(set(flat) - set(tflat))[:3]}, extra {sorted(set(tflat) - set(flat))[:3]}")
    for p, t in tflat.items():
        if np.ndim(t) > 1 or (np.ndim(t) == 1 and np.shape(t)[0] != n):
            raise ValueError(f"{method}: target_variance at {p!r} must be a scalar or have shape ({n},), got "
                             f"{np.shape(t)}")
    corrected = _corrected_paths(flat, exclude)
    targets = {p: jnp.broadcast_to(jnp.asarray(tflat[p], jnp.float32), (n,)) for p in corrected}
    out = _rescale_all(flat, targets, jnp.asarray(e, jnp.float32))
    return unflatten(out, like=client_params)


@jax.jit
def _rescale_all(flat: dict, targets: dict, eps: jax.Array) -> dict:
    return {p: _rescale(x, targets[p], eps).astype(x.dtype) if p in targets else x for p, x in flat.items()}


@functools.partial(jax.jit, static_argnames=("corrected", "target"))
def _gossip(flat: dict, w: jax.Array, eps: jax.Array, *, corrected: tuple, target: str) -> dict:
    off = w * (1.0 - jnp.eye(w.shape[0], dtype=w.dtype))
    off_sum = jnp.sum(off, axis=1)
    out = {}
    for p, x in flat.items():
        mixed = jnp.tensordot(w, x.astype(jnp.float32), axes=1, precision=_HI)  # full float32, no TF32 on GPUs
        if p in corrected:
            v = _var(x)
            if target == "mixed":
                t = jnp.dot(w, v, precision=_HI)
            elif target == "self":
                t = v
            else:
                t = jnp.where(off_sum > 0, jnp.dot(off, v, precision=_HI) / jnp.where(off_sum > 0, off_sum, 1.0), v)
            mixed = _rescale(mixed, t, eps)
        out[p] = mixed.astype(x.dtype)
    return out


def gossip_step(client_params: PyTree, mixing: Any, *, variance_correction: bool = False, target: str = "others",
                eps: float = 1e-4, exclude: Any = None, check_finite: bool = True) -> PyTree:
    """One gossip step θ_i ← Σ_j W_ij θ_j on a client-stacked tree, optionally followed by the variance correction
    (see the module docstring for ``target`` / ``eps`` / ``exclude``).

    ``mixing`` is the ``[C, C]`` row-stochastic W (e.g. :func:`mixing_matrix`); when concrete it is checked
    (square, non-negative, rows summing to 1; columns need not, so :func:`neighbor_average` is accepted). Returns a
    client-stacked tree with every leaf in its own dtype (computed in float32); the inputs are not modified.
    Jittable (``mixing`` may be traced); a client axis sharded over the mesh stays a valid input.
    """
    method = "gossip_step"
    n = num_clients(client_params)
    if np.shape(mixing) != (n, n):
        raise ValueError(f"{method}: `mixing` must have shape ({n}, {n}) for {n} clients, got {np.shape(mixing)}")
    if is_concrete(mixing):
        check_mixing_matrix(mixing, doubly_stochastic=False, method=method)
    if not isinstance(variance_correction, (bool, np.bool_)):
        raise TypeError(f"{method}: `variance_correction` must be a bool, got {variance_correction!r}")
    if target not in TARGETS:
        raise ValueError(f"{method}: `target` must be one of {TARGETS}, got {target!r}")
    e = _check_eps(eps, method)
    flat = flatten(client_params)
    C.check_leaf_dtypes(None, [client_params], method)
    if check_finite:
        C.check_all_finite([client_params], ["client_params"], method)
    corrected = _corrected_paths(flat, exclude) if variance_correction else ()
    out = _gossip(flat, jnp.asarray(mixing, jnp.float32), jnp.asarray(e, jnp.float32), corrected=corrected,
                  target=target)
    return unflatten(out, like=client_params)
