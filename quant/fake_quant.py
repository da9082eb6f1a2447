"""Fake quantization ``x -> dequantize(quantize(x))`` with straight-through gradients (Bengio et al. 2013).

Forward: ``x_hat = Q(x)`` for any format (:mod:`quant.formats`). Backward (custom VJP):

* ``ste="identity"``: ``d x_hat / d x = 1`` everywhere (plain STE);
* ``ste="clipped"`` (default): ``d x_hat / d x = 1[lo <= x <= hi]``, zero outside the representable range
  ``[lo, hi]`` (:func:`quant.formats.representable_range`), as in the clipped STE of Hubara et al. / PACT.

Scales computed from ``x`` itself (``qparams=None``) are treated as constants (``stop_gradient``); learnable scales are
:mod:`quant.lsq`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from quant.formats import Format, QParams, compute_qparams, representable_range, round_trip

__all__ = ["fake_quant", "ste_round", "STE_MODES"]

STE_MODES = ("identity", "clipped")


@jax.custom_vjp
def ste_round(x: jax.Array) -> jax.Array:
    """``round(x)`` (half to even) with identity gradient."""
    return jnp.round(x)


ste_round.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fq(x, fmt, ste, scale, zero):
    return round_trip(x, fmt, QParams(scale, zero))


def _fq_fwd(x, fmt, ste, scale, zero):
    qp = QParams(scale, zero)
    y = round_trip(x, fmt, qp)
    if ste == "clipped":
        lo, hi = representable_range(fmt, qp, x.shape)
        mask = (x >= lo) & (x <= hi)
    else:
        mask = None
    return y, (mask, scale, zero)


def _fq_bwd(fmt, ste, res, g):
    mask, scale, zero = res
    gx = g if mask is None else jnp.where(mask, g, jnp.zeros_like(g))
    return gx, jnp.zeros_like(scale), None if zero is None else jnp.zeros_like(zero)


_fq.defvjp(_fq_fwd, _fq_bwd)


def fake_quant(x: jax.Array, fmt: Format, qparams: QParams | None = None, ste: str = "clipped") -> jax.Array:
    """``x_hat = Q_fmt(x)`` in ``x``'s dtype with a straight-through gradient (see module docstring).

    ``qparams`` default to :func:`quant.formats.compute_qparams` of ``stop_gradient(x)``; pass your own (compact or
    broadcastable) to quantize with fixed parameters, e.g. a GPTQ row with its group's scale. No gradient flows into
    ``qparams`` here.
    """
    if ste not in STE_MODES:
        raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")
    x = jnp.asarray(x)
    qp = compute_qparams(jax.lax.stop_gradient(x), fmt) if qparams is None else qparams
    scale = jax.lax.stop_gradient(jnp.asarray(qp.scale, jnp.float32))
    zero = None if qp.zero is None else jax.lax.stop_gradient(jnp.asarray(qp.zero, jnp.float32))
    return _fq(x, fmt, ste, scale, zero)
