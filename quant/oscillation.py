"""Weight-oscillation counter (Nagel et al. 2022, "Overcoming Oscillations in Quantization-Aware Training").

Track the integer level ``q_t`` of every quantized weight after each optimizer step. A weight *oscillates* at step
``t`` when its level changes in the direction opposite to its previous change::

    delta_t = q_t - q_{t-1},   dir_t = sign(delta_t)
    osc_t = [dir_t * last_dir = -1]    (last_dir = direction of the last nonzero change)
    ema_t = m osc_t + (1 - m) ema_{t-1}

The tracker state is a NamedTuple of pytrees, so it lives inside a jitted train loop; ``oscillation_summary``
reports total flips, total oscillations and the fraction of weights whose oscillation EMA exceeds a threshold.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["OscillationState", "oscillation_init", "oscillation_update", "oscillation_summary"]


class OscillationState(NamedTuple):
    """Oscillation tracker state, each field a pytree shaped like the tracked levels: ``prev`` (the last integer levels
    ``q_{t-1}``), ``last_dir`` (the direction of the last nonzero change, -1 / 0 / 1, float32), ``count``
    (oscillations per weight, int32), ``flips`` (level changes per weight, int32), ``ema`` (the EMA of the
    oscillation indicator, float32); ``steps`` counts the updates (int32 scalar)."""

    prev: Any  # last integer levels
    last_dir: Any  # direction of the last nonzero change (-1, 0, 1)
    count: Any  # oscillations per weight (int32)
    flips: Any  # level changes per weight (int32)
    ema: Any  # EMA of the oscillation indicator
    steps: jax.Array


def oscillation_init(levels: Any) -> OscillationState:
    """The tracker state for the initial integer ``levels`` (any pytree of arrays, e.g. ``quantize_levels`` of every
    quantized weight): ``prev = levels``, every counter, direction and EMA zero, ``steps = 0``."""
    z = lambda dt: jax.tree_util.tree_map(lambda q: jnp.zeros(jnp.shape(q), dt), levels)
    return OscillationState(levels, z(jnp.float32), z(jnp.int32), z(jnp.int32), z(jnp.float32),
                            jnp.zeros((), jnp.int32))


def oscillation_update(state: OscillationState, levels: Any, momentum: float = 0.01) -> OscillationState:
    """One step of the tracker with the new integer ``levels`` ``q_t`` (same structure as the state's): per weight,
    ``dir_t = sign(round(q_t − q_{t−1}))``, ``osc_t = [dir_t · last_dir = −1]``, ``count += osc_t``, ``flips +=
    [dir_t ≠ 0]``, ``ema_t = m osc_t + (1 − m) ema_{t−1}`` (``m = momentum``), ``last_dir`` updated where
    ``dir_t ≠ 0``. Pure and jit-able."""
    def one(prev, last_dir, count, flips, ema, q):
        d = jnp.sign(jnp.round(q - prev))
        osc = (d * last_dir) == -1
        new_dir = jnp.where(d != 0, d, last_dir)
        return (q, new_dir, count + osc.astype(jnp.int32), flips + (d != 0).astype(jnp.int32),
                momentum * osc + (1 - momentum) * ema)

    leaves = [jax.tree_util.tree_leaves(t) for t in (state.prev, state.last_dir, state.count, state.flips, state.ema,
                                                      levels)]
    treedef = jax.tree_util.tree_structure(levels)
    outs = [one(*args) for args in zip(*leaves)]
    parts = [jax.tree_util.tree_unflatten(treedef, [o[i] for o in outs]) for i in range(5)]
    return OscillationState(*parts, state.steps + 1)


def oscillation_summary(state: OscillationState, threshold: float = 0.005) -> dict[str, float]:
    """``{"oscillations", "flips", "weights", "oscillating_fraction"}`` (fraction with EMA above ``threshold``)."""
    count = sum(int(jnp.sum(c)) for c in jax.tree_util.tree_leaves(state.count))
    flips = sum(int(jnp.sum(c)) for c in jax.tree_util.tree_leaves(state.flips))
    n = sum(int(jnp.size(c)) for c in jax.tree_util.tree_leaves(state.count))
    osc = sum(int(jnp.sum(e > threshold)) for e in jax.tree_util.tree_leaves(state.ema))
    return {"oscillations": count, "flips": flips, "weights": n, "oscillating_fraction": osc / max(n, 1)}
