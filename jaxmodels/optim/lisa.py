"""LISA: Layerwise Importance Sampled AdamW, with optimizer state only for the active layers.

Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning" (2024),
Algorithm 1: every K steps sample γ of the L middle layers uniformly without replacement; embeddings and head always
train; the other layers are frozen (zero update) for the period::

    every K steps:  A ~ Uniform({S ⊂ {0..L-1} : |S| = γ})
    u_l = inner(g_l)   for l ∈ A ∪ {always-trained leaves},     u_l = 0 otherwise.

Memory: for models whose layers are stacked along a leading axis (``nn.scan`` / ``scan_layers``: leaves matching
``stacked`` have shape ``[L, ...]``), the inner optimizer runs on the gathered ``[γ, ...]`` slices, so its state is
``(γ·layer + always)/(L·layer + always)`` of the full optimizer's. The inner transform is ``vmap``-ed over the γ
active layers, so each active layer has its own state *including its own step count*: on a resample a layer that
stays active keeps its moments (gathered to its new slot), a newly activated layer starts from fresh state
(``inner.init``, zero moments, count 0 so Adam's bias correction is right), as in the reference where a frozen
layer's state is dropped. The always-trained leaves use ``inner`` directly.

Sampling uses a PRNG key kept in the state (reproducible from ``seed``) and a fixed γ, so ``update`` jits; the
resample runs under ``lax.cond``. The inner transform sees flat ``{path: leaf}`` dicts (paths as in
:func:`jaxmodels.tree.flatten`), so masks inside it should be callables such as
``lambda t: jaxmodels.select(t, exclude="bias$")``. Learning-rate schedules belong *outside* (:func:`lisa` does this),
because per-layer counts restart for fresh layers.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmodels.optim._common import check_range
from jaxmodels.tree import flatten, unflatten

PyTree = Any

__all__ = ["LisaState", "scale_by_lisa", "lisa", "lisa_layers"]


class LisaState(NamedTuple):
    """State of :func:`scale_by_lisa`: ``count`` (int32 step counter), ``key`` (the PRNG key of the next resample),
    ``active`` (``int32[γ]``, the sorted indices of the active layers ``A``), ``stacked`` (the inner state vmapped over
    the γ active layers, leaves ``[γ, ...]``) and ``rest`` (the inner state of the always-trained leaves)."""

    count: jax.Array  # int32 step counter
    key: jax.Array  # uint32[2] PRNG key for the next resample
    active: jax.Array  # int32[γ] sorted indices of the active layers
    stacked: Any  # vmapped inner state for the γ active layers (leaves [γ, ...])
    rest: Any  # inner state for the always-trained leaves


def _split(flat: dict, pattern: re.Pattern) -> tuple[dict, dict]:
    st = {k: v for k, v in flat.items() if pattern.search(k)}
    rest = {k: v for k, v in flat.items() if not pattern.search(k)}
    return st, rest


def _num_layers(stacked: dict) -> int:
    if not stacked:
        raise ValueError("lisa: no leaf matches the `stacked` pattern")
    sizes = {k: (v.shape[0] if getattr(v, "ndim", 0) >= 1 else None) for k, v in stacked.items()}
    uniq = set(sizes.values())
    if len(uniq) != 1 or None in uniq:
        raise ValueError(f"lisa: stacked leaves must share one leading layer axis, got {sizes}")
    return uniq.pop()


def _sample(key, num_layers: int, gamma: int):
    return jnp.sort(jax.random.choice(key, num_layers, (gamma,), replace=False)).astype(jnp.int32)


def scale_by_lisa(
    inner: optax.GradientTransformation,
    gamma: int,
    interval: int,
    stacked: str = r"(^|/)layers/",
    seed: int = 0,
) -> optax.GradientTransformation:
    """Wrap ``inner`` so only γ of the stacked layers (leaves whose path matches ``stacked``) are trained in each
    period of ``interval`` steps (see module docstring)."""
    if int(gamma) != gamma or gamma < 1:
        raise ValueError(f"lisa: gamma must be a positive integer, got {gamma!r}")
    if int(interval) != interval or interval < 1:
        raise ValueError(f"lisa: interval must be a positive integer, got {interval!r}")
    pattern = re.compile(stacked)
    gamma, interval = int(gamma), int(interval)

    def gather(tree, idx):
        return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)

    def init_fn(params):
        st, rest = _split(flatten(params), pattern)
        n = _num_layers(st)
        if gamma > n:
            raise ValueError(f"lisa: gamma={gamma} exceeds the number of stacked layers {n}")
        key, sub = jax.random.split(jax.random.PRNGKey(seed))
        active = _sample(sub, n, gamma)
        return LisaState(
            count=jnp.zeros([], jnp.int32),
            key=key,
            active=active,
            stacked=jax.vmap(inner.init)(gather(st, active)),
            rest=inner.init(rest),
        )

    def update_fn(updates, state, params=None):
        u_st, u_rest = _split(flatten(updates), pattern)
        if params is not None:
            p_st, p_rest = _split(flatten(params), pattern)
        else:
            p_st, p_rest = u_st, None
        n = _num_layers(u_st)

        def resample(operand):
            key, active, st_state = operand
            key, sub = jax.random.split(key)
            new = _sample(sub, n, gamma)
            fresh = jax.vmap(inner.init)(gather(p_st, new))
            eq = new[:, None] == active[None, :]  # [new slot, old slot]
            found, src = eq.any(axis=1), jnp.argmax(eq, axis=1)

            def pick(old, fr):
                keep = found.reshape((gamma,) + (1,) * (old.ndim - 1))
                return jnp.where(keep, jnp.take(old, src, axis=0), fr)

            return key, new, jax.tree.map(pick, st_state, fresh)

        do = (state.count > 0) & (state.count % interval == 0)
        key, active, st_state = jax.lax.cond(do, resample, lambda o: o, (state.key, state.active, state.stacked))

        g_c = gather(u_st, active)
        if params is not None:
            out_c, st_state = jax.vmap(inner.update)(g_c, st_state, gather(p_st, active))
        else:
            out_c, st_state = jax.vmap(lambda g, s: inner.update(g, s))(g_c, st_state)
        out = {k: jnp.zeros_like(u_st[k]).at[active].set(out_c[k].astype(u_st[k].dtype)) for k in u_st}
        out_rest, rest_state = inner.update(u_rest, state.rest, p_rest)
        out.update(out_rest)
        new_state = LisaState(optax.safe_increment(state.count), key, active, st_state, rest_state)
        return unflatten(out, like=updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def lisa(
    learning_rate: optax.ScalarOrSchedule,
    gamma: int = 2,
    interval: int = 50,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    stacked: str = r"(^|/)layers/",
    seed: int = 0,
) -> optax.GradientTransformation:
    """LISA with AdamW as the inner optimizer (the paper's setting), learning-rate schedule applied outside:
    ``chain(scale_by_lisa(chain(scale_by_adam, add_decayed_weights)), scale_by_learning_rate)``."""
    check_range("b1", b1, 0.0, 1.0, hi_open=True)
    check_range("b2", b2, 0.0, 1.0, hi_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    inner = optax.chain(optax.scale_by_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay))
    return optax.chain(scale_by_lisa(inner, gamma, interval, stacked, seed),
                       optax.scale_by_learning_rate(learning_rate))


def lisa_layers(state: PyTree) -> jax.Array:
    """The active layer indices stored in the (possibly chained) optimizer state."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, LisaState))
             if isinstance(s, LisaState)]
    if not found:
        raise ValueError("lisa_layers: no LisaState in this optimizer state")
    return found[0].active
