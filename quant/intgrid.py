"""The uniform integer grid: one definition of scale and zero point, shared by :class:`quant.formats.IntFormat`,
RTN / GPTQ (:func:`quant.ptq._common.minmax_params`, IST-DASLab ``Quantizer.find_params``), AWQ
(mit-han-lab/llm-awq ``pseudo_quantize_tensor``) and the fake quantizers. Re-exported by :mod:`quant.formats`.

Every method reduces a block to statistics (``lo``/``hi`` or ``amax``) under its own conventions (whether the range
is widened to contain 0, what an all-zero block gets, a floor on the range) and then calls one of two grids:

* **min/max grid** (:func:`minmax_grid`), codes ``q in [0, 2^b - 1]``, ``x_hat = s (q - z)``::

      s = max(hi - lo, min_range) / (2^b - 1)        z = clip(round(-lo / s), 0, 2^b - 1)

  Used asymmetric by IntFormat, RTN/GPTQ ``sym=False`` and AWQ ``zero_point=True``. With ``offset_zero=True`` the
  zero point is the constant ``z = 2^(b-1)`` instead: this is the **GPTQ offset grid** of RTN/GPTQ ``sym=True``
  (the reference sets ``lo = -amax``, ``hi = amax``, so ``s = 2 amax / (2^b - 1)``; levels
  ``s * [-2^(b-1), 2^(b-1) - 1]``, so ``+amax`` is clipped to ``(2^(b-1) - 1) / (2^(b-1) - 1/2) * amax``, 7/7.5 at
  4 bits -- the reference's quirk, kept for parity).
* **absmax grid** (:func:`absmax_scale`), signed levels ``q in [-2^(b-1), 2^(b-1) - 1]``, ``x_hat = s q``::

      s = max(amax, min_amax) / (2^(b-1) - 1)

  Used by ``IntFormat(symmetric=True)`` and AWQ ``zero_point=False``: ``+-amax`` are exactly representable.

The two symmetric grids are both legitimate and give different weights (``rtn(sym=True)`` vs
``rtn_format(IntFormat(b, symmetric=True))``); they are named apart here on purpose.

The divisions by the constants ``2^b - 1`` / ``2^(b-1) - 1`` are IEEE quotients (as NumPy / torch compute them):
the divisor is a full array of ``c`` behind ``jax.lax.optimization_barrier``, because XLA otherwise rewrites
``r / c`` (also ``r / broadcast(scalar)``, even a runtime scalar) into ``r * (1/c)``, 1 ulp off for about half
the inputs (under a caller's ``jax.vmap`` the divisor is unbatched and the rewrite comes back: call the grid on
the stacked rows instead) -- enough to flip a rounding tie (GPTQ ``sym``'s ``-amax``
lands exactly on ``-2^(b-1) + 1/2`` of the offset grid).

A scale that comes out ``<= float32 tiny`` (an all-zero block) is replaced by ``1`` (:func:`safe_scale`), so
``x / s`` is always finite. ``pow2=True`` rounds the scale up to a power of two, ``s = 2^ceil(log2 s)`` (before the
zero point is computed), as ZeroQuant-FP's shift-friendly scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["int_range", "safe_scale", "pow2_ceil", "minmax_grid", "absmax_scale"]


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer levels: ``[-2^(b-1), 2^(b-1) - 1]`` symmetric, ``[0, 2^b - 1]`` asymmetric."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def safe_scale(scale: jax.Array) -> jax.Array:
    """``s`` where ``s > float32 tiny``, else ``1`` (all-zero blocks; NaN scales become 1 too)."""
    tiny = jnp.finfo(jnp.float32).tiny
    return jnp.where(scale > tiny, scale, 1.0)


def pow2_ceil(scale: jax.Array) -> jax.Array:
    """``2^ceil(log2 s)``: the scale rounded *up* to a power of two (the range never shrinks)."""
    return jnp.exp2(jnp.ceil(jnp.log2(scale)))


def _divide(x: jax.Array, c: int) -> jax.Array:
    """``x / c`` as the IEEE quotient (see module docstring): the divisor is an array of x's shape that XLA's
    algebraic simplifier cannot see through."""
    x = jnp.asarray(x, jnp.float32)
    return x / jax.lax.optimization_barrier(jnp.full(x.shape, c, jnp.float32))


def minmax_grid(lo: jax.Array, hi: jax.Array, bits: int, *, min_range: float = 0.0, offset_zero: bool = False,
                pow2: bool = False) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point ``(s, z)`` of the min/max grid on ``[lo, hi]`` (see module docstring); float32, the
    shapes of ``lo``/``hi``. The caller decides ``lo``/``hi`` (e.g. widened to contain 0)."""
    maxq = 2 ** bits - 1
    r = hi - lo
    if min_range:
        r = jnp.maximum(r, min_range)
    s = safe_scale(_divide(r, maxq))
    if pow2:
        s = pow2_ceil(s)
    if offset_zero:
        return s, jnp.full_like(s, (maxq + 1) / 2)
    return s, jnp.clip(jnp.round(-lo / s), 0, maxq)


def absmax_scale(amax: jax.Array, bits: int, *, min_amax: float = 0.0, pow2: bool = False) -> jax.Array:
    """Scale of the absmax grid, ``s = max(amax, min_amax) / (2^(b-1) - 1)`` (see module docstring)."""
    if min_amax:
        amax = jnp.maximum(amax, min_amax)
    s = safe_scale(_divide(amax, 2 ** (bits - 1) - 1))
    return pow2_ceil(s) if pow2 else s
