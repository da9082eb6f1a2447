"""The federated simulation harness: vmapped local training of all clients and the server's round loop.

One round of :func:`run_federated` (FedAvg's loop, McMahan et al. 2017, Algorithm 1, with any aggregation rule)::

    S_t  ~ Bernoulli(p_i) per client (or every client)      participation, from jax.random with the run's seed
    θ_i  = local_update(θ_t, D_i)                            local_steps optax steps from a fresh optimizer state
    θ_{t+1} = aggregate(θ_t, θ, weights = 1[i ∈ S_t] · n_i)   e.g. fedavg: Σ_i w_i θ_i / Σ_i w_i

Every client trains every round (one vmapped program of fixed shape, compiled once); the non-participants' models
are then replaced by θ_t (``Δ_i = 0``) and get weight 0, so their result is ignored by every rule. Stateful rules
(:class:`ServerRule`, e.g. FedAU) also receive the participation mask and keep their state across rounds.

One round of :func:`run_gossip` (decentralized gossip learning: no server, every node keeps its own model; the
synchronous form of the loop of Tian et al.'s simulator, github.com/twoentartian/DFL_torch: every node trains, sends
its model to its neighbours and averages what it received, :mod:`merging.federated.gossip`)::

    θ_i ← local_update(θ_i, D_i)                             each node from its OWN model (``stacked=True``)
    θ_i ← Σ_j W_ij θ_j   [then the variance correction]      gossip_step(θ, W, variance_correction=...)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.progress import progress_bar
from jaxmodels.sharding import make_mesh
from merging.federated.clients import client_sharding, num_clients
from merging.federated.gossip import TARGETS, check_mixing_matrix, gossip_step
from merging.federated.partitions import ClientData

PyTree = Any

__all__ = ["FederatedResult", "ServerRule", "make_local_update", "run_federated", "run_gossip", "format_table",
           "check_client_data"]


class FederatedResult(NamedTuple):
    """:func:`run_federated`'s result: the final global ``params`` and ``history``, one dict per round: ``round``
    (1-based), ``participants`` (how many clients took part) and the ``eval_fn`` metrics of that round's model.
    :func:`run_gossip`'s: the nodes' final client-stacked models, and ``round`` plus the metrics per round."""
    params: PyTree
    history: list[dict]


class ServerRule(NamedTuple):
    """A stateful aggregation rule in optax's style: ``init(global_params, n_clients) -> state`` and
    ``update(global_params, client_params, state, *, participated, weights) -> (new_global_params, state)``, both
    pure and jittable. ``participated``: bool ``[C]``; ``weights``: float32 ``[C]`` objective weights of all
    clients (the example counts, or ones; not zeroed for the non-participants)."""
    init: Callable[..., Any]
    update: Callable[..., tuple[PyTree, Any]]


def _per_example_xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def check_client_data(data: Any, method: str) -> int:
    """Shape checks of a :class:`ClientData` (``x [C, N, ...]``, ``y`` / ``mask [C, N]``, ``counts [C]``); returns
    ``C``."""
    if not isinstance(data, ClientData):
        raise TypeError(f"{method}: `data` must be a ClientData (merging.federated.partitions), got "
                        f"{type(data).__name__}")
    xs, ys, ms, cs = (np.shape(a) for a in data)
    if len(xs) < 2 or ys != xs[:2] or ms != xs[:2] or cs != xs[:1]:
        raise ValueError(f"{method}: ClientData shapes disagree: x {xs}, y {ys}, mask {ms}, counts {cs} (want x "
                         "[C, N, ...], y and mask [C, N], counts [C])")
    if xs[0] < 1 or xs[1] < 1:
        raise ValueError(f"{method}: ClientData needs at least one client and one slot per client, got x {xs}")
    return int(xs[0])


def _check_positive_int(value: Any, name: str, method: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{method}: `{name}` must be a positive integer, got {value!r}")
    return int(value)


def _check_loop_inputs(tree: PyTree, name: str, data: ClientData, seed: Any, eval_fn: Any, method: str) -> np.ndarray:
    """The round loops' shared checks (seed, eval_fn, counts vs mask, a floating and finite starting tree); returns
    the counts."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{method}: `seed` must be an integer, got {seed!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"{method}: `eval_fn` must be callable, got {type(eval_fn).__name__}")
    counts = np.asarray(data.counts)
    if not np.array_equal(counts, np.asarray(data.mask).sum(1)) or np.any(counts < 0):
        raise ValueError(f"{method}: ClientData counts {counts} disagree with its mask")
    for p, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"{method}: leaf {jax.tree_util.keystr(p)} of {name} has non-floating dtype")
        if not np.all(np.isfinite(np.asarray(jax.device_get(leaf), np.float32))):
            raise ValueError(f"{method}: {name} hold NaN/Inf at {jax.tree_util.keystr(p)}")
    return counts


def make_local_update(apply_fn: Callable[[PyTree, jax.Array], jax.Array], tx: optax.GradientTransformation, *,
                      local_steps: int, batch_size: int, loss_fn: Callable | None = None,
                      mesh: Mesh | None = None) -> Callable[[PyTree, ClientData, jax.Array], PyTree]:
    """``local_update(global_params, data, key) -> client_params`` (client-stacked): every client starts from
    ``global_params`` with a fresh ``tx.init`` state (FedAvg's ClientUpdate) and takes ``local_steps`` steps of
    ``tx`` on minibatches of its own data. ``local_update(client_params, data, key, stacked=True)``: every client
    starts from its OWN model instead (``client_params`` client-stacked, leaf ``[C, ...]``, the ``C`` of ``data``):
    the local step of decentralized (gossip) learning, :func:`run_gossip`. Same keys, same steps: client ``i``
    started from ``broadcast_clients(global_params, C)`` computes exactly what the unstacked call computes.

    ``apply_fn(params, x) -> logits``; ``loss_fn(logits, labels) -> per-example losses [B]`` (default: softmax
    cross-entropy with integer labels). A minibatch is ``batch_size`` examples drawn uniformly with replacement
    among the client's real examples (the slots where ``mask`` is True, wherever they are; i.i.d. minibatch SGD,
    as in FedAvg's analyses; a sort-free draw: XLA:CPU sorts cost 10x the whole step on these sizes). The loss is
    masked, ``Σ_b m_b l_b / max(Σ_b m_b, 1)``, so padding never enters it and an empty client does not move.
    Randomness: ``key`` split per client, then per step.

    Vmapped over the client axis and jitted (compiled once per shapes). With ``mesh`` (default: all devices on the
    ``data`` axis, :func:`jaxmodels.sharding.make_mesh`) the client axis of the data and of the result is sharded
    over ``data`` when ``C`` is a multiple of its size (each device trains its own clients; no communication), and
    ``global_params`` replicated; otherwise no sharding is imposed. A one-device mesh gives the single-device
    computation. ``local_update.place(data)`` puts a ClientData where the update wants it,
    ``local_update.place_params(tree, n)`` a global tree (replicated on the mesh when the ``n`` clients are
    sharded), ``local_update.place_clients(tree)`` a client-stacked tree (sharded like the data: the stacked start)
    and ``local_update.mesh_for(n)`` says over which mesh (None: not sharded); ``run_federated`` and
    :func:`run_gossip` use them so that every round runs one compiled program on inputs placed alike.
    """
    method = "make_local_update"
    local_steps = _check_positive_int(local_steps, "local_steps", method)
    batch_size = _check_positive_int(batch_size, "batch_size", method)
    if not callable(apply_fn):
        raise TypeError(f"{method}: `apply_fn` must be callable, got {type(apply_fn).__name__}")
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"{method}: `tx` must be an optax GradientTransformation, got {type(tx).__name__}")
    per_example = _per_example_xent if loss_fn is None else loss_fn
    state = {"mesh": mesh}

    def the_mesh() -> Mesh:
        if state["mesh"] is None:
            state["mesh"] = make_mesh()
        return state["mesh"]

    def one_client(global_params, x, y, mask, key):
        ranks = jnp.cumsum(mask.astype(jnp.int32))  # ranks[j] = number of real examples in slots 0..j
        count = ranks[-1]

        def step(carry, k):
            params, opt_state = carry
            r = jnp.floor(jax.random.uniform(k, (batch_size,)) * count).astype(jnp.int32)  # r-th real example
            idx = jnp.minimum(jnp.searchsorted(ranks, r + 1, side="left"), mask.shape[0] - 1)
            xb, yb, mb = x[idx], y[idx], mask[idx].astype(jnp.float32)

            def loss(p):
                losses = per_example(apply_fn(p, xb), yb)
                return jnp.sum(losses * mb) / jnp.maximum(jnp.sum(mb), 1.0)

            grads = jax.grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (global_params, tx.init(global_params)),
                                      jax.random.split(key, local_steps))
        return params

    def run(params, x, y, mask, key, sharded: bool, stacked: bool):
        n = x.shape[0]
        m = the_mesh()
        if sharded:
            put = lambda a: jax.lax.with_sharding_constraint(a, client_sharding(m, n, a.ndim))  # noqa: E731
            x, y, mask = put(x), put(y), put(mask)
            params = (jax.tree.map(put, params) if stacked
                      else jax.lax.with_sharding_constraint(params, NamedSharding(m, P())))
        out = jax.vmap(one_client, in_axes=(0 if stacked else None, 0, 0, 0, 0))(params, x, y, mask,
                                                                                 jax.random.split(key, n))
        return jax.tree.map(put, out) if sharded else out

    jitted = jax.jit(run, static_argnames=("sharded", "stacked"))

    def is_sharded(n: int) -> bool:
        m = the_mesh()
        return m.size > 1 and n % m.shape["data"] == 0

    def mesh_for(n: int) -> Mesh | None:
        """The mesh the client axis of ``n`` clients is sharded over, None when it is not (one device)."""
        return the_mesh() if is_sharded(n) else None

    def place(data: ClientData) -> ClientData:
        n = check_client_data(data, "local_update")
        if is_sharded(n):
            return ClientData(*(jax.device_put(a, client_sharding(the_mesh(), n, np.ndim(a))) for a in data))
        return ClientData(*jax.device_put(tuple(data), the_mesh().devices.flat[0]))

    def local_update(global_params: PyTree, data: ClientData, key: jax.Array, *, stacked: bool = False) -> PyTree:
        n = check_client_data(data, "local_update")
        if batch_size > np.shape(data.x)[1]:
            raise ValueError(f"local_update: batch_size={batch_size} exceeds the {np.shape(data.x)[1]} slots per "
                             "client")
        if not isinstance(stacked, (bool, np.bool_)):
            raise TypeError(f"local_update: `stacked` must be a bool, got {stacked!r}")
        name = "client_params" if stacked else "global_params"
        if stacked and num_clients(global_params) != n:
            raise ValueError(f"local_update: client_params hold {num_clients(global_params)} clients; the data has "
                             f"{n}")
        for p, leaf in jax.tree_util.tree_leaves_with_path(global_params):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise TypeError(f"local_update: leaf {jax.tree_util.keystr(p)} of {name} has non-floating "
                                f"dtype {jnp.result_type(leaf)}")
        return jitted(global_params, data.x, data.y, data.mask, key, sharded=is_sharded(n), stacked=bool(stacked))

    def place_params(tree: PyTree, n: int) -> PyTree:
        """A global tree for ``n`` clients: replicated on the mesh when the clients are sharded (the sharding
        every round's result comes back with), else on the one device the clients are on."""
        if is_sharded(n):
            return jax.device_put(tree, NamedSharding(the_mesh(), P()))
        return jax.device_put(tree, the_mesh().devices.flat[0])

    def place_clients(tree: PyTree) -> PyTree:
        """A client-stacked tree placed like the data of its ``C`` clients: sharded on the client axis when they
        are, else on the one device."""
        n = num_clients(tree)
        if is_sharded(n):
            return jax.tree.map(lambda a: jax.device_put(a, client_sharding(the_mesh(), n, np.ndim(a))), tree)
        return jax.device_put(tree, the_mesh().devices.flat[0])

    local_update.place = place
    local_update.place_params = place_params
    local_update.place_clients = place_clients
    local_update.mesh_for = mesh_for
    return local_update


@jax.jit
def _keep_participants(global_params, client_params, participated):
    """Non-participants' models replaced by the global model (Δ_i = 0)."""
    def leaf(g, c):
        keep = participated.reshape((-1,) + (1,) * (c.ndim - 1))
        return jnp.where(keep, c, g[None].astype(c.dtype))
    return jax.tree.map(leaf, global_params, client_params)


def _one_round(local_update, aggregate, params, server_state, data, r, base_key, probs, obj_w):
    """Participation, local update, aggregation: one round as one program (the new global params and server state
    replicated on the local update's mesh when it shards the clients, as ``place_params`` put the first ones)."""
    k_part, k_train = jax.random.split(jax.random.fold_in(base_key, r))
    part = jax.random.uniform(k_part, probs.shape) < probs
    clients = _keep_participants(params, local_update(params, data, k_train), part)
    if isinstance(aggregate, ServerRule):
        params, server_state = aggregate.update(params, clients, server_state, participated=part, weights=obj_w)
    else:
        params = aggregate(params, clients, weights=part.astype(jnp.float32) * obj_w)
    mesh = local_update.mesh_for(probs.shape[0]) if hasattr(local_update, "mesh_for") else None
    if mesh is not None:
        params, server_state = jax.lax.with_sharding_constraint((params, server_state), NamedSharding(mesh, P()))
    return params, server_state, jnp.sum(part.astype(jnp.int32))


@functools.lru_cache(maxsize=32)
def _round_fn(local_update, aggregate, jit_round: bool):
    """The round program of one (local_update, aggregate) pair, jitted once and reused by every run_federated call
    with the same two objects (e.g. several seeds or participation settings)."""
    fn = functools.partial(_one_round, local_update, aggregate)
    return jax.jit(fn) if jit_round else fn


def _metrics(value: Any) -> dict:
    if isinstance(value, dict):
        return {k: float(v) for k, v in value.items()}
    return {"eval": float(value)}


def run_federated(params: PyTree, data: ClientData, local_update: Callable, aggregate: Callable | ServerRule, *,
                  rounds: int, seed: int, participation: Any = None, eval_fn: Callable | None = None,
                  progress: bool | None = None, weighting: str = "counts", eval_every: int = 1,
                  jit_round: bool = True) -> FederatedResult:
    """Simulate ``rounds`` rounds of federated training from the global model ``params`` (module docstring).

    ``local_update(global_params, data, key) -> client_params`` (:func:`make_local_update`, or any function of that
    form); ``aggregate``: a rule ``(global, clients, weights=...) -> global`` with its hyper-parameters bound
    (``functools.partial``), or a :class:`ServerRule`. ``participation``: None (every client, every round) or
    ``[C]`` probabilities in [0, 1], each client joining each round independently (Bernoulli) — the rule is not
    told them. ``weighting``: ``"counts"`` (weights ``1[i ∈ S_t] · n_i``, FedAvg's) or ``"uniform"``
    (``1[i ∈ S_t]``); a :class:`ServerRule` gets the participation mask and the unmasked ``n_i`` (or ones).
    ``eval_fn(params) -> {name: scalar}`` (or a scalar, recorded as ``eval``) runs every ``eval_every`` rounds and
    after the last. ``progress``: a tqdm bar (:mod:`jaxmodels.progress`; ``WEIGHTLAB_NO_PROGRESS=1`` hides it).
    Deterministic under ``seed`` (participation and local training keys come from ``jax.random.PRNGKey(seed)``
    folded with the round). Bad input raises ``ValueError`` before any work. A round (participation draw, local
    update, aggregation) is one jitted program (``jit_round=False``: op by op), compiled once per
    ``(local_update, aggregate)`` pair and data shapes: reuse the same two objects across runs (seeds, participation
    settings) to reuse it. ``local_update`` and ``aggregate`` must then be jittable (every rule here is).
    """
    method = "run_federated"
    n = check_client_data(data, method)
    rounds = _check_positive_int(rounds, "rounds", method)
    eval_every = _check_positive_int(eval_every, "eval_every", method)
    if weighting not in ("counts", "uniform"):
        raise ValueError(f"{method}: weighting must be 'counts' or 'uniform', got {weighting!r}")
    stateful = isinstance(aggregate, ServerRule)
    if not (stateful or callable(aggregate)) or not callable(local_update):
        raise TypeError(f"{method}: `local_update` and `aggregate` must be callables (or a ServerRule)")
    probs = None
    if participation is not None:
        probs = np.asarray(participation, np.float64)
        if probs.shape != (n,):
            raise ValueError(f"{method}: `participation` has shape {probs.shape}; the data has {n} clients")
        if not np.all(np.isfinite(probs)) or np.any(probs < 0) or np.any(probs > 1):
            raise ValueError(f"{method}: participation probabilities must be in [0, 1], got {probs}")
    counts_np = _check_loop_inputs(params, "params", data, seed, eval_fn, method)

    place = getattr(local_update, "place", None)
    data = place(data) if place is not None else ClientData(*(jnp.asarray(a) for a in data))
    obj_w = jnp.asarray(counts_np if weighting == "counts" else np.ones(n), jnp.float32)
    base_key = jax.random.PRNGKey(int(seed))
    probs_dev = jnp.asarray(np.ones(n) if probs is None else probs, jnp.float32)  # uniform [0, 1) < 1: everyone
    try:
        step = _round_fn(local_update, aggregate, jit_round)
    except TypeError:  # an unhashable callable: compile for this run only
        step = _round_fn.__wrapped__(local_update, aggregate, jit_round)
    server_state = aggregate.init(params, n) if stateful else None
    place_params = getattr(local_update, "place_params", None)
    if place_params is not None:
        params, server_state = place_params((params, server_state), n)
    history: list[dict] = []
    bar = progress_bar(range(1, rounds + 1), progress, desc="federated rounds", total=rounds)
    for r in bar:
        params, server_state, k = step(params, server_state, data, jnp.asarray(r, jnp.int32), base_key, probs_dev,
                                       obj_w)
        params = jax.block_until_ready(params)  # one collective program in flight on CPU meshes
        row = {"round": r, "participants": k}
        if eval_fn is not None and (r % eval_every == 0 or r == rounds):
            row.update(_metrics(jax.device_get(eval_fn(params))))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({name: v for name, v in row.items() if name not in ("round", "participants")})
        history.append(row)
    for row in history:  # one transfer at the end, not one per round
        row["participants"] = int(row["participants"])
    return FederatedResult(params, history)


def _gossip_round(local_update, gossip_kw, clients, data, mixing, r, base_key):
    """Local training from every node's own model, then one gossip step: one round as one program (the nodes'
    models stay sharded over the local update's mesh when it shards the clients)."""
    clients = local_update(clients, data, jax.random.fold_in(base_key, r), stacked=True)
    clients = gossip_step(clients, mixing, check_finite=False, **dict(gossip_kw))
    n = mixing.shape[0]
    mesh = local_update.mesh_for(n) if hasattr(local_update, "mesh_for") else None
    if mesh is None:
        return clients
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, client_sharding(mesh, n, a.ndim)), clients)


@functools.lru_cache(maxsize=32)
def _gossip_fn(local_update, gossip_kw, jit_round: bool):
    fn = functools.partial(_gossip_round, local_update, gossip_kw)
    return jax.jit(fn) if jit_round else fn


def run_gossip(client_params: PyTree, data: ClientData, local_update: Callable, mixing: Any, *, rounds: int,
               seed: int, variance_correction: bool = False, target: str = "others", eps: float = 1e-4,
               exclude: Any = None, eval_fn: Callable | None = None, progress: bool | None = None,
               eval_every: int = 1, jit_round: bool = True) -> FederatedResult:
    """Simulate ``rounds`` rounds of gossip learning (module docstring): every node ``i`` trains its own model
    θ_i on its data ``D_i`` (``local_update(θ, data, key, stacked=True)``, :func:`make_local_update`), then mixes
    with its neighbours through the row-stochastic ``mixing`` matrix W, optionally followed by the variance
    correction of Tian et al. (``variance_correction`` / ``target`` / ``eps`` / ``exclude`` of
    :func:`~merging.federated.gossip.gossip_step`)::

        θ_i ← Σ_j W_ij θ_j,      then, per layer l with the pre-mixing variances v_j^l (target="others"):
        θ_i^l ← (θ_i^l − mean) · √((t_i^l + ε) / (var(θ_i^l) + ε)) + mean,   t_i^l = Σ_{j≠i} W_ij v_j^l / Σ_{j≠i} W_ij

    The authors' "VC" preset (DFL_torch ``default_config.py``) is ``mixing=neighbor_average(adjacency, 0.5)`` with
    ``variance_correction=True, target="others"``. ``client_params``: the nodes' starting models, client-stacked
    (e.g. independently initialized, the paper's setting; :func:`~merging.federated.clients.stack_clients`), as
    many as the clients of ``data``. ``eval_fn(client_params) -> {name: scalar}`` (or a scalar, recorded as
    ``eval``; it gets the client-stacked tree, e.g. the mean test accuracy over nodes) runs every ``eval_every``
    rounds and after the last. Returns a :class:`FederatedResult` whose ``params`` are the final client-stacked
    models and whose ``history`` has one dict per round (``round`` and the metrics). Deterministic under ``seed``
    (round ``r`` trains with ``fold_in(PRNGKey(seed), r)``). Bad input raises before any work. A round is one
    jitted program (``jit_round=False``: op by op), compiled once per ``local_update`` and gossip options (W is
    an argument: any mixing matrix reuses it); with a sharding ``local_update`` the nodes stay sharded over the
    mesh's data axis for the whole run.
    """
    method = "run_gossip"
    n = check_client_data(data, method)
    rounds = _check_positive_int(rounds, "rounds", method)
    eval_every = _check_positive_int(eval_every, "eval_every", method)
    if not callable(local_update):
        raise TypeError(f"{method}: `local_update` must be callable, got {type(local_update).__name__}")
    if not isinstance(variance_correction, (bool, np.bool_)):
        raise TypeError(f"{method}: `variance_correction` must be a bool, got {variance_correction!r}")
    if target not in TARGETS:
        raise ValueError(f"{method}: `target` must be one of {TARGETS}, got {target!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.number)) or not 0 <= eps < np.inf:
        raise ValueError(f"{method}: `eps` must be a finite number >= 0, got {eps!r}")
    exclude = exclude if exclude is None or isinstance(exclude, str) else tuple(exclude)  # hashable: a static arg
    if num_clients(client_params) != n:
        raise ValueError(f"{method}: client_params hold {num_clients(client_params)} nodes; the data has {n} clients")
    if np.shape(mixing) != (n, n):
        raise ValueError(f"{method}: `mixing` must have shape ({n}, {n}) for {n} nodes, got {np.shape(mixing)}")
    check_mixing_matrix(mixing, doubly_stochastic=False, method=method)
    _check_loop_inputs(client_params, "client_params", data, seed, eval_fn, method)

    place = getattr(local_update, "place", None)
    data = place(data) if place is not None else ClientData(*(jnp.asarray(a) for a in data))
    place_clients = getattr(local_update, "place_clients", None)
    clients = place_clients(client_params) if place_clients is not None else client_params
    w = jnp.asarray(np.asarray(jax.device_get(mixing), np.float32))
    gossip_kw = (("variance_correction", bool(variance_correction)), ("target", target), ("eps", float(eps)),
                 ("exclude", exclude))
    try:
        step = _gossip_fn(local_update, gossip_kw, jit_round)
    except TypeError:  # an unhashable callable: compile for this run only
        step = _gossip_fn.__wrapped__(local_update, gossip_kw, jit_round)
    base_key = jax.random.PRNGKey(int(seed))
    history: list[dict] = []
    bar = progress_bar(range(1, rounds + 1), progress, desc="gossip rounds", total=rounds)
    for r in bar:
        clients = jax.block_until_ready(step(clients, data, w, jnp.asarray(r, jnp.int32), base_key))
        row: dict = {"round": r}
        if eval_fn is not None and (r % eval_every == 0 or r == rounds):
            row.update(_metrics(jax.device_get(eval_fn(clients))))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({name: v for name, v in row.items() if name != "round"})
        history.append(row)
    return FederatedResult(clients, history)


def format_table(history: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".4f") -> str:
    """The history (or any list of dicts) as an aligned text table; ``columns`` default to every key in order of
    first appearance; missing values are blank, floats printed with ``floatfmt``."""
    rows = list(history)
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, (float, np.floating)):
            return "nan" if math.isnan(v) else format(float(v), floatfmt)
        return str(v)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(str(c))] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(s.rjust(w) for s, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line([str(c) for c in columns]), line(["-" * w for w in widths])] + [line(b) for b in body])
