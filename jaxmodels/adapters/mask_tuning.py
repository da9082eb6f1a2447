"""Regularized Mask Tuning: learn binary masks on frozen pre-trained weights, with gradient dropout.

Zheng et al., "Regularized Mask Tuning: Uncovering Hidden Knowledge in Pre-trained Vision-Language Models"
(ICCV 2023), as its reference code (``wuw2019/R-AMT``: ``modules/masklayers.py``, ``trainers/masktuning.py``)
computes it. Every selected kernel ``W`` gets a real-valued mask ``M`` (init ``M = scale = 1e-2``, the ``'1s'``
init) and the forward uses the binarized mask with a straight-through gradient::

    W' = W ⊙ 1[M > τ]                        (τ = 5e-3: every mask starts "on", W' = W)
    ∂L/∂M = ∂L/∂(1[M > τ]) ⊙ W-chain          (the Binarizer's backward is the identity)

The loss is ``L_ce + λ_m Σ_W ||M||_2`` (``RegLoss(param, 2)``, ``λ_m = 1e-4``) and, with the zero-shot (unmasked)
model as teacher, ``L_kl = -T² Σ softmax(z_t' / T) log softmax(z_s / T)`` with ``z_t' = α z_t + (1 - α) z_s``.
**Gradient dropout** keeps each element of the task gradient ``a = ∂(L_ce + reg)/∂M`` with probability given by its
agreement with the KL gradient ``b = ∂L_kl/∂M``::

    P = (sgn(a) (a + b) / (|a| + |b| + ε) + 1) / 2,   U ~ U[0, 1)
    g = ((1 - λ) + λ · 1[P > U]) ⊙ a                 (λ = 1: dropped elements get 0)

(same sign: ``P = 1``, always kept; opposite and ``|b| ≥ |a|``: ``P = 0``, dropped). The update is ``g`` only (the
KL gradient just gates it), as in ``graddrop_backward_and_update``.

**Parameter selection.** The paper first identifies the task-important weights from downstream gradients; the
reference code hard-codes the attention projections of CLIP's image encoder instead, and the paper's exact scoring
rule could not be sourced here. :func:`select_important` implements the closest documented rule: rank the candidate
kernels by their mean absolute downstream gradient ``mean |∂L/∂W|`` and keep the top ones.

API::

    g = jax.grad(loss)(params)                                     # one downstream batch
    paths = select_important(params, g, top_k=2, include=r"Dense_[01]/kernel$")
    masks = init_masks(params, paths)                              # the trainable tree {path: M}
    masked = apply_binary_masks(params, masks)                            # W ⊙ 1[M > τ], straight-through in M
    g = gradient_dropout(key, task_grads, kl_grads)                # the regularised gradient of the masks
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.adapters._papers import check_finite, check_positive_int, check_real
from jaxmodels.tree import filter_paths, flatten, unflatten

PyTree = Any

__all__ = ["MASK_SCALE", "THRESHOLD", "select_important", "init_masks", "binarize", "apply_binary_masks", "mask_reg",
           "distill_kl", "gradient_dropout", "masked_fraction"]

MASK_SCALE = 1e-2  # MASK.SCALE of the reference configs ('1s' init)
THRESHOLD = 5e-3  # MASK.THRESHOLD


def select_important(params: PyTree, grads: PyTree, top_k: int = 1, include: str | None = None,
                     exclude: str | None = None) -> list[str]:
    """The ``top_k`` floating leaves (ndim >= 2, matching ``include`` / not ``exclude``) with the largest mean
    absolute gradient ``mean |∂L/∂W|`` on downstream data, in decreasing order of that score.

    >>> g = jax.grad(lambda p: loss(p, x, y))(params)
    >>> select_important(params, g, top_k=2, include=r"kernel$")
    ['Dense_1/kernel', 'Dense_0/kernel']
    """
    top_k = check_positive_int(top_k, "top_k", "mask_tuning")
    fp, fg = flatten(params), flatten(grads)
    cands = [p for p, x in filter_paths(params, include, exclude).items()
             if getattr(x, "ndim", 0) >= 2 and jnp.issubdtype(x.dtype, jnp.floating)]
    if not cands:
        raise ValueError(f"mask_tuning: no floating kernel with ndim >= 2 matches include={include!r} "
                         f"exclude={exclude!r}")
    for p in cands:
        if p not in fg or jnp.shape(fg[p]) != jnp.shape(fp[p]):
            raise ValueError(f"mask_tuning: grads have no leaf of shape {jnp.shape(fp[p])} at {p!r}")
    check_finite({p: fg[p] for p in cands}, "grads", "mask_tuning")
    scores = jax.device_get([jnp.mean(jnp.abs(jnp.asarray(fg[p], jnp.float32))) for p in cands])
    order = sorted(range(len(cands)), key=lambda i: -float(scores[i]))
    return [cands[i] for i in order[:top_k]]


def init_masks(params: PyTree, paths: Sequence[str], scale: float = MASK_SCALE) -> dict:
    """``{path: M}`` with ``M = scale`` (float32, the shape of the weight at ``path``): the trainable tree.

    >>> masks = init_masks(params, ["Dense_0/kernel"])   # {"Dense_0/kernel": full([64, 64], 1e-2)}
    """
    scale = check_real(scale, "scale", "mask_tuning")
    flat = flatten(params)
    if not paths:
        raise ValueError("mask_tuning: no paths to mask")
    for p in paths:
        if p not in flat:
            raise ValueError(f"mask_tuning: {p!r} is not a leaf of the params")
    return {p: jnp.full(jnp.shape(flat[p]), scale, jnp.float32) for p in paths}


def binarize(m: jax.Array, threshold: float = THRESHOLD) -> jax.Array:
    """``1[m > threshold]`` in the forward, identity gradient in the backward (the reference ``Binarizer``).

    >>> binarize(jnp.array([0.0, 0.01]))   # [0., 1.], d/dm = 1
    """
    hard = (m > threshold).astype(m.dtype)
    return m + jax.lax.stop_gradient(hard - m)


def apply_binary_masks(params: PyTree, masks: dict, threshold: float = THRESHOLD) -> PyTree:
    """``params`` with ``W ⊙ binarize(M)`` at every masked path (differentiable in ``masks`` through the
    straight-through estimator; ``params`` unchanged). Jit-able.

    >>> logits = model.apply({"params": apply_binary_masks(params, masks)}, x)
    """
    flat = dict(flatten(params))
    for p, m in masks.items():
        if p not in flat:
            raise ValueError(f"mask_tuning: mask {p!r} is not a leaf of the params")
        if jnp.shape(m) != jnp.shape(flat[p]):
            raise ValueError(f"mask_tuning: mask {p!r} has shape {jnp.shape(m)}, the weight {jnp.shape(flat[p])}")
    check_finite(masks, "masks", "mask_tuning")
    for p, m in masks.items():
        w = flat[p]
        flat[p] = (jnp.asarray(w, jnp.float32) * binarize(jnp.asarray(m, jnp.float32), threshold)).astype(w.dtype)
    return unflatten(flat, like=params)


def mask_reg(masks: dict) -> jax.Array:
    """``Σ_W ||M||_2`` over the masks (each flattened), the reference ``RegLoss(param, 2)`` summed."""
    return sum(jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(m, jnp.float32)))) for m in masks.values())


def distill_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
               alpha: float = 1.0) -> jax.Array:
    """``mean_b -T² Σ_c softmax(z_t'/T) log softmax(z_s/T)`` with ``z_t' = α z_t + (1 - α) z_s`` (the reference
    ``KLLoss``; ``teacher_logits``: the frozen zero-shot model's).

    >>> distill_kl(apply(masked, x), jax.lax.stop_gradient(apply(params, x)))
    """
    t = check_real(temperature, "temperature", "mask_tuning", lo=0, lo_open=True)
    a = check_real(alpha, "alpha", "mask_tuning", lo=0, hi=1)
    if jnp.shape(student_logits) != jnp.shape(teacher_logits):
        raise ValueError(f"mask_tuning: student logits {jnp.shape(student_logits)} and teacher logits "
                         f"{jnp.shape(teacher_logits)} differ in shape")
    s = jnp.asarray(student_logits, jnp.float32)
    tea = a * jnp.asarray(teacher_logits, jnp.float32) + (1 - a) * s
    return jnp.mean(-jnp.sum(jax.nn.softmax(tea / t, -1) * jax.nn.log_softmax(s / t, -1), -1)) * t * t


def gradient_dropout(key: jax.Array, task_grads: PyTree, kl_grads: PyTree, lam: float = 1.0,
                     eps: float = 1e-8) -> PyTree:
    """``((1 - λ) + λ 1[P > U]) ⊙ a`` per element, ``P = (sgn(a)(a + b)/(|a| + |b| + ε) + 1)/2``, ``U ~ U[0, 1)``
    (one independent draw per leaf from ``fold_in(key, i)``); ``a``: task gradients, ``b``: KL gradients, same tree.

    >>> g = gradient_dropout(jax.random.fold_in(key, step), ga, gb)   # then tx.update(g, state, masks)
    """
    lam = check_real(lam, "lam", "mask_tuning", lo=0, hi=1)
    ta, tb = jax.tree.structure(task_grads), jax.tree.structure(kl_grads)
    if ta != tb:
        raise ValueError(f"mask_tuning: task and KL gradients differ in structure: {ta} vs {tb}")
    la, lb = jax.tree.leaves(task_grads), jax.tree.leaves(kl_grads)
    for i, (a, b) in enumerate(zip(la, lb)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"mask_tuning: gradient leaf {i} has shapes {jnp.shape(a)} and {jnp.shape(b)}")
    out = []
    for i, (a, b) in enumerate(zip(la, lb)):
        a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        p = (jnp.sign(a32) * (a32 + b32) / (jnp.abs(a32) + jnp.abs(b32) + eps) + 1) / 2
        u = jax.random.uniform(jax.random.fold_in(key, i), a32.shape, jnp.float32)
        out.append((((1 - lam) + lam * (p > u)) * a32).astype(jnp.asarray(a).dtype))
    return jax.tree.unflatten(ta, out)


def masked_fraction(masks: dict, params: PyTree | None = None, threshold: float = THRESHOLD) -> float:
    """The fraction of masked-out weights ``#{M <= τ} / N``: over the masked tensors (``params=None``) or over all
    floating parameters of ``params`` (the paper's "2.56% of parameters")."""
    zeros = sum(int(jnp.sum(jnp.asarray(m) <= threshold)) for m in masks.values())
    if params is None:
        n = sum(int(jnp.size(m)) for m in masks.values())
    else:
        n = sum(int(jnp.size(x)) for x in jax.tree.leaves(params) if jnp.issubdtype(jnp.asarray(x).dtype,
                                                                                     jnp.floating))
    return zeros / max(n, 1)
