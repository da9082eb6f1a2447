"""OCP Microscaling (MX) formats v1.0: MXFP8 (E4M3, E5M2), MXFP6 (E3M2, E2M3), MXFP4 (E2M1).

Rouhani et al. 2023, "Microscaling Data Formats for Deep Learning", and the OCP "Microscaling Formats (MX)
Specification v1.0" (section 6.3). A block of ``k = 32`` consecutive elements (along the input axis, the reduction
axis of a matmul) shares one E8M0 scale ``X = 2^e``::

    e   = clamp(floor(log2 max_i |V_i|) - emax_elem, -127, 127)        (emax_elem = floor(log2 max_elem))
    P_i = RNE_elem(clip(V_i / X, -max_elem, max_elem))                  (saturating cast to the element format)
    V_hat_i = X * P_i

``emax_elem`` is 8 (E4M3), 15 (E5M2), 4 (E3M2), 2 (E2M3), 2 (E2M1). ``floor(log2 amax)`` is read from the float32
exponent bits (an all-zero block, or one whose amax is subnormal, gets ``e = -127``). The scale is stored as the
E8M0 byte ``e + 127`` (``0..254``; ``0xFF`` = NaN, the only E8M0 special), so a packed MX tensor takes
``elem_bits + 8 / 32`` bits per element. Division and multiplication by ``X`` are done as two exact multiplications
by normal powers of two, so ``e = -127`` (``X = 2^-127``, a float32 subnormal) is exact on backends that flush
subnormals.

Non-finite input: a block containing NaN or +-inf gets the NaN scale ``0xFF`` and dequantizes to NaN in every element
(a non-finite weight never comes back finite). torchao (``to_mx``, ``ScaleCalculationMode.FLOOR``, tested bit for bit
against ``tests/data/quant_reference.npz``) does the same for NaN, but for +-inf it keeps a finite scale
``2^(128 - emax)`` and saturates the inf element. torchao also divides an ``e = -127`` block by ``2^-126`` (it
clamps the float scale to the smallest normal) while decoding with ``2^-127``; here both use ``2^-127``.

This is *not* :class:`quant.formats.FloatFormat` ``(pow2_scale=True)``: that mode rounds ``amax / max_elem`` *up* to
a power of two (nothing clips); MX rounds ``amax``'s exponent *down* and saturates, so in the top part of each binade
(``amax / 2^floor(log2 amax) > max_elem / 2^emax_elem``, e.g. above 1.5 for E2M1) the MX scale is half of it and the
largest elements clip (``amax = 7`` in MXFP4: ``X = 1``, ``7 -> 6``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from quant.floats import FLOAT_SPECS, float_emax, float_max, round_to_float

__all__ = ["MXFormat", "MX_ELEMENTS", "MXFP8_E4M3", "MXFP8_E5M2", "MXFP6_E3M2", "MXFP6_E2M3", "MXFP4_E2M1",
           "E8M0_NAN", "e8m0_from_amax", "e8m0_to_float", "mx_elements", "mx_scale_mul"]

MX_ELEMENTS = ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1")
E8M0_BIAS = 127
E8M0_NAN = 255


@dataclasses.dataclass(frozen=True)
class MXFormat:
    """OCP MX format (see module docstring): ``elem`` in ``MX_ELEMENTS``, one E8M0 scale per ``group_size`` (32 in
    the spec) consecutive elements along ``in_axis`` (Dense kernels ``[in, out]``: the input axis, the matmul's
    reduction axis), for every other index."""

    elem: str = "e2m1"
    group_size: int = 32
    in_axis: int = -2
    out_axis: int = -1
    granularity: str = dataclasses.field(default="group", init=False)
    clip_ratio: float = dataclasses.field(default=1.0, init=False)
    pow2_scale: bool = dataclasses.field(default=False, init=False)  # the round-up mode; MX has its own rule

    def __post_init__(self):
        if self.elem not in MX_ELEMENTS:
            raise ValueError(f"MXFormat elem must be one of {MX_ELEMENTS}, got {self.elem!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")

    @property
    def bits(self) -> int:
        e, m, _ = FLOAT_SPECS[self.elem]
        return 1 + e + m

    @property
    def symmetric(self) -> bool:
        return True


MXFP8_E4M3 = MXFormat("e4m3")
MXFP8_E5M2 = MXFormat("e5m2")
MXFP6_E3M2 = MXFormat("e3m2")
MXFP6_E2M3 = MXFormat("e2m3")
MXFP4_E2M1 = MXFormat("e2m1")


def e8m0_from_amax(amax: jax.Array, elem: str) -> jax.Array:
    """E8M0 scale byte (uint8) of blocks with absolute maxima ``amax``: ``clamp(floor(log2 amax) - emax_elem,
    -127, 127) + 127``, ``0xFF`` where ``amax`` is not finite."""
    amax = jnp.asarray(amax, jnp.float32)
    exp = ((jax.lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF) - 127  # floor(log2) of a normal amax
    e = jnp.clip(exp - float_emax(elem), -E8M0_BIAS, E8M0_BIAS)
    return jnp.where(jnp.isfinite(amax), e + E8M0_BIAS, E8M0_NAN).astype(jnp.uint8)


def _pow2(k: jax.Array) -> jax.Array:
    """Exact float32 ``2^k`` for integer ``k`` in ``[-126, 127]`` (built from the exponent bits)."""
    return jax.lax.bitcast_convert_type((k + 127).astype(jnp.int32) << 23, jnp.float32)


def mx_scale_mul(x: jax.Array, scale_code: jax.Array, inverse: bool = False) -> jax.Array:
    """``x * X`` (or ``x / X`` with ``inverse``) for E8M0 bytes ``scale_code`` (any integer-valued dtype), exactly:
    two multiplications by normal powers of two. NaN where the code is ``0xFF``."""
    c = jnp.asarray(scale_code).astype(jnp.int32)
    k = jnp.where(inverse, E8M0_BIAS - c, c - E8M0_BIAS)
    k1 = k >> 1
    y = jnp.asarray(x, jnp.float32) * _pow2(k1) * _pow2(k - k1)
    return jnp.where(c == E8M0_NAN, jnp.nan, y)


def e8m0_to_float(scale_code: jax.Array) -> jax.Array:
    """``X = 2^(code - 127)`` as float32 (NaN for ``0xFF``; ``2^-127`` is a float32 subnormal)."""
    return mx_scale_mul(jnp.ones(jnp.shape(scale_code), jnp.float32), scale_code)


def mx_elements(x: jax.Array, scale_code: jax.Array, elem: str) -> jax.Array:
    """Element values ``P = RNE_elem(clip(x / X, -max, max))`` (float32) given the broadcast E8M0 bytes."""
    return round_to_float(jnp.clip(mx_scale_mul(x, scale_code, inverse=True), -float_max(elem), float_max(elem)),
                          elem)
