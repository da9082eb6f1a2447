"""CoTTA: Wang, Fink, Van Gool & Dai, "Continual Test-Time Domain Adaptation" (CVPR 2022), transcribed from the
reference code github.com/qinenergy/cotta (``cifar/cotta.py``, ``CoTTA.forward_and_adapt``; defaults from
``cifar/cfgs/cifar10/cotta.yaml``: Adam lr 1e-3, ``MT`` = 0.999, ``RST`` = 0.01, ``AP`` = 0.92, N = 32).

One adaptation step on an unlabeled test batch ``x`` with student θ, EMA teacher θ' and source weights θ_src::

    conf     = mean_b max_c softmax(f(x; θ_src))_bc                    (the source "anchor" model's confidence)
    y'       = mean_{n=1..N} f(aug_n(x); θ')   if conf < threshold,   else  f(x; θ')    (teacher logits)
    L(θ)     = mean_b  -sum_c softmax(y')_bc log softmax(f(x; θ))_bc   (cross-entropy to the soft pseudo-labels)
    θ        ← tx(θ, ∇L)                                                (one optimizer step, e.g. Adam)
    θ'       ← m θ' + (1 - m) θ                                         (teacher EMA, m = ``ema``)
    M        ~ Bernoulli(p)  elementwise,   θ ← M ⊙ θ_src + (1 - M) ⊙ θ    (stochastic restore, p = ``restore_prob``)

and the step's prediction is the teacher's ``y'``, in that order (the EMA sees the student BEFORE its restore). The
threshold is on the batch-MEAN confidence (one decision per batch), as in the reference. The restore mask of each
leaf is drawn from its own key, ``fold_in(key, crc32(path))`` (the path as :func:`jaxmodels.tree.flatten` writes
it), so a leaf's mask does not depend on the rest of the tree; a step with key ``k`` uses exactly
``restore_masks(params, jax.random.split(k)[1], p)`` (``split(k)[0]`` draws the augmentations).

Batch statistics: the reference runs every BatchNorm with the statistics of the current batch (``configure_model``
turns running statistics off), for the student, the teacher and the anchor alike. ``apply_fn(params, x) -> logits``
is the caller's, so do the same there for a BatchNorm model, e.g.
``lambda p, x: model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])[0]``.

Augmentations: ``augment(key, x) -> x`` (one random augmented copy of the whole batch). The reference's image
transform draws ONE set of random parameters per call for the whole batch (torchvision transforms on a batch tensor:
colour jitter, affine, blur, flip) plus per-pixel Gaussian noise (std 0.005), clipped to [0, 1];
:func:`cotta_augment` is that recipe reduced to what is cheap in JAX: brightness, contrast and gamma jitter, a
random translation, an optional horizontal flip (the reference flips with probability 0.5: ``flip=True``; off by
default, for digits), Gaussian noise, clip (no rotation, scale or blur; say so if you compare to the paper's
numbers). Scale ``max_shift`` to the image: the reference translates by up to 1/16 of a 32-pixel image.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmodels.optim._common import check_range
from jaxmodels.tree import is_concrete, map_with_path

PyTree = Any

__all__ = ["CoTTAState", "CoTTA", "cotta", "cotta_augment", "ema_update", "restore_masks", "stochastic_restore",
           "soft_cross_entropy"]


class CoTTAState(NamedTuple):
    """``params``: the student θ; ``teacher``: the EMA teacher θ'; ``source``: θ_src (the anchor model and the
    restore target, never changed); ``opt_state``: the student's optimizer state; ``count``: steps taken (int32)."""

    params: PyTree
    teacher: PyTree
    source: PyTree
    opt_state: Any
    count: jax.Array


class CoTTA(NamedTuple):
    """``init(params) -> CoTTAState``; ``step(state, x, key) -> (state, teacher_logits)``. Both pure; jit them."""

    init: Callable[[PyTree], CoTTAState]
    step: Callable[[CoTTAState, jax.Array, jax.Array], tuple[CoTTAState, jax.Array]]


def _leaf_key(key: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def ema_update(teacher: PyTree, student: PyTree, momentum) -> PyTree:
    """``m * teacher + (1 - m) * student`` per floating leaf (float32, returned in the teacher leaf's dtype)."""
    m = jnp.asarray(momentum, jnp.float32)

    def one(t, s):
        if not _floating(t):
            return t
        return (m * t.astype(jnp.float32) + (1 - m) * s.astype(jnp.float32)).astype(t.dtype)

    return jax.tree.map(one, teacher, student)


def restore_masks(tree: PyTree, key: jax.Array, prob) -> PyTree:
    """The stochastic-restore masks ``M ~ Bernoulli(prob)`` (True = restore this element), one per floating leaf from
    ``fold_in(key, crc32(path))``: ``uniform(leaf_key, leaf.shape) < prob``. Non-floating leaves get ``None``."""
    p = jnp.asarray(prob, jnp.float32)
    return map_with_path(lambda path, x: jax.random.uniform(_leaf_key(key, path), jnp.shape(x)) < p
                         if _floating(x) else None, tree)


def stochastic_restore(params: PyTree, source: PyTree, key: jax.Array, prob) -> PyTree:
    """``M ⊙ source + (1 - M) ⊙ params`` with :func:`restore_masks` ``(params, key, prob)``; ``prob = 0`` keeps
    ``params``, ``prob = 1`` returns ``source``. Non-floating leaves are kept from ``params``."""
    masks = restore_masks(params, key, prob)
    return jax.tree.map(lambda m, x, s: x if m is None else jnp.where(m, s.astype(x.dtype), x), masks, params, source,
                        is_leaf=lambda v: v is None)


def soft_cross_entropy(logits: jax.Array, target_logits: jax.Array) -> jax.Array:
    """``mean_b -sum_c softmax(target)_bc log_softmax(logits)_bc`` in float32; the target gets no gradient (the
    reference's ``softmax_entropy(x, x_ema)``)."""
    t = jax.nn.softmax(jax.lax.stop_gradient(target_logits).astype(jnp.float32), -1)
    return -(t * jax.nn.log_softmax(logits.astype(jnp.float32), -1)).sum(-1).mean()


def cotta_augment(key: jax.Array, x: jax.Array, *, brightness=(0.6, 1.4), contrast=(0.7, 1.3), gamma=(0.7, 1.3),
                  max_shift: int = 1, flip: bool = False, noise_std: float = 0.005) -> jax.Array:
    """One random augmentation of a batch of images ``[B, H, W, C]`` with values in [0, 1] (the parameters drawn once
    for the whole batch, as the reference's transforms; the noise per pixel)::

        x = clip(x, 0, 1);  x = b * x;  x = mean + c * (x - mean);  x = clip(x, 0, 1) ** g
        x = translate(x, (dy, dx)) with edge padding, |dy|, |dx| <= max_shift;  optionally flip left-right (p = 0.5)
        x = clip(x + noise_std * N(0, 1), 0, 1)

    ``brightness`` / ``contrast`` / ``gamma`` are ``(lo, hi)`` uniform ranges (the reference's non-"soft" ones);
    ``mean`` is the batch's per-image mean. Inputs of another rank get only the jitter and the noise."""
    x = jnp.asarray(x)
    kb, kc, kg, ks, kf, kn = jax.random.split(key, 6)
    xf = jnp.clip(x.astype(jnp.float32), 0.0, 1.0)
    xf = xf * jax.random.uniform(kb, (), minval=brightness[0], maxval=brightness[1])
    axes = tuple(range(1, xf.ndim))
    mean = xf.mean(axes, keepdims=True)
    xf = mean + jax.random.uniform(kc, (), minval=contrast[0], maxval=contrast[1]) * (xf - mean)
    xf = jnp.clip(xf, 0.0, 1.0) ** jax.random.uniform(kg, (), minval=gamma[0], maxval=gamma[1])
    if xf.ndim == 4:
        if max_shift > 0:
            s = max_shift
            dy, dx = jax.random.randint(ks, (2,), -s, s + 1)
            padded = jnp.pad(xf, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
            xf = jax.lax.dynamic_slice(padded, (0, s + dy, s + dx, 0), xf.shape)
        if flip:
            xf = jnp.where(jax.random.bernoulli(kf), xf[:, :, ::-1, :], xf)
    xf = jnp.clip(xf + noise_std * jax.random.normal(kn, xf.shape), 0.0, 1.0)
    return xf.astype(x.dtype)


def cotta(apply_fn: Callable[[PyTree, jax.Array], jax.Array], tx: optax.GradientTransformation, *,
          ema: float = 0.999, restore_prob: float = 0.01, threshold: float = 0.92, n_augment: int = 32,
          augment: Callable[[jax.Array, jax.Array], jax.Array] | None = cotta_augment) -> CoTTA:
    """CoTTA (module docstring) for any model ``apply_fn(params, x) -> logits [B, K]`` and any optax ``tx`` for the
    student (the reference: ``optax.adam(1e-3)``). ``ema``: the teacher momentum m; ``restore_prob``: p;
    ``threshold``: the anchor confidence below which the teacher's prediction is averaged over ``n_augment``
    augmented copies (``augment(key, x)``; ``augment=None`` or ``n_augment=0`` never augments). ``step`` is pure and
    jittable; the augmented branch runs under ``lax.cond`` (computed only when taken)."""
    if not callable(apply_fn):
        raise TypeError(f"cotta: apply_fn must be callable, got {type(apply_fn).__name__}")
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError("cotta: tx must be an optax.GradientTransformation")
    for name, v in (("ema", ema), ("restore_prob", restore_prob), ("threshold", threshold)):
        if isinstance(v, (int, float)) or (is_concrete(v) and jnp.ndim(v) == 0):
            check_range(f"cotta: {name}", v, 0.0, 1.0)
    if not isinstance(n_augment, int) or n_augment < 0:
        raise ValueError(f"cotta: n_augment must be an int >= 0, got {n_augment!r}")
    if augment is not None and not callable(augment):
        raise TypeError(f"cotta: augment must be callable or None, got {type(augment).__name__}")
    use_aug = augment is not None and n_augment > 0

    def init(params: PyTree) -> CoTTAState:
        return CoTTAState(params=params, teacher=params, source=params, opt_state=tx.init(params),
                          count=jnp.zeros((), jnp.int32))

    def step(state: CoTTAState, x: jax.Array, key: jax.Array) -> tuple[CoTTAState, jax.Array]:
        k_aug, k_restore = jax.random.split(key)
        anchor_conf = jax.nn.softmax(apply_fn(state.source, x).astype(jnp.float32), -1).max(-1).mean()
        teacher_plain = apply_fn(state.teacher, x)
        if use_aug:
            def averaged(_):
                keys = jax.random.split(k_aug, n_augment)
                outs = jax.lax.map(lambda k: apply_fn(state.teacher, augment(k, x)).astype(jnp.float32), keys)
                return outs.mean(0).astype(teacher_plain.dtype)

            teacher_logits = jax.lax.cond(anchor_conf < threshold, averaged, lambda _: teacher_plain, None)
        else:
            teacher_logits = teacher_plain
        teacher_logits = jax.lax.stop_gradient(teacher_logits)
        grads = jax.grad(lambda p: soft_cross_entropy(apply_fn(p, x), teacher_logits))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        teacher = ema_update(state.teacher, params, ema)
        params = stochastic_restore(params, state.source, k_restore, restore_prob)
        return CoTTAState(params, teacher, state.source, opt_state, state.count + 1), teacher_logits

    return CoTTA(init, step)
