"""CEMA: cloud-edge elastic model adaptation by selective entropy distillation into norm affine parameters.

Chen et al., "Towards Robust and Efficient Cloud-Edge Elastic Model Adaptation via Selective Entropy
Distillation" (ICLR 2024). The edge model only runs forward passes; per test batch it uploads a subset of samples,
the cloud distils a strong foundation model into a copy of the edge model's normalization affine parameters
(``scale`` / ``bias`` of every LayerNorm / BatchNorm / RMSNorm) on the uploads plus replayed earlier uploads, and
sends those parameters back. With ``p = softmax(f_edge(x))``, ``E(x) = -Σ_c p_c log p_c``::

    upload(x)  <=>  E_min <= E(x) < E_max^(t)        (E < E_min: low-informative, already confident;
                                                      E >= E_max: unreliable, excluded)
    E_max^(t+1) = μ E_max^(t) + (1 - μ) mean_batch E(x)         (the dynamic threshold, E_max^(0) = ln C)
    L(θ_norm) = τ² KL(softmax(z_T / τ) || softmax(z_S / τ)) + λ_ent E_S(x)     over uploads ∪ replay samples
    replay: a ring buffer of the last ``capacity`` uploads; each update adds ``n_replay`` uniform draws from it

Where the paper's exact rules could not be sourced here (its reference code was not available): the dynamic
threshold is the moving average of the edge model's batch-mean entropy above (the paper lowers ``E_max`` as the
model adapts; the EMA does that as entropies fall), and the distillation loss is the temperature-scaled KL plus an
optional entropy term; ``E_min``, ``μ``, ``τ``, ``λ_ent`` are parameters.

API::

    mask = norm_affine_mask(params)                     # True on the norm scale/bias leaves
    tx = norm_only(optax.adam(1e-2), params)            # updates only those leaves (the rest get zero updates)
    state = init_cema(num_classes, capacity, x_example)
    up, state = cema_select(edge_logits, state, e_min=0.05)   # the upload mask; the threshold moves
    state = replay_add(state, x, up)                    # keep the uploads
    xr = replay_sample(key, state, n)                   # replayed uploads for the next distillation step
    loss = cema_loss(student_logits, teacher_logits, weights, temperature=1.0)
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmodels.adapters._papers import check_finite, check_positive_int, check_real
from jaxmodels.tree import map_with_path

PyTree = Any

__all__ = ["NORM_PATTERN", "CemaState", "entropy", "norm_affine_mask", "norm_only", "init_cema", "cema_select",
           "replay_add", "replay_sample", "cema_loss"]

#: module-path regex of normalization layers (linen names: LayerNorm_0, BatchNorm_0, norm1, ln_f, bn1, stem_bn,
#: input_layernorm, attention_norm, ...); their ``scale`` / ``bias`` leaves are the adapted parameters
NORM_PATTERN = r"(?i)(norm|(^|/|_)(ln|bn)(_?\w*)?)[^/]*/(scale|bias|weight)$"


class CemaState(NamedTuple):
    """``e_max``: the dynamic unreliable-sample threshold; ``buffer [capacity, ...]``: the replay store of uploads;
    ``count``: uploads seen so far (the ring-buffer write position is ``count % capacity``)."""

    e_max: jax.Array
    buffer: jax.Array
    count: jax.Array


def entropy(logits: jax.Array) -> jax.Array:
    """``E = -Σ_c p_c log p_c`` of ``softmax(logits)`` over the last axis, in float32.

    >>> entropy(jnp.zeros((2, 10)))     # ln 10 each
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    return -jnp.sum(jnp.exp(logp) * logp, -1)


def norm_affine_mask(params: PyTree, pattern: str = NORM_PATTERN) -> PyTree:
    """A bool pytree like ``params``: True on the leaves whose path (``jaxmodels.flatten`` style) matches
    ``pattern`` (default: the scale / bias of every normalization layer). Raises if none matches.

    >>> mask = norm_affine_mask({"LayerNorm_0": {"scale": s, "bias": b}, "Dense_0": {"kernel": w}})
    """
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"cema: pattern {pattern!r} is not a valid regex: {e}") from None
    mask = map_with_path(lambda p, _: bool(rx.search(p)), params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"cema: no normalization affine parameter matches {pattern!r}")
    return mask


def norm_only(tx: optax.GradientTransformation, params: PyTree, pattern: str = NORM_PATTERN
              ) -> optax.GradientTransformation:
    """``tx`` on the norm affine leaves of ``params`` (:func:`norm_affine_mask`), zero updates elsewhere.

    >>> tx = norm_only(optax.adam(1e-2), params); state = tx.init(params)
    """
    mask = norm_affine_mask(params, pattern)
    return optax.chain(optax.masked(tx, mask), optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask)))


def init_cema(num_classes: int, capacity: int, x_example: jax.Array, e_max: float | None = None) -> CemaState:
    """A fresh state: ``E_max = ln C`` (every non-degenerate prediction passes at first), an empty replay buffer of
    ``capacity`` rows shaped like one ``x_example`` row.

    >>> state = init_cema(10, 256, x[0])
    """
    C = check_positive_int(num_classes, "num_classes", "cema")
    cap = check_positive_int(capacity, "capacity", "cema")
    e0 = math.log(C) if e_max is None else check_real(e_max, "e_max", "cema", lo=0.0, lo_open=True)
    x = jnp.asarray(x_example)
    return CemaState(jnp.float32(e0), jnp.zeros((cap,) + x.shape, x.dtype), jnp.int32(0))


def cema_select(edge_logits: jax.Array, state: CemaState, e_min: float = 0.0, momentum: float = 0.9
                ) -> tuple[jax.Array, CemaState]:
    """``(upload mask [B], state)``: ``E_min <= E(x) < E_max``, then ``E_max <- μ E_max + (1 - μ) mean E`` (the
    module docstring). Jit-able.

    >>> up, state = cema_select(edge_model(x), state, e_min=0.05)
    """
    check_real(e_min, "e_min", "cema", lo=0.0)
    mu = check_real(momentum, "momentum", "cema", lo=0.0, hi=1.0)
    if jnp.ndim(edge_logits) != 2:
        raise ValueError(f"cema: edge_logits must be [batch, classes], got shape {jnp.shape(edge_logits)}")
    check_finite(edge_logits, "edge_logits", "cema")
    ent = entropy(edge_logits)
    up = (ent >= e_min) & (ent < state.e_max)
    e_max = mu * state.e_max + (1.0 - mu) * jnp.mean(ent)
    return up, state._replace(e_max=e_max.astype(jnp.float32))


def replay_add(state: CemaState, x: jax.Array, mask: jax.Array) -> CemaState:
    """Write the rows of ``x`` where ``mask`` into the ring buffer (oldest overwritten). Jit-able (a fixed-shape
    scatter; rows not uploaded go to an out-of-range index and are dropped).

    >>> state = replay_add(state, x, up)
    """
    x = jnp.asarray(x)
    cap = state.buffer.shape[0]
    if x.shape[1:] != state.buffer.shape[1:] or jnp.shape(mask) != x.shape[:1]:
        raise ValueError(f"cema: x {x.shape} / mask {jnp.shape(mask)} do not fit the buffer rows "
                         f"{state.buffer.shape[1:]}")
    mask = jnp.asarray(mask, bool)
    pos = (state.count + jnp.cumsum(mask) - 1) % cap
    # the last `cap` uploads of this batch win (earlier ones would be overwritten anyway)
    n = jnp.sum(mask)
    keep = mask & (jnp.cumsum(mask) > n - cap)
    idx = jnp.where(keep, pos, cap)
    buf = state.buffer.at[idx].set(x.astype(state.buffer.dtype), mode="drop")
    return state._replace(buffer=buf, count=state.count + n.astype(jnp.int32))


def replay_sample(key: jax.Array, state: CemaState, n: int) -> tuple[jax.Array, jax.Array]:
    """``(x [n, ...], valid [n])``: ``n`` uniform draws from the stored uploads (``valid`` is False for every draw
    while the buffer is empty). Jit-able.

    >>> xr, ok = replay_sample(key, state, 32)
    """
    n = check_positive_int(n, "n", "cema")
    cap = state.buffer.shape[0]
    size = jnp.minimum(state.count, cap)
    idx = jax.random.randint(key, (n,), 0, jnp.maximum(size, 1))
    return state.buffer[idx], jnp.broadcast_to(size > 0, (n,))


def cema_loss(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array | None = None,
              temperature: float = 1.0, ent_weight: float = 0.0) -> jax.Array:
    """``Σ_i w_i [τ² KL(softmax(z_T,i / τ) || softmax(z_S,i / τ)) + λ_ent E(z_S,i)] / max(Σ w, 1)`` (``w``: the
    upload / replay mask; default all ones).

    >>> loss = cema_loss(student.apply(p, x), teacher.apply(q, x), up, temperature=2.0)
    """
    tau = check_real(temperature, "temperature", "cema", lo=0.0, lo_open=True)
    lam = check_real(ent_weight, "ent_weight", "cema", lo=0.0)
    if jnp.shape(student_logits) != jnp.shape(teacher_logits) or jnp.ndim(student_logits) != 2:
        raise ValueError(f"cema: student {jnp.shape(student_logits)} and teacher {jnp.shape(teacher_logits)} logits "
                         "must both be [batch, classes]")
    zs, zt = jnp.asarray(student_logits, jnp.float32), jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    log_ps, log_pt = jax.nn.log_softmax(zs / tau, -1), jax.nn.log_softmax(zt / tau, -1)
    per = tau * tau * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), -1)
    if lam:
        per = per + lam * entropy(zs)
    w = jnp.ones(per.shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != per.shape:
        raise ValueError(f"cema: weights {w.shape} do not fit the batch {per.shape}")
    return jnp.sum(w * per) / jnp.maximum(jnp.sum(w), 1.0)
