"""Data diet: EL2N and GraNd scores of training examples, and pruning the data by score.

Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in Training" (NeurIPS
2021), as the authors' JAX code computes them (github.com/mansheej/data_diet, ``data_diet/scores.py``
``get_lord_error_fn`` / ``get_grad_norm_fn``, ``data.py`` ``subset_train_idxs_by_scores``). For a model
``f(θ, x)`` returning logits, ``p = softmax(f(θ, x))`` and the one-hot label ``e_y``, over the ``S`` parameter sets
``θ_1..θ_S`` (independent initializations, each trained a few epochs)::

    EL2N(x, y)  = 1/S Σ_s ‖ p(θ_s, x) - e_y ‖₂
    GraNd(x, y) = 1/S Σ_s ‖ ∇_θ ℓ(f(θ_s, x), y) ‖₂        (ℓ = softmax cross-entropy; the norm over all leaves of θ)

Per-example gradients are ``jax.vmap(jax.grad(...))`` over the batch (the reference uses ``jacrev`` of the vmapped
loss: the same numbers). ``prune_by_score(scores, keep_fraction)`` keeps the highest scores (the paper keeps the
hard examples, the reference's ``keep_max_scores``: ``argsort(scores)[-k:]``, returned sorted by index) with
``k = round(keep_fraction · N)``; ``keep="min"`` keeps the easiest instead and ``offset`` skips the ``offset``
highest first (the paper's offset subsets, ``subset_train_idxs_by_offset``, counted from the top).

API::

    s = el2n_scores(apply_fn, [params_1, params_2], x, y)       # [N] float32, jit-compiled once per shape
    g = grand_scores(apply_fn, [params_1, params_2], x, y)
    keep = prune_by_score(s, 0.5)                                # int32 indices of the kept examples
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.analysis.spectral import _check_float_array
from jaxmodels.tree import is_concrete

PyTree = Any

__all__ = ["el2n_scores", "grand_scores", "prune_by_score"]


def _check_inputs(params_list, x, y, batch_size):
    if isinstance(params_list, (str, bytes)) or not isinstance(params_list, Sequence) or len(params_list) == 0:
        raise ValueError("params_list must be a non-empty sequence of parameter trees (one per seed)")
    structs = [jax.tree_util.tree_structure(p) for p in params_list]
    if any(s != structs[0] for s in structs[1:]):
        raise ValueError("all parameter trees in params_list must have the same structure")
    shapes = [[(leaf.shape, leaf.dtype) for leaf in jax.tree_util.tree_leaves(p)] for p in params_list]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError("all parameter trees in params_list must have the same leaf shapes and dtypes")
    if not hasattr(x, "shape") or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be an array with a leading batch axis, got {getattr(x, 'shape', type(x))}")
    if not hasattr(y, "shape") or y.shape != x.shape[:1]:
        raise ValueError(f"y must be integer labels of shape {x.shape[:1]}, got {getattr(y, 'shape', type(y))}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"y must be integer labels, got dtype {y.dtype}")
    if is_concrete(y) and np.asarray(y).min() < 0:
        raise ValueError("y holds negative labels")
    if jnp.issubdtype(x.dtype, jnp.floating):
        _check_float_array(x, "x", 1)
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")


def _stack(params_list):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params_list)


def _logits(apply_fn, params, x):
    out = apply_fn(params, x)
    if not hasattr(out, "ndim") or out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"apply_fn(params, x) must return logits [batch, classes], got {getattr(out, 'shape', out)}")
    return out.astype(jnp.float32)


def _batched(fn, x, y, batch_size):
    """``fn(x_batch, y_batch) -> [b]`` over the whole set in batches of ``batch_size`` (last one padded)."""
    n = x.shape[0]
    if batch_size is None or batch_size >= n:
        return fn(x, y)
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    yp = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)]) if pad else y
    out = jax.lax.map(lambda b: fn(*b), (xp.reshape((nb, batch_size) + x.shape[1:]), yp.reshape(nb, batch_size)))
    return out.reshape(-1)[:n]


def el2n_scores(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params_list: Sequence[PyTree], x: jax.Array,
                y: jax.Array, *, batch_size: int | None = None) -> jax.Array:
    """EL2N scores ``[N]``: the mean over ``params_list`` of ``‖softmax(apply_fn(params, x)) - onehot(y)‖₂``.
    ``apply_fn(params, x)`` returns logits ``[batch, classes]``; ``batch_size`` bounds the examples evaluated at
    once (None: all). Compiled once per ``apply_fn`` (keep the same function object) and input shapes."""
    _check_inputs(params_list, x, y, batch_size)
    return _el2n(apply_fn, _stack(params_list), x, y, batch_size=batch_size)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("batch_size",))
def _el2n(apply_fn, stacked, x, y, *, batch_size):
    def one(params, xb, yb):
        logits = _logits(apply_fn, params, xb)
        err = jax.nn.softmax(logits, -1) - jax.nn.one_hot(yb, logits.shape[-1], dtype=jnp.float32)
        return jnp.linalg.norm(err, axis=-1)

    def per_batch(xb, yb):
        return jnp.mean(jax.vmap(one, in_axes=(0, None, None))(stacked, xb, yb), axis=0)

    return _batched(per_batch, x, y, batch_size)


def grand_scores(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params_list: Sequence[PyTree], x: jax.Array,
                 y: jax.Array, *, batch_size: int | None = None) -> jax.Array:
    """GraNd scores ``[N]``: the mean over ``params_list`` of the per-example gradient norm
    ``‖∇_θ CE(apply_fn(θ, x_i), y_i)‖₂`` over all leaves of ``θ`` (per-example gradients by ``vmap(grad)``).
    Memory: one gradient per example of a batch per seed; ``batch_size`` bounds it."""
    _check_inputs(params_list, x, y, batch_size)
    return _grand(apply_fn, _stack(params_list), x, y, batch_size=batch_size)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("batch_size",))
def _grand(apply_fn, stacked, x, y, *, batch_size):
    def loss(params, xi, yi):
        logits = _logits(apply_fn, params, xi[None])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]

    def one(params, xb, yb):
        g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, xb, yb)
        sq = sum(jnp.sum(leaf.reshape(leaf.shape[0], -1).astype(jnp.float32) ** 2, axis=1)
                 for leaf in jax.tree_util.tree_leaves(g))
        return jnp.sqrt(sq)

    def per_batch(xb, yb):
        return jnp.mean(jax.vmap(one, in_axes=(0, None, None))(stacked, xb, yb), axis=0)

    return _batched(per_batch, x, y, batch_size)


def prune_by_score(scores: jax.Array, keep_fraction: float, *, keep: str = "max", offset: int = 0) -> jax.Array:
    """Indices (int32, ascending) of the examples kept: the ``round(keep_fraction · N)`` highest scores
    (``keep="max"``, the paper's choice), or lowest (``"min"``), after skipping the ``offset`` highest (``"max"``)
    or lowest (``"min"``). Ties are broken by index (a stable argsort; the reference's NumPy quicksort leaves their
    order unspecified)."""
    _check_float_array(scores, "scores", 1, 1)
    if keep not in ("max", "min"):
        raise ValueError(f"keep must be 'max' or 'min', got {keep!r}")
    n = scores.shape[0]
    if not 0.0 < float(keep_fraction) <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    k = int(round(float(keep_fraction) * n))
    if k < 1:
        raise ValueError(f"keep_fraction={keep_fraction} keeps no example of {n}")
    if not 0 <= int(offset) <= n - k:
        raise ValueError(f"offset must be in [0, {n - k}] to keep {k} of {n} examples, got {offset}")
    order = jnp.argsort(jnp.asarray(scores), stable=True)
    if keep == "max":
        start = n - k - int(offset)
    else:
        start = int(offset)
    return jnp.sort(order[start:start + k]).astype(jnp.int32)
