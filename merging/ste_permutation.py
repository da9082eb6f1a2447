"""Permutation search by a straight-through estimator, and weight matching of three or more models (Ainsworth, Hayase
& Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries", ICLR 2023, Section 3.3 and Appendix
"Merging many models"; analysed by Ito, Yamada & Kumagai, "Analysis of Linear Mode Connectivity via Permutation-Based
Weight Matching", ICLR 2025).

Straight-through estimator (STE) search (:func:`ste_permutation_search`). A proxy ``θ̃`` (initialised at ``θ_A``) is
learned; each step projects it onto the permutations of ``θ_B`` by weight matching (:func:`merging.permutation.
weight_matching`, warm-started from the previous step's permutation) and evaluates the task loss at the point
``t`` (default the midpoint) of the line from ``θ_A`` to the projected model, with the gradient passed straight
through the projection::

    π_k      = argmax_π Σ_ℓ ⟨θ̃_k,ℓ, π(θ_B)_ℓ⟩                         # weight matching of θ_B onto θ̃_k
    θ_ste    = π_k(θ_B) + (θ̃_k − stop_gradient(θ̃_k))                   # forward: π_k(θ_B) exactly; ∂θ_ste/∂θ̃ = I
    L_k      = loss((1 − t) θ_A + t θ_ste, batch_k)
    θ̃_{k+1} = optimizer_update(θ̃_k, ∇_θ̃ L_k)

The permutation returned is the ``π_k`` with the lowest score: ``eval_fn((1 − t) θ_A + t π_k(θ_B))`` when
``eval_fn`` is given (e.g. the full training loss), else the batch loss ``L_k`` (the reference implementation's
rule). The optimizer defaults to the reference's SGD with momentum 0.9 (``learning_rate`` 1e-2).

Matching many models (:func:`merge_many`). ``method="barycenter"`` is Git Re-Basin's MergeMany: models in a random
order, each weight-matched to the mean of the others (warm-started from its current permutation) until a full pass
lowers no distance::

    repeat:  for i in shuffle(1..n):   π_i = argmax_π ⟨mean_{j≠i} π_j(θ_j), π(θ_i)⟩
    merged = (1/n) Σ_i π_i(θ_i)

``method="reference"`` matches every model to ``models[0]`` once (``π_0`` the identity) and averages. Ito et al. find
the data-free weight matching beats STE when three or more models are merged; STE is a two-model method here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.progress import progress_bar
from jaxmodels.tree import flatten
from merging import _common as C
from merging.permutation import (Perm, PermutationSpec, apply_permutation, identity_permutation,
                                 weight_matching)
from merging.result import MergeResult

PyTree = Any

__all__ = ["STEResult", "straight_through", "ste_midpoint_loss", "ste_permutation_search", "compose_permutations",
           "merge_many"]


class STEResult(NamedTuple):
    """What :func:`ste_permutation_search` returns: ``perm`` (the best permutation of B, ``{name: int array}``),
    ``params`` (``apply_permutation(params_b, spec, perm)``), ``losses [steps]`` (the batch loss ``L_k`` of every
    step, for the permutation ``π_k`` used at that step), ``scores [steps]`` (what the best step was chosen by:
    ``eval_fn`` of each step's hard-permuted point, or ``losses``), ``best_step`` (index of the chosen step; 0 is the
    plain weight matching of ``θ_B`` onto ``θ_A``) and ``num_changes`` (how many steps changed the permutation)."""

    perm: Perm
    params: PyTree
    losses: np.ndarray
    scores: np.ndarray
    best_step: int
    num_changes: int


def straight_through(proxy: PyTree, projected: PyTree) -> PyTree:
    """``projected + (proxy − stop_gradient(proxy))``: forward value ``projected`` exactly (``x − x`` is exactly 0
    for finite ``x``), gradient w.r.t. ``proxy`` the gradient at ``projected`` (identity Jacobian), and no gradient
    to ``projected``.

    >>> f = lambda p: jnp.sum(straight_through(p, q)["w"] ** 2)   # value: Σ q², gradient w.r.t. p: 2 q
    """
    return jax.tree.map(lambda x, px: jax.lax.stop_gradient(px) + (x - jax.lax.stop_gradient(x)), proxy, projected)


def ste_midpoint_loss(proxy: PyTree, projected: PyTree, params_a: PyTree, loss_fn: Callable[[PyTree, Any], Any],
                      batch: Any, t: float = 0.5) -> jax.Array:
    """``loss_fn((1 − t) θ_A + t · straight_through(proxy, projected), batch)``: the STE objective of one step
    (its value is the loss at ``(1 − t) θ_A + t π(θ_B)``; its gradient flows to ``proxy`` only). Jit-able.

    >>> g = jax.grad(ste_midpoint_loss)(proxy, permuted_b, params_a, loss_fn, (x, y))
    """
    return loss_fn(_lerp(params_a, straight_through(proxy, projected), t), batch)


def _committed(x: Any) -> jax.Array:
    if isinstance(x, jax.Array) and x.committed:
        return x
    return jax.device_put(x, jax.devices()[0])


def _commit_state(state: PyTree, like: PyTree) -> PyTree:
    """Place the uncommitted leaves of an optimizer state (counters: constants, not derived from the parameters)
    replicated on the parameters' devices, so that the first step sees the placement every later step sees."""
    ref = jax.tree.leaves(like)[0].sharding
    if isinstance(ref, jax.sharding.NamedSharding):
        target = jax.sharding.NamedSharding(ref.mesh, jax.sharding.PartitionSpec())
    elif isinstance(ref, jax.sharding.SingleDeviceSharding):
        target = ref
    else:  # another sharding type: leave the placement to JAX (at worst one more compilation)
        return state
    return jax.tree.map(lambda x: jax.device_put(x, target) if isinstance(x, jax.Array) and not x.committed else x,
                        state)


def _lerp(a: PyTree, b: PyTree, t) -> PyTree:
    """``(1 − t) a + t b`` in float32, each leaf back in ``a``'s dtype."""
    return jax.tree.map(lambda u, v: ((1 - t) * u.astype(jnp.float32) + t * v.astype(jnp.float32)).astype(u.dtype),
                        a, b)


@jax.jit
def _mean(trees: list) -> PyTree:
    """The uniform mean of a list of trees in float32, each leaf in the first tree's dtype (one program per count)."""
    return jax.tree.map(lambda *v: (sum(x.astype(jnp.float32) for x in v) / len(v)).astype(v[0].dtype), *trees)


def _check_common(name: str, params_a: PyTree, params_b: PyTree, spec: PermutationSpec) -> None:
    if not isinstance(spec, PermutationSpec) or isinstance(params_a, PermutationSpec) or isinstance(
            params_b, PermutationSpec):
        raise TypeError(f"{name}: arguments are (params_a, params_b, spec, ...) (trees first, then the "
                        "PermutationSpec)")
    C.validate_trees(None, [params_a, params_b], name)
    C.check_leaf_dtypes(None, [params_a, params_b], name)
    identity_permutation(params_a, spec)  # the spec names leaves of the tree with consistent sizes


def ste_permutation_search(params_a: PyTree, params_b: PyTree, spec: PermutationSpec,
                           loss_fn: Callable[[PyTree, Any], Any], batches: Iterable, *, steps: int = 100,
                           learning_rate: float = 1e-2, optimizer: optax.GradientTransformation | None = None,
                           t: float = 0.5, eval_fn: Callable[[PyTree], Any] | None = None, wm_max_iter: int = 100,
                           seed: int = 0, progress: bool | None = None) -> STEResult:
    """Git Re-Basin's straight-through-estimator permutation search of ``params_b`` onto ``params_a`` (module
    docstring): ``steps`` optimizer steps on a proxy ``θ̃`` (initialised at ``θ_A``), one batch each (``batches`` is
    cycled), each projected onto ``θ_B``'s permutations by weight matching.

    ``loss_fn(params, batch)`` is the scalar task loss (jit-able); ``optimizer`` defaults to
    ``optax.sgd(learning_rate, momentum=0.9)``; ``t`` in (0, 1) is the point of the line the loss is taken at;
    ``eval_fn(params)`` (optional) scores each step's hard-permuted point to pick the returned permutation (default:
    the batch loss). Weight matching runs on the host in float64 (``wm_max_iter`` sweeps at most, ``seed`` its
    order); the loss and optimizer step are one jitted program, sharded inputs stay sharded.

    >>> loss_fn = lambda p, b: softmax_cross_entropy(model.apply({"params": p}, b[0]), b[1])
    >>> res = ste_permutation_search(params_a, params_b, mlp_permutation_spec(2), loss_fn, [(x, y)], steps=50)
    >>> barrier = loss_barrier(eval_fn, params_a, res.params)
    """
    name = "ste_permutation_search"
    _check_common(name, params_a, params_b, spec)
    if not callable(loss_fn):
        raise TypeError(f"{name}: loss_fn must be callable loss_fn(params, batch), got {type(loss_fn).__name__}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"{name}: eval_fn must be None or callable eval_fn(params), got {type(eval_fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"{name}: steps must be an integer >= 1, got {steps!r}")
    if isinstance(wm_max_iter, bool) or not isinstance(wm_max_iter, (int, np.integer)) or wm_max_iter < 1:
        raise ValueError(f"{name}: wm_max_iter must be an integer >= 1, got {wm_max_iter!r}")
    t = float(t)
    if not (0.0 < t < 1.0):
        raise ValueError(f"{name}: t must be in (0, 1), got {t}")
    if optimizer is None:
        lr = float(learning_rate)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{name}: learning_rate must be finite and > 0, got {learning_rate}")
        optimizer = optax.sgd(lr, momentum=0.9)
    batch_iter = C.cycle_batches(batches, name)

    def permute(params_b, perm):
        return apply_permutation(params_b, spec, perm)

    def step(proxy, opt_state, params_b, perm, params_a, batch):
        projected = permute(params_b, perm)  # the hard-permuted B of this step's weight matching
        loss, grads = jax.value_and_grad(ste_midpoint_loss)(proxy, projected, params_a, loss_fn, batch, t)
        updates, opt_state = optimizer.update(grads, opt_state, proxy)
        return optax.apply_updates(proxy, updates), opt_state, loss

    @jax.jit
    def point(params_b, perm, params_a):
        return _lerp(params_a, permute(params_b, perm), t)

    # committed device arrays (jax arrays are immutable: the inputs are never modified), so that every step's
    # inputs are placed as the first one's and `step` compiles once, sharded or not
    dev_a, dev_b = jax.tree.map(_committed, params_a), jax.tree.map(_committed, params_b)
    proxy = dev_a
    opt_state = _commit_state(optimizer.init(proxy), proxy)
    step = jax.jit(step)
    perm = None
    losses, scores, perms = [], [], []
    changes = 0
    for k in progress_bar(range(int(steps)), progress, desc="STE permutation search", leave=False):
        batch = next(batch_iter)  # an empty `batches` raises here, before any matching
        new = weight_matching(proxy, params_b, spec, max_iter=int(wm_max_iter), init_perm=perm, seed=seed + k,
                              progress=False)
        if perm is not None and any(not np.array_equal(new[p], perm[p]) for p in new):
            changes += 1
        perm = new
        proxy, opt_state, loss = step(proxy, opt_state, dev_b, perm, dev_a, batch)
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"{name}: the loss is not finite ({loss}) at step {k}; lower the learning rate")
        losses.append(loss)
        scores.append(loss if eval_fn is None else float(eval_fn(point(dev_b, perm, dev_a))))
        perms.append(perm)
    best = int(np.argmin(scores))
    best_perm = {p: np.asarray(v) for p, v in perms[best].items()}
    return STEResult(best_perm, jax.jit(permute)(dev_b, best_perm), np.asarray(losses),
                     np.asarray(scores), best, changes)


def compose_permutations(first: Perm, second: Perm) -> Perm:
    """The permutation that applies ``first`` and then ``second``: ``apply_permutation(apply_permutation(θ, spec,
    first), spec, second) == apply_permutation(θ, spec, compose_permutations(first, second))``, i.e.
    ``first[second]`` per name.

    >>> both = compose_permutations(p1, p2)
    """
    if set(first) != set(second):
        raise ValueError(f"compose_permutations: names differ: {sorted(first)} vs {sorted(second)}")
    out = {}
    for p in first:
        a, b = np.asarray(first[p]), np.asarray(second[p])
        if a.shape != b.shape:
            raise ValueError(f"compose_permutations: {p!r} has shapes {a.shape} and {b.shape}")
        out[p] = a[b]
    return out


@jax.jit
def _sq_dist(fx: dict, fy: dict) -> jax.Array:
    return sum(jnp.sum(jnp.square(fx[k].astype(jnp.float32) - fy[k].astype(jnp.float32))) for k in fx)


def _sq_distance(x: PyTree, y: PyTree, paths: Sequence[str]) -> float:
    fx, fy = flatten(x), flatten(y)
    return float(_sq_dist({k: fx[k] for k in paths}, {k: fy[k] for k in paths}))


def merge_many(base: PyTree | None, models: Sequence[PyTree], spec: PermutationSpec, *,
               method: str = "barycenter", max_iter: int = 100, wm_max_iter: int = 100, seed: int = 0,
               check_finite: bool = True, progress: bool | None = None) -> MergeResult:
    """Align ``models`` (two or more) to each other by weight matching and average them (module docstring).
    ``base`` is accepted and ignored (pass None). ``method``: ``"barycenter"`` (MergeMany: each model matched to
    the mean of the others, repeated until no distance drops or ``max_iter`` passes) or ``"reference"`` (every
    model matched to ``models[0]``).

    Returns :class:`merging.result.MergeResult`: ``params`` the uniform average of the aligned models; ``info``:
    ``perms`` (one ``{name: int array}`` per model, ``apply_permutation(models[i], spec, perms[i])`` is
    ``aligned[i]``), ``aligned`` (the permuted models), ``iterations`` (passes run) and ``distances`` (after each
    pass, ``Σ_i ‖π_i(θ_i) − mean_{j≠i} π_j(θ_j)‖²`` over the leaves of ``spec``; non-increasing for the barycenter).

    >>> res = merge_many(None, [p0, p1, p2], mlp_permutation_spec(2))
    >>> merged, perms = res.params, res.info["perms"]
    """
    name = "merge_many"
    del base  # the models are aligned to each other, not to a pre-trained base
    models = C.as_models(models, 2, name)
    C.validate_trees(None, models, name, check_finite=check_finite)
    C.check_leaf_dtypes(None, models, name)
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"{name}: arguments are (base, models, spec) with a PermutationSpec, got "
                        f"{type(spec).__name__}")
    if method not in ("barycenter", "reference"):
        raise ValueError(f"{name}: method must be 'barycenter' or 'reference', got {method!r}")
    for v, what in ((max_iter, "max_iter"), (wm_max_iter, "wm_max_iter")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: {what} must be an integer >= 1, got {v!r}")
    ident = identity_permutation(models[0], spec)
    paths = list(spec.axes_to_perm)
    n = len(models)
    perms = [dict(ident) for _ in range(n)]

    @jax.jit
    def permute(params, perm):
        return apply_permutation(params, spec, perm)

    aligned = [permute(m, ident) for m in models]  # device arrays, all placed by the same program

    def others_mean(i):
        return _mean([aligned[j] for j in range(n) if j != i])

    def total_distance():
        return sum(_sq_distance(aligned[i], others_mean(i), paths) for i in range(n))

    distances = []
    iterations = 0
    if method == "reference":
        for i in range(1, n):
            perms[i] = weight_matching(models[0], models[i], spec, max_iter=wm_max_iter, seed=seed + i,
                                       progress=False)
            aligned[i] = permute(models[i], perms[i])
        iterations = 1
        distances.append(total_distance())
    else:
        rng = np.random.default_rng(seed)
        for it in progress_bar(range(max_iter), progress, desc="merge many", leave=False):
            iterations = it + 1
            improved = False
            for i in rng.permutation(n):
                target = others_mean(i)
                before = _sq_distance(aligned[i], target, paths)
                new = weight_matching(target, models[i], spec, max_iter=wm_max_iter, init_perm=perms[i],
                                      seed=seed + 1000 * it + int(i), progress=False)
                cand = permute(models[i], new)
                after = _sq_distance(cand, target, paths)
                if after < before - 1e-12 * max(1.0, before):
                    improved = True
                    perms[i], aligned[i] = new, cand
            distances.append(total_distance())
            if not improved:
                break
    merged = _mean(aligned)
    return MergeResult(merged, {"perms": perms, "aligned": aligned, "iterations": iterations,
                                "distances": np.asarray(distances)})
