"""MOS (MOdel Surgery): per-task adapters with adapter merging and training-free self-refined adapter retrieval.

Sun et al., "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental Learning" (AAAI 2025), as its
reference code (``sun-hailong/AAAI25-MOS``, ``backbone/vit_mos.py`` and ``models/mos.py``) computes it. Task
``t`` trains its own adapter ``θ_t`` on a frozen pre-trained model; **adapter merging** pulls it towards the
(merged) adapters of the earlier tasks with momentum ``m``::

    θ̂_t = (1 - m) θ_t + m · (1/t) Σ_{k<t} θ̂_k          (θ̂_0 = θ_0; the forward of task t uses θ̂_t)

(``reweight_adapter`` with the running sums of the stored merged adapters; the reference applies it in place at
every training forward, here it is the pure map applied inside the loss, so the gradient reaches ``θ_t`` scaled by
``1 - m``). Classes are predicted by a classifier over features (the reference's prototype / aligned cosine head).
**Self-refined retrieval** at inference, per sample::

    t⁰ = task(argmax_c z⁰_c)                 z⁰: logits of the frozen model's features (class prototypes)
    repeat: z = z^{(t)}(x);  t' = task(argmax_c z_c);  stop when t' = t or after max_iter (4) rounds; t ← t'
    ŷ = argmax( softmax(z) + softmax((T) · z⁰) )       (the "ensemble" option; T = number of tasks so far)

where ``z^{(t)}`` are the logits of the features computed with adapter ``θ̂_t``. The classifier alignment stage
(Gaussian replay of class statistics to train the head) is a separate head-training step, not part of this module.

API::

    merged = merge_task_adapters(theta_t, [theta_0_hat, ...], momentum=0.1)      # θ̂_t (any pytree of adapters)
    protos = class_prototypes(features, labels, n_classes)                  # [C, d] class means
    z = cosine_logits(features, protos)                                     # [B, C]
    r = self_refined_retrieval(z0, z_all, class_to_task)                    # RetrievalResult(logits, task, iters)
    z = mos_ensemble(r.logits, z0, n_tasks)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.adapters._papers import check_finite, check_positive_int, check_real

PyTree = Any

__all__ = ["RetrievalResult", "merge_task_adapters", "class_prototypes", "cosine_logits", "self_refined_retrieval",
           "mos_ensemble"]

MAX_ITER = 4  # the reference's MAX_ITER


class RetrievalResult(NamedTuple):
    """``logits [B, C]`` of the retrieved adapter, ``task [B]`` its index, ``iters [B]`` refinement rounds used."""

    logits: jax.Array
    task: jax.Array
    iters: jax.Array


def merge_task_adapters(current: PyTree, previous: Sequence[PyTree], momentum: float) -> PyTree:
    """``(1 - m) θ_t + m · mean_k θ̂_k`` leaf by leaf (``previous``: the merged adapters of the earlier tasks;
    empty: ``θ_t`` unchanged). Inputs unchanged; jit-able (``momentum`` static).

    >>> theta_hat = merge_task_adapters(theta, stored, momentum=0.1)
    """
    m = check_real(momentum, "momentum", "mos", lo=0, hi=1)
    previous = list(previous)
    if not previous:
        return current
    s = jax.tree.structure(current)
    for i, p in enumerate(previous):
        if jax.tree.structure(p) != s:
            raise ValueError(f"mos: previous adapter {i} has a different tree structure from the current one")
        for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(p)):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(f"mos: previous adapter {i} has a leaf of shape {jnp.shape(b)}, "
                                 f"the current one {jnp.shape(a)}")
    check_finite(current, "current adapter", "mos")
    for i, p in enumerate(previous):
        check_finite(p, f"previous adapter {i}", "mos")

    def one(cur, *prev):
        mean = sum(jnp.asarray(q, jnp.float32) for q in prev) / len(prev)
        return ((1 - m) * jnp.asarray(cur, jnp.float32) + m * mean).astype(jnp.asarray(cur).dtype)

    return jax.tree.map(one, current, *previous)


def class_prototypes(features: jax.Array, labels: jax.Array, n_classes: int) -> jax.Array:
    """``[C, d]`` class means of ``features [N, d]`` (classes without samples: zeros), the ``replace_fc`` head.

    >>> protos = class_prototypes(feats, y, 10)
    """
    n_classes = check_positive_int(n_classes, "n_classes", "mos")
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"mos: features must be [N, d] and labels [N], got {features.shape} and {labels.shape}")
    check_finite(features, "features", "mos")
    oh = jax.nn.one_hot(labels, n_classes, dtype=jnp.float32)
    s = oh.T @ jnp.asarray(features, jnp.float32)
    return s / jnp.maximum(oh.sum(0), 1.0)[:, None]


def cosine_logits(features: jax.Array, weights: jax.Array, scale: float = 1.0, eps: float = 1e-12) -> jax.Array:
    """``scale · cos(f_b, w_c)``: ``[B, C]`` (the cosine head the PTM-CIL code uses with prototype weights)."""
    if features.shape[-1] != weights.shape[-1]:
        raise ValueError(f"mos: features {features.shape} and weights {weights.shape} differ in width")
    f = jnp.asarray(features, jnp.float32)
    w = jnp.asarray(weights, jnp.float32)
    f = f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + eps)
    w = w / (jnp.linalg.norm(w, axis=-1, keepdims=True) + eps)
    return scale * f @ w.T


def self_refined_retrieval(orig_logits: jax.Array, task_logits: jax.Array, class_to_task: jax.Array,
                           max_iter: int = MAX_ITER) -> RetrievalResult:
    """Per sample: start from the task of the frozen model's prediction, then follow
    ``t ← task(argmax z^{(t)})`` until it is a fixed point or ``max_iter`` rounds (the reference loop).

    ``orig_logits [B, C]``; ``task_logits [T, B, C]``: the logits of every adapter's features; ``class_to_task
    [C]`` int. Jit-able (``max_iter`` static).

    >>> r = self_refined_retrieval(z0, jnp.stack([logits_with(t) for t in range(T)]), cls2task)
    """
    max_iter = check_positive_int(max_iter, "max_iter", "mos")
    if task_logits.ndim != 3 or task_logits.shape[1:] != orig_logits.shape:
        raise ValueError(f"mos: task_logits must be [T, B, C] with [B, C] = orig_logits {orig_logits.shape}, "
                         f"got {task_logits.shape}")
    if class_to_task.shape != orig_logits.shape[-1:]:
        raise ValueError(f"mos: class_to_task must be [C] = [{orig_logits.shape[-1]}], got {class_to_task.shape}")
    check_finite(orig_logits, "orig_logits", "mos")
    check_finite(task_logits, "task_logits", "mos")
    T = task_logits.shape[0]
    if not isinstance(class_to_task, jax.core.Tracer):
        v = np.asarray(jax.device_get(class_to_task))
        lo, hi = int(v.min()), int(v.max())
        if lo < 0 or hi >= T:
            raise ValueError(f"mos: class_to_task values must be in [0, {T}), got [{lo}, {hi}]")
    c2t = jnp.asarray(class_to_task, jnp.int32)
    B = orig_logits.shape[0]
    rows = jnp.arange(B)
    t = c2t[jnp.argmax(orig_logits, -1)]
    z = task_logits[t, rows]
    done = jnp.zeros((B,), bool)
    iters = jnp.zeros((B,), jnp.int32)

    def body(i, carry):
        t, z, done, iters = carry
        cur = task_logits[t, rows]
        nt = c2t[jnp.argmax(cur, -1)]
        z = jnp.where(done[:, None], z, cur)
        iters = iters + (~done)
        # stop at a fixed point or at the last round: t stays the adapter whose logits z are
        stop = done | (nt == t) | (i == max_iter - 1)
        t = jnp.where(stop, t, nt)
        return t, z, stop, iters

    t, z, _, iters = jax.lax.fori_loop(0, max_iter, body, (t, z, done, iters))
    return RetrievalResult(z, t, iters)


def mos_ensemble(logits: jax.Array, orig_logits: jax.Array, n_tasks: int) -> jax.Array:
    """``softmax(z) + softmax(T · z⁰)``: the reference's ensemble of the retrieved adapter's and the frozen model's
    predictions (``orig_logits / (1 / (cur_task + 1))``)."""
    n_tasks = check_positive_int(n_tasks, "n_tasks", "mos")
    if logits.shape != orig_logits.shape:
        raise ValueError(f"mos: logits {logits.shape} and orig_logits {orig_logits.shape} differ in shape")
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1) + \
        jax.nn.softmax(n_tasks * jnp.asarray(orig_logits, jnp.float32), -1)
