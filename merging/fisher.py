"""Diagonal Fisher information and Fisher merging.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022).

Diagonal Fisher of a classifier ``p_θ(y|x)`` over examples ``x_n``::

    F = 1/N Σ_n E_{y ~ q(y|x_n)} [ (∇_θ log p_θ(y | x_n))² ]

* ``mode="empirical"``: ``y`` is the true label of ``x_n`` (the empirical Fisher).
* ``mode="sampled"``: one ``y ~ p_θ(·|x_n)`` sampled from the model's own predictive distribution per example (an
  unbiased Monte-Carlo estimate of the true Fisher), keyed by an explicit ``jax.random`` key.

Per-example gradients come from ``jax.vmap`` over the batch. For sequence outputs (logits ``[..., T, V]``) the
per-example log-likelihood is the sum over its *real* tokens, ``log p_θ(y|x_n) = Σ_t m_t log p_θ(y_t | x_n)``, with
the mask ``m`` (an attention mask: 1 = real token, 0 = padding) given as the third element of each batch
``(x, y, mask)``; without a mask every position counts. ``N`` counts the examples with at least one real token, so
padding positions and all-padding rows change nothing.

Fisher merging::

    θ* = Σ_i λ_i F̂_i θ_i / Σ_i λ_i F̂_i,     F̂_i = max(F_i, ε)

elementwise, with the paper's floor ``ε`` (their code's ``fisher_floor``, default 1e-6) so that parameters no model
is sensitive to fall back to the λ-weighted average instead of 0/0.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.progress import progress_bar
from jaxmodels.sharding import DATA
from jaxmodels.tree import check_compatible, compute_in_float32
from merging._common import check_all_finite
from merging.result import MergeResult

PyTree = Any

__all__ = ["diagonal_fisher", "fisher_merge", "log_likelihood"]


def log_likelihood(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``Σ_t m_t log softmax(logits)[t, label_t]`` for one example: logits ``[..., V]``, labels ``[...]`` and an
    optional mask ``[...]`` (1 = real token, 0 = padding; None: every position counts)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ll = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if mask is not None:
        ll = jnp.where(jnp.asarray(mask) > 0, ll, 0.0)  # where, not *: a NaN/inf logit at a pad stays out
    return ll.sum()


@functools.lru_cache(maxsize=16)  # one compiled step per (apply_fn, mode, mesh): repeated calls reuse it
def _make_fisher_step(apply_fn, mode, mesh):
    def per_example(params, x, y, m, key):
        def ll(p):
            logits = apply_fn(p, x[None])[0]
            if mode == "sampled":
                yy = jax.lax.stop_gradient(jax.random.categorical(key, logits.astype(jnp.float32), axis=-1))
            else:
                yy = y
            return log_likelihood(logits, yy, m)

        g = jax.grad(ll)(params)
        return jax.tree.map(lambda a: jnp.square(a.astype(jnp.float32)), g)

    def step(acc, params, x, y, m, key):
        if mesh is not None:
            shard = lambda a: jax.lax.with_sharding_constraint(  # noqa: E731
                a, NamedSharding(mesh, P(DATA, *([None] * (a.ndim - 1)))))
            x, y, m = shard(x), shard(y), shard(m)
        keys = jax.random.split(key, x.shape[0])
        sq = jax.vmap(per_example, in_axes=(None, 0, 0, 0, 0))(params, x, y, m, keys)
        return jax.tree.map(lambda a, s: a + s.sum(0), acc, sq)

    return jax.jit(step, donate_argnums=(0,))


def _unpack(batch, i):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(f"diagonal_fisher: batch {i} must be (x, y) or (x, y, mask), got "
                         f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else len(batch)}")
    x, y = jnp.asarray(batch[0]), jnp.asarray(batch[1])
    if len(batch) == 2:
        return x, y, jnp.ones(y.shape, jnp.float32)
    m = jnp.asarray(batch[2])
    if m.shape != y.shape:
        raise ValueError(f"diagonal_fisher: batch {i}: mask shape {m.shape} != labels shape {y.shape} (one entry "
                         "per label position)")
    return x, y, m.astype(jnp.float32)


def diagonal_fisher(apply_fn: Callable, params: PyTree, batches: Iterable, *, mode: str = "empirical",
                    key: jax.Array | None = None, mesh: Mesh | None = None,
                    progress: bool | None = None) -> PyTree:
    """Diagonal Fisher ``F`` (float32, ``params``' structure) averaged over every example of ``batches``.

    ``apply_fn(params, x) -> logits [B, ..., V]``; ``batches`` yields ``(x, y)`` or ``(x, y, mask)`` with integer
    labels ``y [B, ...]`` and, for padded sequences, ``mask [B, ...]`` of ``y``'s shape (the attention mask: 1 for a
    real token, 0 for padding; padded positions are left out of the log-likelihood and examples without a real
    token out of ``N``). For ``mode="sampled"`` the labels' values are ignored (any array of the label shape).
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
    for i, batch in enumerate(progress_bar(batches, progress, desc="fisher", total=total, leave=False)):
        x, y, m = _unpack(batch, i)
        acc = step(acc, params, x, y, m, jax.random.fold_in(key, i))
        n += int(jnp.sum(jnp.any(m.reshape(m.shape[0], -1) > 0, axis=1)))
    if n == 0:
        raise ValueError("diagonal_fisher: `batches` is empty (or every example is all padding)")
    return jax.tree.map(lambda a: a / n, acc)


def fisher_merge(base: PyTree | None, models: Sequence[PyTree], fishers: Sequence[PyTree], *,
                 weights: Sequence[float] | None = None, fisher_floor: float = 1e-6,
                 check_finite: bool = True) -> MergeResult:
    """Fisher-weighted average ``θ* = Σ_i λ_i max(F_i, ε) θ_i / Σ_i λ_i max(F_i, ε)`` (Matena & Raffel, eq. 4).

    ``base`` is ignored (an average of ``models``; pass None). ``fishers[i]``: model ``i``'s diagonal Fisher (e.g.
    :func:`diagonal_fisher`), same structure. ``weights`` λ_i default to 1; ``fisher_floor`` ε > 0. NaN/Inf in the
    models or Fishers raise (``check_finite=False`` skips the check). Computes in float32; every leaf comes back in
    its own dtype. Returns ``MergeResult(params, info={})``.
    """
    del base  # not used: Fisher merging averages the models themselves
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
    if check_finite:
        check_all_finite(models + fishers, names + [f"fisher_{i}" for i in range(len(fishers))], "fisher_merge")
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

    return MergeResult(merge(models, fishers), {})
