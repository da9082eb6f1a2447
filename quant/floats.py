"""Low-precision float grids: FP8 (E4M3 "fn", E5M2), FP6 (E3M2, E2M3) and FP4 (E2M1) -- rounding, bit patterns and
special values. Re-exported by :mod:`quant.formats`.

Rounding: round to nearest, ties to even, with subnormals, *saturating* finite values at ``+-max`` (where a plain
``ml_dtypes`` cast would overflow to inf / NaN). Bit patterns are ``sign | exponent | mantissa``, identical to
``ml_dtypes``' storage.

Special values (NaN, +-inf) follow ``ml_dtypes``' cast (``np.float32(x).astype(ml_dtypes.<dtype>)``) exactly:

============  ==========================================  =======================  ===========================
format        NaN in                                      +-inf in                 codes that decode to specials
============  ==========================================  =======================  ===========================
e4m3 (fn)     NaN, code ``0x7F`` / ``0xFF`` (sign kept)    NaN (no inf in e4m3fn)   ``0x7F``, ``0xFF`` -> NaN
e5m2          NaN, code ``0x7E`` / ``0xFE`` (sign kept)    +-inf, ``0x7C`` / ``0xFC``  ``0x7C/0xFC`` -> +-inf,
                                                                                   ``0x7D-0x7F``, ``0xFD-0xFF`` -> NaN
e3m2/e2m3/e2m1  no NaN: see :mod:`quant.formats`          saturates to +-max       none
============  ==========================================  =======================  ===========================

So only finite overflow differs from a plain cast: ``ml_dtypes`` turns ``1e6`` into NaN (e4m3) or inf (e5m2), here it
becomes ``+-max``. The FP6/FP4 ("fn", finite-only) formats cannot store NaN: ``ml_dtypes`` silently casts NaN to
``0``; :mod:`quant.formats` refuses it instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["FLOAT_SPECS", "float_max", "float_emax", "has_nan", "round_to_float", "round_to_float_generic",
           "float_encode", "float_decode"]

# name: (exponent bits, mantissa bits, ml_dtypes dtype name)
FLOAT_SPECS = {
    "e4m3": (4, 3, "float8_e4m3fn"),
    "e5m2": (5, 2, "float8_e5m2"),
    "e3m2": (3, 2, "float6_e3m2fn"),
    "e2m3": (2, 3, "float6_e2m3fn"),
    "e2m1": (2, 1, "float4_e2m1fn"),
}


def float_max(name: str) -> float:
    """Largest finite value of a float format: e5m2 reserves its top exponent for inf/NaN (IEEE style); e4m3fn
    reserves only mantissa 111 at the top exponent for NaN; the fp6/fp4 "fn" formats have no specials."""
    e, m, _ = FLOAT_SPECS[name]
    bias = 2 ** (e - 1) - 1
    if name == "e5m2":
        return (2 - 2.0 ** -m) * 2.0 ** (2 ** e - 2 - bias)
    if name == "e4m3":
        return (2 - 2.0 ** (1 - m)) * 2.0 ** (2 ** e - 1 - bias)
    return (2 - 2.0 ** -m) * 2.0 ** (2 ** e - 1 - bias)


def float_emax(name: str) -> int:
    """Exponent of the largest power of two of the format, ``floor(log2 max)`` (OCP MX ``emax_elem``): e4m3 8,
    e5m2 15, e3m2 4, e2m3 2, e2m1 2."""
    e, _, _ = FLOAT_SPECS[name]
    bias = 2 ** (e - 1) - 1
    return 2 ** e - (2 if name == "e5m2" else 1) - bias


def has_nan(name: str) -> bool:
    """Whether the format has NaN codes (only the FP8 formats)."""
    return name in ("e4m3", "e5m2")


def _specials(x: jax.Array, r: jax.Array, name: str) -> jax.Array:
    """Put the specials of ``x`` back into the finite rounding ``r`` (see the module table)."""
    if name == "e5m2":
        return jnp.where(jnp.isfinite(x), r, x)  # NaN -> NaN, +-inf -> +-inf
    if name == "e4m3":
        return jnp.where(jnp.isfinite(x), r, jnp.where(jnp.isinf(x), jnp.copysign(jnp.nan, x), x))
    return r  # finite-only formats: +-inf saturated by the clip, NaN stays NaN (refused by quant.formats)


# Formats whose XLA convert is supported on every backend (fp6/fp4 converts fail to compile on XLA:CPU).
_NATIVE_CAST = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def round_to_float(x: jax.Array, name: str) -> jax.Array:
    """Round to the nearest value of float format ``name`` (ties to even, subnormals, saturating finite values at
    +-max; NaN/inf as in the module table), float32.

    FP8 uses XLA's native convert of the clipped value (fast; tested bit-exact against ``ml_dtypes``); the other
    formats use :func:`round_to_float_generic`.
    """
    if name in _NATIVE_CAST:
        fmax = float_max(name)
        x = jnp.asarray(x, jnp.float32)
        r = jnp.clip(x, -fmax, fmax).astype(_NATIVE_CAST[name]).astype(jnp.float32)
        return _specials(x, r, name)
    return round_to_float_generic(x, name)


def round_to_float_generic(x: jax.Array, name: str) -> jax.Array:
    """Round to the nearest value of float format ``name`` in float32 arithmetic (no low-precision dtype needed).

    With ``e`` the unbiased exponent of ``|x|`` (``x = m 2^e``, ``1 <= m < 2``) clamped below at ``1 - bias``, the
    spacing of the grid around ``x`` is ``q = 2^(e - mantissa_bits)`` and the result is ``q * rne(x / q)``. All
    divisions are by powers of two, hence exact in float32. Specials as :func:`round_to_float`.
    """
    ebits, mbits, _ = FLOAT_SPECS[name]
    bias = 2 ** (ebits - 1) - 1
    fmax = float_max(name)
    x0 = jnp.asarray(x, jnp.float32)
    x = jnp.clip(x0, -fmax, fmax)
    _, e = jnp.frexp(x)  # x = f * 2^e, 0.5 <= |f| < 1, so floor(log2|x|) = e - 1
    e = jnp.maximum(e - 1, 1 - bias)
    quantum = jnp.ldexp(jnp.ones_like(x), e - mbits)
    return _specials(x0, jnp.clip(jnp.round(x / quantum) * quantum, -fmax, fmax), name)


def float_encode(v: jax.Array, name: str) -> jax.Array:
    """Bit pattern (uint8) of an already-rounded value ``v``: ``sign << (E+M) | exp_field << M | mantissa``; NaN
    and inf as in the module table (the finite-only formats have no code for NaN: it encodes as ``+-0``)."""
    ebits, mbits, _ = FLOAT_SPECS[name]
    bias = 2 ** (ebits - 1) - 1
    v = jnp.asarray(v, jnp.float32)
    sign = (jnp.signbit(v)).astype(jnp.int32)
    finite = jnp.isfinite(v)
    a = jnp.where(finite, jnp.abs(v), 0.0)
    _, e = jnp.frexp(a)
    e = e - 1
    normal = a >= 2.0 ** (1 - bias)  # (frexp(0) has exponent 0, so test the magnitude, not e)
    e = jnp.where(normal, e, 1 - bias)
    mant = jnp.ldexp(a, mbits - e)  # a / 2^(e - M): in [2^M, 2^(M+1)) for normals, [0, 2^M) for subnormals
    mant = mant.astype(jnp.int32) - jnp.where(normal, 2 ** mbits, 0)
    efield = jnp.where(normal, e + bias, 0)
    mag = (efield << mbits) | mant
    top = 2 ** (ebits + mbits) - 1  # exponent and mantissa all ones
    if name == "e4m3":
        mag = jnp.where(finite, mag, top)  # NaN (and inf, which e4m3fn maps to NaN)
    elif name == "e5m2":
        mag = jnp.where(finite, mag, jnp.where(jnp.isnan(v), top - 1, top - 3))  # 0x7E NaN, 0x7C inf
    return ((sign << (ebits + mbits)) | mag).astype(jnp.uint8)


def float_decode(code: jax.Array, name: str) -> jax.Array:
    """Value (float32) of each bit pattern: every code of the format, NaN/inf codes included."""
    ebits, mbits, _ = FLOAT_SPECS[name]
    bias = 2 ** (ebits - 1) - 1
    code = jnp.asarray(code).astype(jnp.int32)
    sign = (code >> (ebits + mbits)) & 1
    efield = (code >> mbits) & (2 ** ebits - 1)
    mant = code & (2 ** mbits - 1)
    normal = efield > 0
    sig = jnp.where(normal, mant + 2 ** mbits, mant).astype(jnp.float32)
    e = jnp.where(normal, efield - bias, 1 - bias)
    mag = jnp.ldexp(sig, e - mbits)
    if name == "e4m3":
        mag = jnp.where((efield == 2 ** ebits - 1) & (mant == 2 ** mbits - 1), jnp.nan, mag)
    elif name == "e5m2":
        mag = jnp.where(efield == 2 ** ebits - 1, jnp.where(mant == 0, jnp.inf, jnp.nan), mag)
    return jnp.where(sign == 1, -mag, mag)
