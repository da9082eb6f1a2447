"""Activation fake quantization: dynamic (per token / per tensor, computed on the fly) and static (calibrated).

Dynamic per-token (e.g. LLM.int8 / SmoothQuant W8A8 "per-token" activations), for each row ``x_t`` (last axis)::

    symmetric:  s_t = max|x_t| / (2^(b-1) - 1),  x_hat = s_t clip(round(x / s_t), -2^(b-1), 2^(b-1) - 1)
    asymmetric: s_t = (max x_t - min x_t) / (2^b - 1), z_t = round(-min x_t / s_t), x_hat = s_t (q - z_t)

Static: one scale per tensor (or per channel) from calibration statistics, ``s = amax / (2^(b-1) - 1)`` with
``amax`` the running maximum of ``|x|`` over calibration batches (``calibrate_amax``); values outside ``[-amax, amax]``
are clipped and get zero gradient (clipped STE). All use :func:`quant.fake_quant` (straight-through).
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp

from quant.fake_quant import fake_quant
from quant.formats import IntFormat, QParams

__all__ = ["dynamic_act_quant", "static_act_quant", "amax_stat", "calibrate_amax"]


def _fmt(bits, symmetric):
    return IntFormat(bits, symmetric=symmetric, granularity="tensor")


def dynamic_act_quant(x: jax.Array, bits: int = 8, granularity: str = "token", symmetric: bool = True) -> jax.Array:
    """Fake-quantize ``x`` with scales from its own statistics: per ``"token"`` (last axis reduced) or ``"tensor"``."""
    if granularity not in ("token", "tensor"):
        raise ValueError(f"granularity must be 'token' or 'tensor', got {granularity!r}")
    fmt = _fmt(bits, symmetric)
    xs = jax.lax.stop_gradient(x).astype(jnp.float32)
    axes = (-1,) if granularity == "token" else tuple(range(x.ndim))
    if symmetric:
        s = jnp.max(jnp.abs(xs), axis=axes, keepdims=True) / (2 ** (bits - 1) - 1)
        s = jnp.where(s > 0, s, 1.0)
        return fake_quant(x, fmt, QParams(s, None))
    lo = jnp.minimum(jnp.min(xs, axis=axes, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(xs, axis=axes, keepdims=True), 0.0)
    s = (hi - lo) / (2 ** bits - 1)
    s = jnp.where(s > 0, s, 1.0)
    z = jnp.clip(jnp.round(-lo / s), 0, 2 ** bits - 1)
    return fake_quant(x, fmt, QParams(s, z))


def static_act_quant(x: jax.Array, amax: jax.Array, bits: int = 8) -> jax.Array:
    """Symmetric fake quantization with a calibrated ``amax`` (scalar or broadcastable per channel)."""
    s = jnp.asarray(amax, jnp.float32) / (2 ** (bits - 1) - 1)
    s = jnp.where(s > 0, s, 1.0)
    return fake_quant(x, _fmt(bits, True), QParams(jax.lax.stop_gradient(s), None), ste="clipped")


def amax_stat(x: jax.Array, per_channel: bool = False, percentile: float | None = None) -> jax.Array:
    """``max|x|`` over everything (or all but the last axis), or a percentile of ``|x|`` to clip outliers."""
    a = jnp.abs(x.astype(jnp.float32))
    if per_channel:
        a = a.reshape(-1, a.shape[-1])
        return jnp.max(a, 0) if percentile is None else jnp.percentile(a, percentile, axis=0)
    return jnp.max(a) if percentile is None else jnp.percentile(a, percentile)


def calibrate_amax(batches: Iterable[jax.Array], per_channel: bool = False,
                   percentile: float | None = None) -> jax.Array:
    """Running maximum of :func:`amax_stat` over calibration batches."""
    out = None
    for x in batches:
        a = amax_stat(x, per_channel, percentile)
        out = a if out is None else jnp.maximum(out, a)
    if out is None:
        raise ValueError("calibrate_amax needs at least one batch")
    return out
