"""Diagonal Fisher information and Fisher merging.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022).

Diagonal Fisher of a classifier ``p_θ(y|x)`` over examples ``x_n``::

    F = 1/N Σ_n E_{y ~ q(y|x_n)} [ (∇_θ log p_θ(y | x_n))² ]

* ``mode="empirical"``: ``y`` is the true label of ``x_n`` (the empirical Fisher).
* ``mode="sampled"``: one ``y ~ p_θ(·|x_n)`` sampled from the model's own predictive distribution per example (an
  unbiased Monte-Carlo estimate of the true Fisher), keyed by an explicit ``jax.random`` key.

Per-example gradients come from ``jax.vmap`` over the batch; for sequence outputs (logits ``[..., T, V]``) the
per-example log-likelihood is the sum over tokens.

Fisher merging::

    θ* = Σ_i λ_i F̂_i θ_i / Σ_i λ_i F̂_i,     F̂_i = max(F_i, ε)

elementwise, with the paper's floor ``ε`` (their code's ``fisher_floor``, default 1e-6) so that parameters no model
is sensitive to fall back to the λ-weighted average instead of 0/0.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.progress import progress_bar
from jaxmodels.sharding import DATA
from jaxmodels.tree import check_compatible, compute_in_float32

PyTree = Any

__all__ = ["diagonal_fisher", "fisher_merge", "log_likelihood"]


def log_likelihood(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Σ over all positions of ``log softmax(logits)[label]`` (one example: logits ``[..., V]``, labels ``[...]``)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1).sum()


def _make_fisher_step(apply_fn, mode, mesh):
    def per_example(params, x, y, key):
        def ll(p):
            logits = apply_fn(p, x[None])[0]
            if mode == "sampled":
                yy = jax.lax.stop_gradient(jax.random.categorical(key, logits.astype(jnp.float32), axis=-1))
            else:
                yy = y
            return log_likelihood(logits, yy)

        g = jax.grad(ll)(params)
        return jax.tree.map(lambda a: jnp.square(a.astype(jnp.float32)), g)

    def step(acc, params, x, y, key):
        if mesh is not None:
            shard = lambda a: jax.lax.with_sharding_constraint(  # noqa: E731
                a, NamedSharding(mesh, P(DATA, *([None] * (a.ndim - 1)))))
            x, y = shard(x), shard(y)
        keys = jax.random.split(key, x.shape[0])
        sq = jax.vmap(per_example, in_axes=(None, 0, 0, 0))(params, x, y, keys)
        return jax.tree.map(lambda a, s: a + s.sum(0), acc, sq)

    return jax.jit(step, donate_argnums=(0,))


def diagonal_fisher(apply_fn: Callable, params: PyTree, batches: Iterable, *, mode: str = "empirical",
                    key: jax.Array | None = None, mesh: Mesh | None = None,
                    progress: bool | None = None) -> PyTree:
    """Diagonal Fisher ``F`` (float32, ``params``' structure) averaged over every example of ``batches``.

    ``apply_fn(params, x) -> logits [B, ..., V]``; ``batches`` yields ``(x, y)`` with integer labels ``y [B, ...]``
    (for ``mode="sampled"`` the labels are ignored and may be any array with leading axis ``B``).
    With ``mesh`` the batch is sharded over ``"data"`` (per-example gradients are independent; the sum over examples
    is all-reduced by XLA).
    """
    if mode not in ("empirical", "sampled"):
        raise ValueError(f"diagonal_fisher: mode must be 'empirical' or 'sampled', got {mode!r}")
    if mode == "sampled" and key is None:
        raise ValueError("diagonal_fisher: mode='sampled' needs an explicit `key` (jax.random.key)")
    key = jax.random.key(0) if key is None else key
    step = _make_fisher_step(apply_fn, mode, mesh)
    acc = jax.tree.map(lambda a: jnp.zeros(np.shape(a), jnp.float32), params)
    if mesh is not None:
        acc = jax.device_put(acc, NamedSharding(mesh, P()))
    n = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    for i, (x, y) in enumerate(progress_bar(batches, progress, desc="fisher", total=total, leave=False)):
        x, y = jnp.asarray(x), jnp.asarray(y)
        acc = step(acc, params, x, y, jax.random.fold_in(key, i))
        n += x.shape[0]
    if n == 0:
        raise ValueError("diagonal_fisher: `batches` is empty")
    return jax.tree.map(lambda a: a / n, acc)


def fisher_merge(models: Sequence[PyTree], fishers: Sequence[PyTree], *, weights: Sequence[float] | None = None,
                 fisher_floor: float = 1e-6) -> PyTree:
    """Fisher-weighted average ``θ* = Σ_i λ_i max(F_i, ε) θ_i / Σ_i λ_i max(F_i, ε)`` (Matena & Raffel, eq. 4).

    ``weights`` λ_i default to 1; ``fisher_floor`` ε > 0. Computes in float32, returns the models' dtype.
    """
    models, fishers = list(models), list(fishers)
    if not models:
        raise ValueError("fisher_merge: needs at least one model")
    if len(fishers) != len(models):
        raise ValueError(f"fisher_merge: {len(fishers)} Fishers for {len(models)} models")
    if not (fisher_floor > 0 and np.isfinite(fisher_floor)):
        raise ValueError(f"fisher_merge: fisher_floor must be a positive finite number, got {fisher_floor}")
    lam = np.ones(len(models)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if lam.shape[0] != len(models) or np.any(lam < 0) or lam.sum() <= 0 or not np.all(np.isfinite(lam)):
        raise ValueError(f"fisher_merge: weights must be {len(models)} non-negative numbers with positive sum")
    names = [f"model_{i}" for i in range(len(models))]
    check_compatible(*models, names=names)
    for i, f in enumerate(fishers):
        check_compatible(models[0], f, names=["model_0", f"fisher_{i}"], check_dtype=False)
    lam = jnp.asarray(lam, jnp.float32)

    @jax.jit
    @compute_in_float32
    def merge(ms, fs):
        def leaf(*args):
            th = jnp.stack(args[: len(ms)]).astype(jnp.float32)
            f = jnp.maximum(jnp.stack(args[len(ms):]).astype(jnp.float32), fisher_floor)
            w = lam.reshape((-1,) + (1,) * (th.ndim - 1)) * f
            return (w * th).sum(0) / w.sum(0)

        return jax.tree.map(leaf, *ms, *fs)

    return merge(models, fishers)
