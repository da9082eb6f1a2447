"""Oscillation-free quantization for low-bit ViTs (Liu et al. 2023, ICML, "Oscillation-free Quantization for
Low-bit Vision Transformers"): StatsQ and confidence-guided annealing (CGA). Query-key reparameterization is
:mod:`quant.qkr`.

StatsQ: a *statistical*, non-learned scale per output channel (learned scales were found to cause weight
oscillation). With ``n = 2^(b-1)`` and ``s = 2 mean|W|`` over each output channel::

    c = clip(W / s, -1, 1 - 1e-6)
    W_hat = s (round(n c - 1/2) + 1/2) / n          (2^b levels at half-integer offsets, no zero level)

and an identity straight-through gradient ``d W_hat / d W = 1`` (the reference implementation's ``detach`` trick).

CGA: after the main training, continue for a few epochs but *freeze* every weight whose latent value sits
confidently inside its bin: with ``u = n c - 1/2``, a weight is unconfident (may still flip between two levels and
keeps training) iff ``|u - (i + 1/2)| <= r`` for a decision threshold ``i + 1/2`` (``i = -n .. n-2``); all other
weights get zero update (gradient and weight decay both, as the reference restores frozen values after the step).
:func:`cga_freeze` is the optax transform doing this; chain it last.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmodels.tree import map_with_path
from quant.qarray import match_rule

__all__ = ["statsq_scale", "statsq_levels", "statsq_fake_quant", "statsq_unconfident", "cga_freeze"]


def _check_bits(bits):
    if isinstance(bits, jax.core.Tracer):  # a traced integer scalar: one compiled QAT step for every bit-width
        return
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")


def statsq_scale(w: jax.Array, out_axis: int = -1) -> jax.Array:
    """``s = 2 mean|W|`` over every axis but ``out_axis`` (keepdims); per tensor for 1-D ``w``."""
    wa = jnp.abs(w.astype(jnp.float32))
    if w.ndim < 2:
        return 2 * jnp.mean(wa, keepdims=True)
    oa = out_axis % w.ndim
    return 2 * jnp.mean(wa, axis=tuple(a for a in range(w.ndim) if a != oa), keepdims=True)


def _u(w, bits, out_axis):
    s = jax.lax.stop_gradient(jnp.maximum(statsq_scale(w, out_axis), 1e-12))
    n = (jnp.left_shift(1, bits - 1).astype(jnp.float32) if isinstance(bits, jax.core.Tracer)  # traced bits
         else float(2 ** (bits - 1)))
    c = jnp.clip(w.astype(jnp.float32) / s, -1.0, 1.0 - 1e-6)
    return n * c - 0.5, s, n


def statsq_levels(w: jax.Array, bits: int, out_axis: int = -1) -> jax.Array:
    """Integer levels ``round(n c - 1/2)`` in ``[-n, n-1]``."""
    _check_bits(bits)
    u, _, _ = _u(w, bits, out_axis)
    return jnp.round(u)


def statsq_fake_quant(w: jax.Array, bits: int, out_axis: int = -1) -> jax.Array:
    """StatsQ ``W_hat`` with identity straight-through gradient."""
    _check_bits(bits)
    u, s, n = _u(jax.lax.stop_gradient(w), bits, out_axis)
    w_hat = (s * (jnp.round(u) + 0.5) / n).astype(w.dtype)
    return w + jax.lax.stop_gradient(w_hat - w)


def statsq_unconfident(w: jax.Array, bits: int, boundary_range: float, out_axis: int = -1) -> jax.Array:
    """Boolean mask of weights within ``boundary_range`` of a decision threshold (the ones CGA keeps training)."""
    _check_bits(bits)
    u, _, n = _u(w, bits, out_axis)
    d = u - jnp.floor(u)  # position inside [i, i+1): the threshold between level i and i+1 sits at 1/2
    near = jnp.abs(d - 0.5) <= boundary_range
    i = jnp.floor(u)
    return near & (i >= -n) & (i <= n - 2)


class CGAState(NamedTuple):
    count: jax.Array
    frozen_fraction: jax.Array


def cga_freeze(rules, boundary_range: float = 0.005, start_step: int = 0) -> optax.GradientTransformation:
    """Zero the updates of confidently-binned weights (see module docstring) from update ``start_step`` on (the
    annealing phase after the main QAT phase; before it, updates pass unchanged).

    ``rules``: ``[(regex, bits or None), ...]`` (first match wins) naming the StatsQ-quantized leaves and their bits;
    other leaves pass through. The state records the frozen fraction over matched weights (a metric).
    """
    if not 0.0 <= boundary_range <= 0.5:
        raise ValueError(f"boundary_range must be in [0, 0.5], got {boundary_range}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")

    def init(params):
        return CGAState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("cga_freeze needs params: call tx.update(grads, state, params)")
        counts = []

        def fn(path, u, p):
            bits = match_rule(path, rules)
            if bits is None or jnp.ndim(p) < 2:
                return u
            keep = statsq_unconfident(p, bits, boundary_range) | (state.count < start_step)
            counts.append((jnp.sum(~keep), keep.size))
            return jnp.where(keep, u, jnp.zeros_like(u))

        out = map_with_path(fn, updates, params)
        if counts:
            frozen = sum(c for c, _ in counts) / float(sum(n for _, n in counts))
        else:
            frozen = jnp.zeros((), jnp.float32)
        return out, CGAState(state.count + 1, jnp.asarray(frozen, jnp.float32))

    return optax.GradientTransformation(init, update)
