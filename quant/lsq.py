"""LSQ and LSQ+: learned step size (and offset) quantization.

LSQ (Esser et al. 2020, "Learned Step Size Quantization"), with ``Q_N, Q_P`` the level range
(signed: ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``; unsigned: ``Q_N = 0``, ``Q_P = 2^b - 1``)::

    x_hat = round(clip(x / s, -Q_N, Q_P)) * s
    d x_hat / d s = -x/s + round(x/s)   if -Q_N <= x/s <= Q_P;   -Q_N below;   Q_P above      (times g)
    d x_hat / d x = 1 inside (boundaries included), 0 outside;   g = 1 / sqrt(N * Q_P)

(``N`` = number of elements sharing the step ``s``), obtained exactly by autodiff through ``round_pass`` (identity
gradient for ``round``) and ``grad_scale`` (value ``s``, gradient ``g ds``) as in the paper's pseudo-code.
Initialisation: ``s = 2 mean|x| / sqrt(Q_P)``.

LSQ+ (Bhalgat et al. 2020, "LSQ+: Improving low-bit quantization through learnable offsets and better
initialization") adds a learnable offset ``beta`` (same gradient scale)::

    x_hat = round(clip((x - beta) / s, -Q_N, Q_P)) * s + beta

initialised from the range, ``s = (max - min) / (Q_N + Q_P)``, ``beta = min + Q_N s`` (so ``min`` maps to ``-Q_N``),
or for weights ``s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)``, ``beta = 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from quant.fake_quant import ste_round

__all__ = ["lsq_range", "grad_scale", "round_pass", "lsq_fake_quant", "lsq_grad_scale", "lsq_init", "lsqplus_init",
           "LSQParams", "lsq_levels"]


class LSQParams(NamedTuple):
    """Learned quantizer parameters: the step size ``step`` ``s`` (a scalar or one per channel, broadcast against ``x``)
    and, for LSQ+, the learnable ``offset`` ``beta`` (None: LSQ, no offset)."""

    step: jax.Array
    offset: jax.Array | None = None


def lsq_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """``(Q_N, Q_P)``. ``bits`` may be a traced integer scalar (one compiled QAT step for every bit-width): the
    range is then float32 arrays (not range-checked)."""
    if isinstance(bits, jax.core.Tracer):
        half = jnp.left_shift(1, jnp.asarray(bits, jnp.int32) - 1)  # 2^(b-1), exact
        if signed:
            return half.astype(jnp.float32), (half - 1).astype(jnp.float32)  # bits=1: (1, 0) as below
        return jnp.zeros((), jnp.float32), (2 * half - 1).astype(jnp.float32)
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
    if signed:
        if bits == 1:
            return 1, 0  # degenerate; use binary formats for 1 bit
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def grad_scale(x: jax.Array, g) -> jax.Array:
    """Value ``x``, gradient multiplied by ``g``."""
    return x * g + jax.lax.stop_gradient(x - x * g)


def round_pass(x: jax.Array) -> jax.Array:
    """``round(x)`` with identity gradient."""
    return ste_round(x)


def lsq_grad_scale(x_shape, step_shape, bits: int, signed: bool = True) -> float:
    """``g = 1 / sqrt(N * Q_P)`` with ``N`` the number of elements per step."""
    n = 1
    for d in x_shape:
        n *= d
    m = 1
    for d in step_shape:
        m *= d
    _, qp = lsq_range(bits, signed)
    if isinstance(qp, jax.Array):  # traced bits
        return jax.lax.rsqrt(max(n // max(m, 1), 1) * jnp.maximum(qp, 1.0))
    return 1.0 / float(max(n // max(m, 1), 1) * max(qp, 1)) ** 0.5


def lsq_fake_quant(x: jax.Array, step: jax.Array, bits: int, signed: bool = True, offset: jax.Array | None = None,
                   g: float | None = None) -> jax.Array:
    """LSQ (``offset=None``) or LSQ+ fake quantization; ``step``/``offset`` broadcast against ``x``."""
    qn, qp = lsq_range(bits, signed)
    if g is None:
        g = lsq_grad_scale(x.shape, jnp.shape(step), bits, signed)
    s = grad_scale(jnp.asarray(step, jnp.float32), g)
    xf = x.astype(jnp.float32)
    if offset is not None:
        b = grad_scale(jnp.asarray(offset, jnp.float32), g)
        xf = xf - b
    v = xf / s
    v = jnp.where(v < -qn, -qn, jnp.where(v > qp, qp, v))  # inclusive range: gradient 1 on the boundary
    y = round_pass(v) * s
    if offset is not None:
        y = y + b
    return y.astype(x.dtype)


def lsq_levels(x: jax.Array, step: jax.Array, bits: int, signed: bool = True, offset=None) -> jax.Array:
    """Integer levels ``round(clip((x - beta) / s, -Q_N, Q_P))`` (for oscillation tracking and export)."""
    qn, qp = lsq_range(bits, signed)
    xf = x.astype(jnp.float32) - (0.0 if offset is None else offset)
    return jnp.round(jnp.clip(xf / step, -qn, qp))


def _reduce_axes(x, per_channel_axis):
    if per_channel_axis is None:
        return tuple(range(x.ndim))
    ax = per_channel_axis % x.ndim
    return tuple(a for a in range(x.ndim) if a != ax)


def lsq_init(x: jax.Array, bits: int, signed: bool = True, channel_axis: int | None = -1) -> LSQParams:
    """``s = 2 mean|x| / sqrt(Q_P)`` per channel (``channel_axis``) or per tensor (``None``), keepdims."""
    _, qp = lsq_range(bits, signed)
    axes = _reduce_axes(x, channel_axis) if x.ndim > 1 else tuple(range(x.ndim))
    s = 2 * jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True) / jnp.sqrt(float(max(qp, 1)))
    return LSQParams(jnp.maximum(s, 1e-8), None)


def lsqplus_init(x: jax.Array, bits: int, signed: bool = True, channel_axis: int | None = -1,
                 method: str = "minmax") -> LSQParams:
    """LSQ+ initialisation: ``"minmax"`` (activations: ``s = (max-min)/(Q_N+Q_P)``, ``beta = min + Q_N s``) or
    ``"3sigma"`` (weights: ``s = max(|mu-3 sigma|, |mu+3 sigma|) / 2^(b-1)``, ``beta = 0``)."""
    qn, qp = lsq_range(bits, signed)
    xf = x.astype(jnp.float32)
    axes = _reduce_axes(xf, channel_axis) if xf.ndim > 1 else tuple(range(xf.ndim))
    if method == "minmax":
        lo, hi = jnp.min(xf, axes, keepdims=True), jnp.max(xf, axes, keepdims=True)
        s = jnp.maximum((hi - lo) / (qn + qp), 1e-8)
        return LSQParams(s, lo + qn * s)
    if method == "3sigma":
        mu, sd = jnp.mean(xf, axes, keepdims=True), jnp.std(xf, axes, keepdims=True)
        s = jnp.maximum(jnp.maximum(jnp.abs(mu - 3 * sd), jnp.abs(mu + 3 * sd)) / 2 ** (bits - 1), 1e-8)
        return LSQParams(s, jnp.zeros_like(s))
    raise ValueError(f"method must be 'minmax' or '3sigma', got {method!r}")
