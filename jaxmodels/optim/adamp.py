"""AdamP and SGDP: remove the radial component of the update of scale-invariant weights.

Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights" (ICLR 2021),
Algorithm 1/2 and the reference code (github.com/clovaai/AdamP). For each weight w with ``ndim > 1``, gradient g and
the optimizer's step direction p (Adam's m̂/(sqrt(v̂)+eps), or SGD's momentum buffer)::

    cos_view(g, w) = |<g, w>_view| / max(‖g‖_view ‖w‖_view, eps)      for view in (channel-wise, layer-wise)
    scale-invariant in a view  <=>  max cos_view < δ / sqrt(d_view)     (d_view: length of one view row)
    Π(p) = p - ŵ <ŵ, p>_view,   ŵ = w / (‖w‖_view + eps)                 (first view that triggers wins)
    w ← w - η (Π(p) + λ · wd_ratio · w)     (scale-invariant)
    w ← w - η (p + λ w)                      (otherwise: plain AdamW / SGD)

Views follow Flax layouts: the channel-wise view takes one row per *output* channel, the LAST axis of a Dense
kernel ``[in, out]`` and of a Conv kernel ``[kh, kw, in, out]`` (``channel_axis=-1``; PyTorch's first axis is
``channel_axis=0``). The "first view that triggers" choice is made with ``jnp.where`` so it jits.

:func:`scale_by_radial_projection` is the projection (plus decoupled decay with ``wd_ratio``) as its own transform,
usable after ``optax.scale_by_adam`` or ``optax.trace``: the cosine test uses the raw gradient when it is passed as
the ``grads=`` extra argument (what :func:`project_radial` / :func:`adamp` / :func:`sgdp` do), else the incoming
update. SGDP divides the weight decay by ``1 - momentum`` as the reference does.

Views are per leaf: a scanned/stacked kernel ``[L, in, out]`` is treated as one weight (channel rows span all L
layers); exclude such leaves with ``mask`` or keep per-layer leaves if per-layer views are wanted.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmodels.optim._common import NO_PARAMS_MSG, check_range

PyTree = Any

__all__ = [
    "radial_projection",
    "scale_by_radial_projection",
    "project_radial",
    "scale_by_adam_nesterov",
    "adamp",
    "sgdp",
]


def radial_projection(p, g, w, delta: float = 0.1, eps: float = 1e-8, channel_axis: int = -1):
    """One leaf: return ``(projected p, triggered)`` (see module docstring). Leaves with ``ndim <= 1`` are returned
    unchanged with ``triggered=False`` (as in the reference)."""
    if w.ndim <= 1:
        return p, jnp.zeros((), bool)
    f32 = jnp.float32
    p32, g32, w32 = p.astype(f32), g.astype(f32), w.astype(f32)
    ax = channel_axis % w.ndim
    ch_axes = tuple(a for a in range(w.ndim) if a != ax)
    # Four per-channel reductions; the layer view's sums are sums of the channel sums (one pass over the leaf).
    gw = jnp.sum(g32 * w32, axis=ch_axes, keepdims=True)
    gg = jnp.sum(g32 * g32, axis=ch_axes, keepdims=True)
    ww = jnp.sum(w32 * w32, axis=ch_axes, keepdims=True)
    wp = jnp.sum(w32 * p32, axis=ch_axes, keepdims=True)
    # Keep the layer sums as sums of these channel sums: without the barrier XLA rewrites sum(sum(x)) into four more
    # full passes over the leaf (2.5x slower on CPU).
    gw, gg, ww, wp = jax.lax.optimization_barrier((gw, gg, ww, wp))
    row_c = math.prod(w.shape[a] for a in ch_axes)
    gn_c, wn_c = jnp.sqrt(gg), jnp.sqrt(ww)
    trig_c = jnp.max(jnp.abs(gw) / jnp.maximum(gn_c * wn_c, eps)) < delta / math.sqrt(row_c)
    gn_l, wn_l = jnp.sqrt(jnp.sum(gg)), jnp.sqrt(jnp.sum(ww))
    trig_l = jnp.abs(jnp.sum(gw)) / jnp.maximum(gn_l * wn_l, eps) < delta / math.sqrt(w.size)
    # Π(p) = p - ŵ <ŵ, p> = p - w <w, p> / (‖w‖ + eps)^2 in the chosen view
    coef_c = wp / jnp.square(wn_c + eps)
    coef_l = jnp.sum(wp) / jnp.square(wn_l + eps)
    coef = jnp.where(trig_c, coef_c, jnp.where(trig_l, coef_l, 0.0))
    return (p32 - w32 * coef).astype(p.dtype), trig_c | trig_l


def scale_by_radial_projection(
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    channel_axis: int = -1,
    mask: PyTree | Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``p -> Π(p) + λ·wd_ratio·w`` where the weight is scale-invariant, ``p + λ w`` elsewhere.

    ``update(updates, state, params, grads=None)``: the cosine test uses ``grads`` if given (reference behaviour),
    else ``updates``. ``mask`` restricts projection *and* decay to the selected leaves: a tree of static bools with
    the structure of (or a prefix of) ``params``, or a callable that is called on ``params`` and returns one (the
    optax convention for weight-decay masks: the mask describes the parameters, not the updates).
    """
    check_range("delta", delta, 0.0)
    check_range("wd_ratio", wd_ratio, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    check_range("eps", eps, 0.0)

    def update_fn(updates, state, params=None, grads=None, **extra):
        del extra
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        grads = updates if grads is None else grads
        sel = _mask_tree(mask, params)

        def one(p, g, w, on):
            if not on:
                return p
            out, trig = radial_projection(p, g, w, delta, eps, channel_axis)
            if weight_decay:
                ratio = jnp.where(trig, wd_ratio, 1.0).astype(out.dtype)
                out = out + weight_decay * ratio * w.astype(out.dtype)
            return out

        return jax.tree.map(one, updates, grads, params, sel), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def _mask_tree(mask, params):
    """The mask as a full tree of Python bools shaped like ``params`` (``mask`` may be a prefix tree or a callable
    of ``params``). Leaves must be static: a traced bool cannot choose which leaves are projected."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    tree = mask(params) if callable(mask) else mask

    def static(m):
        if isinstance(m, jax.core.Tracer):
            raise ValueError("mask leaves must be static Python bools (as for optax.masked), got a traced value; "
                             "compute the mask from shapes/paths, or outside jax.jit")
        return bool(m)

    try:
        return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: static(m), sub), tree, params)
    except ValueError as e:
        if "static" in str(e):
            raise
        raise ValueError(f"mask must have the structure of params (or a prefix of it): {e}") from None


class ProjectedState(NamedTuple):
    inner: Any
    projection: Any


def project_radial(inner: optax.GradientTransformation, **projection_kwargs) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` (e.g. ``scale_by_adam`` / ``trace``) then :func:`scale_by_radial_projection`, handing it the
    raw gradient for the cosine test exactly as the reference does."""
    proj = scale_by_radial_projection(**projection_kwargs)

    def init_fn(params):
        return ProjectedState(inner.init(params), proj.init(params))

    def update_fn(grads, state, params=None, **extra):
        u, s_in = inner.update(grads, state.inner, params, **extra) if isinstance(
            inner, optax.GradientTransformationExtraArgs) else inner.update(grads, state.inner, params)
        u, s_p = proj.update(u, state.projection, params, grads=grads)
        return u, ProjectedState(s_in, s_p)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_adam_nesterov(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamP's Nesterov direction (reference code): ``(b1 m_t + (1 - b1) g_t) / (1 - b1^t) / (sqrt(v̂_t) + eps)``.
    (``optax.scale_by_adam(nesterov=True)`` bias-corrects the two terms differently.) State: ScaleByAdamState."""

    def init_fn(params):
        z = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), z, jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        out = jax.tree.map(
            lambda m, v, g: ((b1 * m + (1 - b1) * g) / bc1 / (jnp.sqrt(v / bc2) + eps)).astype(g.dtype),
            mu, nu, updates)
        return out, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamp(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
    channel_axis: int = -1,
    mask: PyTree | Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamP (see module docstring). On weights that are not scale-invariant it is exactly ``optax.adamw``."""
    check_range("b1", b1, 0.0, 1.0, hi_open=True)
    check_range("b2", b2, 0.0, 1.0, hi_open=True)
    inner = scale_by_adam_nesterov(b1, b2, eps) if nesterov else optax.scale_by_adam(b1, b2, eps)
    return optax.chain(
        project_radial(inner, delta=delta, wd_ratio=wd_ratio, weight_decay=weight_decay, eps=eps,
                       channel_axis=channel_axis, mask=mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sgdp(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    eps: float = 1e-8,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    channel_axis: int = -1,
    mask: PyTree | Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SGDP (see module docstring): ``buf = m buf + g``, ``p = buf`` (or ``g + m buf`` with Nesterov),
    ``w ← w - η (Π(p) + λ/(1-m) · ratio · w)``."""
    check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
    inner = optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity()
    return optax.chain(
        project_radial(inner, delta=delta, wd_ratio=wd_ratio, weight_decay=weight_decay / (1.0 - momentum),
                       eps=eps, channel_axis=channel_axis, mask=mask),
        optax.scale_by_learning_rate(learning_rate),
    )
