"""FedTiny (Huang, Zhang, Sun, Fang, Yuan & Wu, "Distributed Pruning Towards Tiny Neural Networks in Federated
Learning", ICDCS 2023): a sparse model found and trained by the federation, in two modules.

**Adaptive BatchNorm selection** (coarse pruning). The server holds ``K`` candidate pruned models ``(θ_k, m_k)``
(here: :func:`magnitude_masks` of the initial model under different layer-wise densities of one global budget,
:func:`layer_densities`; the reference reimplementation uses differently seeded initializations). Client ``i``
re-estimates every candidate's BatchNorm statistics on its local data (forward passes only) and sends them; the
server averages them, ``s_k = Σ_i n_i s_ik / Σ_i n_i`` (means and variances alike, as the reference's
``aggregate_BN_params``); each client reports the loss of every candidate under ``s_k`` on its data and the server
keeps the candidate of lowest mean loss::

    k* = argmin_k (1/C) Σ_i L_i(θ_k ⊙ m_k; s_k)

**Progressive pruning** (fine pruning, RigL-style, under the fixed density budget). Every ``ΔT`` rounds until
``T_end`` (pruning step ``s``, round ``t``), one prunable layer ``ℓ`` (the layers in turn) is adjusted: with
``k_t = floor(f(t) · |active_ℓ|)``, ``f(t) = (a / 2)(1 + cos(π t / T_end))`` (the reference's ``f_decay``),
client ``i`` computes the gradient ``g_i`` of its local loss at the global sparse weights ``w = θ ⊙ m`` and sends
only its ``K`` largest ``|g_i|`` among the layer's pruned positions (``K = k_t`` unless given); the server
averages them, ``G = Σ_i n_i topK(g_i) / Σ_i n_i``, then::

    prune:  the k_t active weights of smallest |w_ℓ|                  (m ← 0)
    regrow: the k_t positions of largest |G| among the now-inactive    (m ← 1, weight ← 0)

so every layer keeps its number of weights (the budget) while its pattern moves to where the federation's data
wants capacity. Between the steps the clients train the sparse model (``w = θ ⊙ m``; FedAvg of the weights, the
masks are the server's).

Sources: the abstract (see ``/work/shared/papers``) and the FedPruning reimplementation
(github.com/kaminoteto/FedPruning_up, ``api/distributed/fedtiny``, ``api/pruning/init_scheme.py``:
``sparse_update_step``, ``f_decay``, ``get_topk_gradients``, the ABNS handlers). Not sourced, chosen here: the
candidate pool (layer-wise densities, EagleEye-style), the layer order (the prunable leaves in tree order,
cyclically), gradients on each client's full local data at the freshly aggregated model, and exact (not
running-average) BN statistics.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.selection import top_k_mask
from jaxmodels.tree import flatten, map_with_path, unflatten
from merging.federated.fedavg import weighted_client_mean
from merging.federated.fedwon import bn_statistics
from merging.federated.harness import check_client_data, make_local_update
from merging.federated.partitions import ClientData
from merging.sparsify import num_kept

PyTree = Any

__all__ = ["BNSelection", "FedTinyResult", "PRUNABLE", "prunable_paths", "magnitude_masks", "layer_densities",
           "apply_masks", "masked_bn_statistics", "client_bn_statistics", "aggregate_bn_statistics",
           "adaptive_bn_selection", "decay_fraction", "client_topk", "prune_and_regrow", "run_fedtiny"]

#: The default prunable leaves: kernels (weight matrices / conv filters), never biases or BatchNorm parameters.
PRUNABLE = r"kernel$"


class BNSelection(NamedTuple):
    """:func:`adaptive_bn_selection`'s result: ``index`` k* of the chosen candidate, ``losses`` [K] (the mean
    client loss of each candidate), ``client_losses`` [K, C], and ``batch_stats`` (the chosen candidate's
    aggregated BN statistics)."""
    index: int
    losses: np.ndarray
    client_losses: np.ndarray
    batch_stats: PyTree


class FedTinyResult(NamedTuple):
    """:func:`run_fedtiny`'s result: the final sparse ``params`` (``θ ⊙ m``), the boolean ``masks``, the
    ``history`` (one dict per round: ``round``, ``pruned`` (k_t, 0 when no step), ``layer``, and ``eval_fn``'s
    metrics) and ``densities`` (the kept fraction of each prunable leaf, which the steps leave unchanged)."""
    params: PyTree
    masks: PyTree
    history: list
    densities: dict


def prunable_paths(params: PyTree, prunable: str = PRUNABLE) -> list[str]:
    """The leaf paths matching ``prunable`` (``re.search``) that have at least 2 dimensions, in tree order."""
    pat = re.compile(prunable)
    out = [p for p, v in flatten(params).items() if pat.search(p) and np.ndim(v) >= 2]
    if not out:
        raise ValueError(f"prunable_paths: no leaf of at least 2 dimensions matches prunable={prunable!r}")
    return out


def _check_density(density: Any, name: str, method: str) -> float:
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"{method}: `{name}` must be a number in (0, 1], got {density!r}") from None
    if not (math.isfinite(d) and 0.0 < d <= 1.0):
        raise ValueError(f"{method}: `{name}` must be in (0, 1], got {density!r}")
    return d


def magnitude_masks(params: PyTree, density: float, *, prunable: str = PRUNABLE,
                    layer_density: dict | None = None) -> PyTree:
    """Boolean masks of ``params``' shape: every prunable leaf keeps its ``max(1, floor(d · n))`` largest ``|θ|``
    (ties: lowest index, as :func:`merging.sparsify.magnitude_mask`), with ``d = layer_density[path]`` when given
    (a dict over :func:`prunable_paths`) else ``density`` (uniform layer-wise, the reference's
    ``uniform_magnitude``); other leaves all True. Pruning at initialization when ``params`` is the initial model.

    >>> masks = magnitude_masks(params0, 0.1)
    """
    method = "magnitude_masks"
    d0 = _check_density(density, "density", method)
    paths = set(prunable_paths(params, prunable))
    dens = {p: d0 for p in paths}
    if layer_density is not None:
        if set(layer_density) != paths:
            raise ValueError(f"{method}: layer_density must have one entry per prunable leaf {sorted(paths)}, got "
                             f"{sorted(layer_density)}")
        dens = {p: _check_density(v, f"layer_density[{p!r}]", method) for p, v in layer_density.items()}
    return map_with_path(lambda p, v: _magnitude_leaf(jnp.asarray(v), jnp.int32(num_kept(dens[p], np.size(v))))
                         if p in paths else jnp.ones(np.shape(v), bool), params)


@jax.jit
def _magnitude_leaf(v, k):
    """The ``k`` largest ``|v|`` (lowest-index ties first), ``k`` traced: one program per leaf shape."""
    return top_k_mask(jnp.abs(v.astype(jnp.float32)), k)


def layer_densities(params: PyTree, density: float, n: int, *, seed: int, spread: float = 0.5,
                    prunable: str = PRUNABLE) -> list[dict]:
    """``n`` layer-wise density allocations ``{path: d_ℓ}`` of one global budget ``Σ_ℓ d_ℓ n_ℓ = density Σ_ℓ n_ℓ``
    (the prunable leaves): the first uniform (``d_ℓ = density``), the others random (EagleEye-style: ``d_ℓ ∝
    u_ℓ``, ``u_ℓ ~ U(1 - spread, 1 + spread)``, rescaled by bisection to the budget and clipped to
    ``[1/n_ℓ, 1]``). The candidate pool of :func:`adaptive_bn_selection` (with :func:`magnitude_masks`).

    >>> pool = [magnitude_masks(params0, 0.1, layer_density=ld) for ld in layer_densities(params0, 0.1, 4, seed=0)]
    """
    method = "layer_densities"
    d0 = _check_density(density, "density", method)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{method}: n must be a positive integer, got {n!r}")
    if not (math.isfinite(float(spread)) and 0.0 <= float(spread) < 1.0):
        raise ValueError(f"{method}: spread must be in [0, 1), got {spread!r}")
    flat = flatten(params)
    paths = prunable_paths(params, prunable)
    sizes = np.array([np.size(flat[p]) for p in paths], np.float64)
    budget = d0 * sizes.sum()
    rng = np.random.default_rng(seed)
    out = [{p: d0 for p in paths}]
    for _ in range(int(n) - 1):
        u = rng.uniform(1.0 - spread, 1.0 + spread, len(paths))
        lo, hi = 0.0, 1.0 / u.min()
        for _ in range(60):  # bisection on the scale c of d = clip(c u, 1/n_l, 1)
            c = 0.5 * (lo + hi)
            lo, hi = (c, hi) if (np.clip(c * u, 1 / sizes, 1) * sizes).sum() < budget else (lo, c)
        out.append({p: float(v) for p, v in zip(paths, np.clip(hi * u, 1 / sizes, 1))})
    return out


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``θ ⊙ m`` leaf by leaf (each leaf in its own dtype)."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.result_type(p))), params, masks)


def masked_bn_statistics(model: nn.Module, params: PyTree, x: jax.Array, mask: jax.Array | None = None) -> PyTree:
    """The ``batch_stats``-shaped tree of the statistics every ``nn.BatchNorm`` of ``model`` sees on the examples
    of ``x [N, ...]`` where ``mask [N]`` is True (all when None): per feature the mean and the biased variance
    (float32) over those examples (and the other non-feature axes), from one train-mode pass of ``model.apply``
    (as :func:`merging.federated.fedwon.bn_statistics`, with padding excluded). Jittable, vmappable over clients.

    >>> stats = masked_bn_statistics(model, params, data.x[0], data.mask[0])
    """
    w = jnp.ones((x.shape[0],), jnp.float32) if mask is None else mask
    try:
        return bn_statistics(model, params, x, example_mask=w)
    except ValueError as e:
        raise ValueError(f"masked_bn_statistics: {e}") from None


def client_bn_statistics(model: nn.Module, params: PyTree, data: ClientData) -> PyTree:
    """Every client's :func:`masked_bn_statistics` of ``params`` on its own real examples, client-stacked
    (leaves ``[C, features]``): what the clients of adaptive BN selection send."""
    check_client_data(data, "client_bn_statistics")
    return jax.vmap(lambda x, m: masked_bn_statistics(model, params, x, m))(jnp.asarray(data.x),
                                                                            jnp.asarray(data.mask))


def aggregate_bn_statistics(stats: PyTree, counts: Any) -> PyTree:
    """The server's ``s = Σ_i n_i s_i / Σ_i n_i`` over the client axis of client-stacked statistics (means and
    variances alike, as the reference's ``aggregate_BN_params``). ``counts [C]`` non-negative, not all 0."""
    c = np.asarray(counts, np.float64)
    if c.ndim != 1 or not np.all(np.isfinite(c)) or np.any(c < 0) or c.sum() <= 0:
        raise ValueError(f"aggregate_bn_statistics: counts must be [C] non-negative with a positive sum, got {counts}")
    w = jnp.asarray(c / c.sum(), jnp.float32)
    return jax.tree.map(lambda s: jnp.tensordot(w, s.astype(jnp.float32), 1), stats)


def _masked_mean_xent(logits, y, mask):
    per = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    m = mask.astype(jnp.float32)
    return jnp.sum(per * m) / jnp.maximum(jnp.sum(m), 1.0)


@functools.lru_cache(maxsize=16)
def _selection_program(model):
    @jax.jit
    def score(params, m, x, y, mask, w):
        p = apply_masks(params, m)
        per_client = jax.vmap(lambda xi, mi: masked_bn_statistics(model, p, xi, mi))(x, mask)
        stats = jax.tree.map(lambda s: jnp.tensordot(w, s, 1), per_client)
        losses = jax.vmap(lambda xi, yi, mi: _masked_mean_xent(
            model.apply({"params": p, "batch_stats": stats}, xi), yi, mi))(x, y, mask)
        return losses, stats

    return score


def adaptive_bn_selection(model: nn.Module, candidates: Sequence[PyTree], masks: Sequence[PyTree],
                          data: ClientData) -> BNSelection:
    """FedTiny's adaptive BN selection (module docstring) among the candidates ``(candidates[k], masks[k])``: the
    clients' BN statistics of every sparse candidate ``θ_k ⊙ m_k`` on their own data, averaged by the server
    with the example counts, then each client's mean cross-entropy on its data under those statistics
    (``model.apply({"params", "batch_stats"}, x)`` in inference mode), the server's plain mean over clients, and
    ``k* = argmin``. ``model``: a flax module with BatchNorm taking ``train=True`` for the train-mode pass.
    Returns :class:`BNSelection`. One jitted program per candidate shape (vmapped over the clients).

    >>> sel = adaptive_bn_selection(model, [params0] * 4, pool, data)
    >>> params, masks = apply_masks(params0, pool[sel.index]), pool[sel.index]
    """
    method = "adaptive_bn_selection"
    n = check_client_data(data, method)
    if not isinstance(candidates, (list, tuple)) or not isinstance(masks, (list, tuple)) or not candidates \
            or len(candidates) != len(masks):
        raise ValueError(f"{method}: `candidates` and `masks` must be non-empty lists of the same length")
    for k, (c, m) in enumerate(zip(candidates, masks)):
        if jax.tree.structure(c) != jax.tree.structure(m) or any(
                np.shape(a) != np.shape(b) for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(m))):
            raise ValueError(f"{method}: masks[{k}] does not have the structure and shapes of candidates[{k}]")
    counts = np.asarray(data.counts, np.float64)
    x, y, mask = (jnp.asarray(a) for a in data[:3])
    w = jnp.asarray(counts / counts.sum(), jnp.float32)
    try:
        score = _selection_program(model)
    except TypeError:  # an unhashable module: compile for this call only
        score = _selection_program.__wrapped__(model)
    client_losses, all_stats = [], []
    for c, m in zip(candidates, masks):
        losses, stats = score(c, m, x, y, mask, w)
        client_losses.append(losses)
        all_stats.append(stats)
    cl = np.asarray(jax.device_get(client_losses), np.float32).reshape(len(candidates), n)
    mean = cl.mean(1)
    best = int(np.argmin(mean))
    return BNSelection(best, mean, cl, all_stats[best])


def decay_fraction(t: Any, *, alpha: float, t_end: int) -> float:
    """The reference's ``f_decay``: ``(alpha / 2)(1 + cos(π t / t_end))``, the fraction of a layer's active
    weights swapped at round ``t`` (``alpha`` at t = 0, 0 at t = t_end)."""
    return float(alpha) / 2.0 * (1.0 + math.cos(math.pi * float(t) / float(t_end)))


@jax.jit
def client_topk(grads: jax.Array, inactive: jax.Array, k: jax.Array) -> jax.Array:
    """Each client's upload: its gradient ``grads [C, ...]`` kept on its ``k`` largest ``|g|`` among the
    ``inactive`` (pruned) positions (ties: lowest flat index) and 0 elsewhere (``k``: a traced int, clipped to
    the layer's size)."""
    def one(g):
        score = jnp.where(inactive, jnp.abs(g.astype(jnp.float32)), 0.0)
        return jnp.where(top_k_mask(score, k) & inactive, g, jnp.zeros((), g.dtype))
    return jax.vmap(one)(grads)


def _ranks(key: jax.Array) -> jax.Array:
    order = jnp.argsort(key.reshape(-1), stable=True)
    return jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))


@jax.jit
def prune_and_regrow(weight: jax.Array, mask: jax.Array, grad: jax.Array, k: jax.Array) -> tuple[jax.Array,
                                                                                                    jax.Array]:
    """One progressive-pruning step on one layer (module docstring): drop the ``k`` active entries of smallest
    ``|weight|``, then activate the ``k`` entries of largest ``|grad|`` among the inactive ones (ties: lowest flat
    index, both); regrown weights start at 0, dropped ones are zeroed. Returns ``(new_weight, new_mask)``; the
    number of active entries is unchanged (``0 <= k <= min(active, inactive)`` is the caller's: see
    :func:`run_fedtiny`). Jittable with a traced ``k``."""
    shape = mask.shape
    inf = jnp.float32(jnp.inf)
    drop = mask & (_ranks(jnp.where(mask, jnp.abs(weight.astype(jnp.float32)), inf)).reshape(shape) < k)
    kept = mask & ~drop
    grow = ~kept & (_ranks(jnp.where(kept, inf, -jnp.abs(grad.astype(jnp.float32)))).reshape(shape) < k)
    new_mask = kept | grow
    return jnp.where(kept, weight, jnp.zeros((), weight.dtype)), new_mask


@functools.lru_cache(maxsize=16)
def _programs(apply_fn, tx, local_steps: int, batch_size: int):
    """The jitted round and per-layer client-gradient programs of one (apply_fn, tx, local schedule): reused by
    every run_fedtiny call with the same objects (e.g. the baseline and FedTiny of one experiment)."""
    def masked_apply(tree, x):
        keep = jax.tree.map(lambda m: jax.lax.stop_gradient(m) > 0.5, tree["mask"])
        return apply_fn(apply_masks(tree["params"], keep), x)

    local_update = make_local_update(masked_apply, tx, local_steps=local_steps, batch_size=batch_size)

    @jax.jit
    def one_round(theta, mask_tree, data, w, key):
        tree = {"params": theta, "mask": jax.tree.map(lambda m: m.astype(jnp.float32), mask_tree)}
        clients = local_update(tree, data, key)
        new = apply_masks(weighted_client_mean(theta, clients["params"], w), mask_tree)
        mesh = local_update.mesh_for(w.shape[0])
        return new if mesh is None else jax.lax.with_sharding_constraint(new, NamedSharding(mesh, P()))

    @functools.partial(jax.jit, static_argnames="paths")
    def layer_grads(theta, data, paths):
        """Every client's gradient of its masked mean loss on all its real examples w.r.t. the leaves ``paths`` of
        the sparse weights (dense: the pruned positions included), ``{path: [C, ...]}``: one program for all
        the layers a run adjusts."""
        flat = flatten(theta)

        def loss(leaves, xi, yi, mi):
            return _masked_mean_xent(apply_fn(unflatten({**flat, **leaves}, like=theta), xi), yi, mi)

        return jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0))({p: flat[p] for p in paths}, data.x, data.y,
                                                                 data.mask)

    return one_round, layer_grads, local_update


@jax.jit
def _server_step(weight, mask, grads, w, topk, k):
    """Clients' top-K uploads, their count-weighted mean, and the prune/regrow of one layer: one program per
    layer shape."""
    agg = jnp.tensordot(w / jnp.sum(w), client_topk(grads, ~mask, topk).astype(jnp.float32), 1)
    return prune_and_regrow(weight, mask, agg, k)


def run_fedtiny(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, masks: PyTree,
                data: ClientData, *, tx: optax.GradientTransformation, local_steps: int, batch_size: int,
                rounds: int, seed: int, delta_t: int = 1, t_end: int | None = None, alpha: float = 0.3,
                topk: int | None = None, layers: Sequence[str] | None = None,
                eval_fn: Callable | None = None, eval_every: int = 1) -> FedTinyResult:
    """FedTiny's federated training of a sparse model with progressive pruning (module docstring), from the
    (selected) candidate ``params`` and boolean ``masks`` (:func:`adaptive_bn_selection`, or any masks: with
    ``t_end=0`` this is FedAvg of a fixed sparse model, e.g. the magnitude-pruned-at-init baseline).

    Round ``t`` (1-based): every client trains the sparse model ``θ ⊙ m`` for ``local_steps`` steps of ``tx``
    (:func:`merging.federated.harness.make_local_update` on ``apply_fn(params, x) -> logits``, the train-mode
    forward, with the masks held fixed), the server takes the count-weighted FedAvg of the weights and re-applies
    its masks; then, when ``t % delta_t == 0`` and ``t <= t_end`` (default ``t_end = rounds // 2``), one
    pruning step on the next layer of ``layers`` (default: the prunable leaves of ``masks``, tree order,
    cyclically) with ``k_t = floor(decay_fraction(t) · active)`` (capped by the inactive count): the clients'
    full-data gradients at the new global weights, their top-``topk`` (default ``k_t``) among the pruned
    positions (:func:`client_topk`), the count-weighted mean, :func:`prune_and_regrow`. ``eval_fn(params) ->
    {name: scalar}`` on the sparse global model every ``eval_every`` rounds and after the last. Deterministic
    under ``seed``. Returns :class:`FedTinyResult`.

    >>> res = run_fedtiny(train_apply, params, masks, data, tx=optax.sgd(0.05, momentum=0.9), local_steps=10,
    ...                   batch_size=32, rounds=20, seed=0, delta_t=2, t_end=14)
    """
    method = "run_fedtiny"
    n = check_client_data(data, method)
    for name, v in (("rounds", rounds), ("delta_t", delta_t), ("eval_every", eval_every)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{method}: `{name}` must be a positive integer, got {v!r}")
    t_end = rounds // 2 if t_end is None else t_end
    if isinstance(t_end, bool) or not isinstance(t_end, (int, np.integer)) or t_end < 0:
        raise ValueError(f"{method}: `t_end` must be an integer >= 0, got {t_end!r}")
    if not (math.isfinite(float(alpha)) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"{method}: `alpha` must be in [0, 1], got {alpha!r}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1):
        raise ValueError(f"{method}: `topk` must be a positive integer or None, got {topk!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"{method}: `eval_fn` must be callable, got {type(eval_fn).__name__}")
    fp, fm = flatten(params), flatten(masks)
    if set(fp) != set(fm) or any(np.shape(fp[p]) != np.shape(fm[p]) for p in fp):
        raise ValueError(f"{method}: `masks` must have the paths and shapes of `params`")
    if any(jnp.result_type(m) != jnp.bool_ for m in fm.values()):
        raise ValueError(f"{method}: `masks` must be boolean")
    for p, v in fp.items():
        if not jnp.issubdtype(jnp.result_type(v), jnp.floating):
            raise TypeError(f"{method}: leaf {p!r} of params has non-floating dtype")
        if not np.all(np.isfinite(np.asarray(jax.device_get(v), np.float32))):
            raise ValueError(f"{method}: params hold NaN/Inf at {p!r}")
    layers = [p for p in fm if np.ndim(fm[p]) >= 2 and not bool(np.all(np.asarray(fm[p])))] if layers is None \
        else list(layers)
    for p in layers:
        if p not in fm:
            raise ValueError(f"{method}: layer {p!r} is not a leaf path of params (paths: {sorted(fm)})")
    if t_end > 0 and not layers:
        raise ValueError(f"{method}: no pruned layer to adjust (every mask is all True); pass `layers`")

    try:
        one_round, layer_grads, local_update = _programs(apply_fn, tx, int(local_steps), int(batch_size))
    except TypeError:  # an unhashable apply_fn / tx: compile for this call only
        one_round, layer_grads, local_update = _programs.__wrapped__(apply_fn, tx, int(local_steps), int(batch_size))
    cdata = local_update.place(ClientData(*(np.asarray(a) for a in data)))
    place = lambda tree: local_update.place_params(tree, n)  # noqa: E731  (one placement: one compiled round)
    w = place(jnp.asarray(np.asarray(data.counts, np.float32)))
    grad_paths = tuple(sorted(set(layers)))
    theta = place(apply_masks(params, masks))
    mask_tree = place(jax.tree.map(jnp.asarray, masks))
    base_key = jax.random.PRNGKey(int(seed))
    history, step = [], 0
    for t in range(1, int(rounds) + 1):
        theta = one_round(theta, mask_tree, cdata, w, jax.random.fold_in(base_key, t))
        row = {"round": t, "pruned": 0, "layer": ""}
        if t % delta_t == 0 and t <= t_end:
            path = layers[step % len(layers)]
            step += 1
            m = flatten(mask_tree)[path]
            active = int(np.sum(np.asarray(jax.device_get(m))))
            k = min(int(decay_fraction(t, alpha=alpha, t_end=t_end) * active), m.size - active)
            if k > 0:
                g = layer_grads(theta, cdata, paths=grad_paths)[path]
                new_w, new_m = _server_step(flatten(theta)[path], m, g, w, jnp.int32(topk if topk else k),
                                            jnp.int32(k))
                ft, fmk = flatten(theta), flatten(mask_tree)
                ft[path], fmk[path] = new_w, new_m
                theta, mask_tree = place(unflatten(ft, like=theta)), place(unflatten(fmk, like=mask_tree))
                row.update(pruned=k, layer=path)
        if eval_fn is not None and (t % eval_every == 0 or t == rounds):
            out = jax.device_get(eval_fn(theta))
            row.update({k_: float(v) for k_, v in (out.items() if isinstance(out, dict) else [("eval", out)])})
        history.append(row)
    dens = {p: float(np.mean(np.asarray(v))) for p, v in flatten(mask_tree).items() if p in layers}
    return FedTinyResult(theta, mask_tree, history, dens)
