"""Twin-Merging (Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging",
NeurIPS 2024).

1. Shared knowledge: a merged model ``θ_s`` (default: task arithmetic with weight ``1/K``, i.e. the average of the
   fine-tuned models; any merged pytree can be passed).
2. Exclusive knowledge: ``δ_k = θ_k − θ_s``, compressed per weight matrix by truncated SVD,
   ``δ_k ≈ U_r S_r V_rᵀ`` (rank ``r``; conv kernels as ``[kh·kw·c_in, c_out]`` matrices; vectors kept dense).
3. A small router (an MLP, trained with Adam on labeled *task identities* of a few validation batches) maps the shared
   model's features of an input (the input of its last linear layer) to ``w(x) = softmax(router(h_s(x)))``; at
   inference each example runs with its own merged weights::

       θ(x) = θ_s + Σ_k w_k(x) δ̂_k

Calling convention (package docstring): ``twin_merging(base, models, apply_fn, router_batches)``; ``base`` is ignored
(the shared model is built from the fine-tuned models). Returns ``MergeResult(params=θ_s, info)`` with
``info["exclusive"]`` (per task: ``{path: (A [d_in, r], B [r, d_out]) low-rank factors | dense array}``),
``info["router"]`` (router params), ``info["num_tasks"]``, ``info["hidden"]`` and ``info["feature_layer"]`` (the
module path whose input is the router's feature); :func:`twin_apply` runs the routed model from it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.capture import capture_inputs, layer_order
from jaxmodels.progress import progress_bar
from jaxmodels.tree import check_compatible, flatten, unflatten
from merging._common import validate_trees
from merging.linear import uniform_soup
from merging.result import MergeResult

PyTree = Any

__all__ = ["Router", "compress_svd", "decompress", "twin_merging", "twin_params", "twin_apply",
           "router_weights"]


class Router(nn.Module):
    """``features -> Dense(hidden) -> relu -> Dense(K)`` logits over tasks."""

    num_tasks: int
    hidden: int = 64

    @nn.compact
    def __call__(self, h):
        h = nn.relu(nn.Dense(self.hidden)(h))
        return nn.Dense(self.num_tasks)(h)


def compress_svd(delta: PyTree, rank: int) -> dict[str, Any]:
    """Per leaf with ≥ 2 dims: ``(U_r S_r, V_rᵀ)`` of ``reshape(leaf, (-1, last))`` (Eckart–Young best rank-r
    approximation); other leaves stay dense. ``rank`` ≥ min(d_in, d_out) keeps the matrix exactly (up to float)."""
    if rank < 1:
        raise ValueError(f"compress_svd: rank must be >= 1, got {rank}")
    out = {}
    for k, v in flatten(delta).items():
        if np.ndim(v) < 2:
            out[k] = v
            continue
        out[k] = _low_rank(jnp.asarray(v, jnp.float32).reshape(-1, v.shape[-1]), rank)
    return out


@functools.partial(jax.jit, static_argnums=1)
def _low_rank(m, rank):
    """``(U_r S_r, V_rᵀ)`` of the matrix ``m`` (one compiled program per shape and rank, not one per op)."""
    U, S, Vt = jnp.linalg.svd(m, full_matrices=False)
    r = min(rank, S.shape[0])
    return U[:, :r] * S[:r], Vt[:r]


def decompress(compressed: dict[str, Any], like: PyTree) -> PyTree:
    """The dense exclusive knowledge ``δ̂_k`` of one task from its compressed form (``info["exclusive"][k]``:
    ``{path: (A [d_in, r], B [r, d_out]) | dense array}``): ``A @ B`` reshaped to the leaf's shape in ``like``, or the
    dense array, as a float32 tree with ``like``'s structure."""
    fl = flatten(like)
    out = {}
    for k, v in fl.items():
        c = compressed[k]
        out[k] = (c[0] @ c[1]).reshape(v.shape).astype(jnp.float32) if isinstance(c, tuple) else \
            jnp.asarray(c, jnp.float32)
    return unflatten(out, like=like)


def twin_params(shared: PyTree, exclusive_dense: Sequence[PyTree], weights: jax.Array) -> PyTree:
    """``θ_s + Σ_k w_k δ̂_k`` for one weight vector ``w [K]``."""
    return jax.tree.map(lambda s, *d: (s.astype(jnp.float32) + sum(w * x for w, x in zip(weights, d))).astype(s.dtype),
                        shared, *exclusive_dense)


def _features(apply_fn, params, x, layer):
    h = capture_inputs(apply_fn, params, x, layer)[0]
    return h.reshape(h.shape[0], -1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _router_weights(apply_fn, num_tasks, hidden, layer, shared, router, x):
    h = _features(apply_fn, shared, x, layer)
    return jax.nn.softmax(Router(num_tasks, hidden).apply({"params": router}, h), -1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _twin_apply(apply_fn, num_tasks, hidden, layer, shared, router, exclusive, x):
    w = _router_weights(apply_fn, num_tasks, hidden, layer, shared, router, x)
    dense = [decompress(e, shared) for e in exclusive]
    return jax.vmap(lambda wb, xb: apply_fn(twin_params(shared, dense, wb), xb[None])[0])(w, x)


def router_weights(apply_fn: Callable, twin: MergeResult, x: jax.Array) -> jax.Array:
    """``softmax(router(h_s(x)))``, ``[B, K]``, for a :func:`twin_merging` result (one jitted program per
    ``apply_fn``, result layout and input shape)."""
    info = twin.info
    return _router_weights(apply_fn, info["num_tasks"], info["hidden"], info["feature_layer"], twin.params,
                           info["router"], x)


def twin_apply(apply_fn: Callable, twin: MergeResult, x: jax.Array) -> jax.Array:
    """Per-example routed inference of a :func:`twin_merging` result: example ``b`` runs with
    ``θ_s + Σ_k w_k(x_b) δ̂_k`` (one jitted program, as :func:`router_weights`)."""
    info = twin.info
    return _twin_apply(apply_fn, info["num_tasks"], info["hidden"], info["feature_layer"], twin.params,
                       info["router"], info["exclusive"], x)


def twin_merging(base: PyTree | None, models: Sequence[PyTree], apply_fn: Callable,
                 router_batches: Sequence[Sequence], *, rank: int = 8, shared: PyTree | None = None,
                 hidden: int = 64, steps: int = 200, learning_rate: float = 1e-2, key: jax.Array | None = None,
                 check_finite: bool = True, progress: bool | None = None) -> MergeResult:
    """Build a Twin-Merging model. ``base`` is ignored. ``router_batches[k]``: input batches of task ``k`` (arrays,
    or ``(x, y)`` tuples whose labels are ignored) used to train the router to recognise task ``k``. ``shared``
    defaults to the uniform average of ``models``. Returns ``MergeResult(θ_s, info)`` (module docstring)."""
    del base  # the shared model is built from the fine-tuned models
    models = list(models)
    K = len(models)
    if K < 1:
        raise ValueError("twin_merging: needs at least one model")
    if len(router_batches) != K:
        raise ValueError(f"twin_merging: {len(router_batches)} router batch sets for {K} models")
    if rank < 1 or steps < 1:
        raise ValueError(f"twin_merging: rank and steps must be >= 1 (got {rank}, {steps})")
    validate_trees(None, models, "twin_merging", check_finite=check_finite)
    if shared is not None:
        check_compatible(models[0], shared, names=["model_0", "shared"])
    else:
        shared = uniform_soup(models, check_finite=False)
    exclusive = [compress_svd(jax.tree.map(lambda m, s: m.astype(jnp.float32) - s.astype(jnp.float32), m, shared),
                              rank) for m in models]
    xs = [[b[0] if isinstance(b, (tuple, list)) else b for b in bs] for bs in router_batches]
    layer = layer_order(apply_fn, shared, xs[0][0])[-1]
    feat = jax.jit(lambda p, x: _features(apply_fn, p, x, layer))
    H = jnp.concatenate([feat(shared, x) for bs in xs for x in bs])
    T = jnp.concatenate([jnp.full((x.shape[0],), k, jnp.int32) for k, bs in enumerate(xs) for x in bs])
    router = Router(K, hidden)
    key = jax.random.key(0) if key is None else key
    rp = jax.jit(router.init)(key, H[:1])["params"]  # one program, not op by op
    tx = optax.adam(learning_rate)
    st = tx.init(rp)

    @jax.jit
    def step(rp, st):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(router.apply({"params": p}, H), T).mean()

        l, g = jax.value_and_grad(loss)(rp)
        u, st = tx.update(g, st, rp)
        return optax.apply_updates(rp, u), st, l

    for _ in progress_bar(range(steps), progress, desc="twin-merging router", leave=False):
        rp, st, _ = step(rp, st)
    return MergeResult(shared, {"exclusive": exclusive, "router": rp, "num_tasks": K, "hidden": hidden,
                                "feature_layer": layer})
