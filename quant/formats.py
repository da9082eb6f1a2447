"""Number formats as data, and the elementwise quantize / dequantize maths for each.

A *format* is a small frozen dataclass (hashable: usable as a ``jax.jit`` static argument and as pytree aux data).
Every format shares the granularity fields that say which elements share one scale:

* ``"tensor"``: one scale for the whole tensor.
* ``"channel"``: one scale per output channel (``out_axis``, default ``-1``: Flax ``Dense`` kernels are
  ``[in, out]``, ``Conv`` kernels ``[kh, kw, in, out]``); reduced over every other axis.
* ``"group"``: groups of ``group_size`` consecutive elements along the input axis (``in_axis``, default ``-2``),
  one scale per (group, every other index) -- the GPTQ/AWQ "g128" layout.
* ``"input_channel"``: one scale per input channel, reduced over the output axis, optionally in groups of
  ``group_size`` output channels (Heo et al. 2023, "Rethinking Channel Dimensions to Isolate Outliers for
  Low-bit Weight Quantization of Large Language Models": per-IC quantization isolates outlier input channels).

Tensors with fewer than two dims (biases, norm scales) fall back to ``"tensor"`` for every granularity.

Quantization parameters (:class:`QParams`) are stored *compactly*: ``scale`` has the tensor's ndim, with size 1 on
reduced axes, the full size on kept axes and ``n // group_size`` on the grouped axis. :func:`expand` repeats them
back to the tensor's shape; any array that already broadcasts against the tensor is accepted as-is, so callers
(e.g. GPTQ updating one input row at a time) may pass their own per-row parameters.

Codes: :func:`encode` maps a tensor to *unsigned* integer codes in ``[0, 2**bits)`` (``uint8``), the form that
:mod:`quant.packing` packs; :func:`decode` maps codes back to values. For integer formats the code is the integer
level (asymmetric) or the level plus ``2**(bits-1)`` (symmetric, offset binary); for float and MX formats it is the
IEEE-like bit pattern ``sign | exponent | mantissa`` of the element (identical to ``ml_dtypes``' bit patterns, NaN
and inf included, see :mod:`quant.floats`); for NF4 the index of the level; for ternary ``q + 1``; for binary
``(q + 1) / 2``. MX scales are E8M0 bytes (:mod:`quant.mx`).

Non-finite input (NaN, +-inf):

* FP8 (``FloatFormat`` e4m3 / e5m2): scales come from the finite elements only; NaN and inf are encoded to
  ``ml_dtypes``' special codes and decoded back (e4m3fn has no inf: inf becomes NaN, as ``ml_dtypes``' cast does);
  ``dequantize(quantize(x))`` and ``round_trip(x)`` agree on them.
* MX (:class:`quant.mx.MXFormat`): the block gets the E8M0 NaN scale and dequantizes to NaN.
* Every other format (integer, FP6, FP4, NF4, ternary, binary) has no code for NaN or inf:
  :func:`compute_qparams` and :func:`encode` raise ``ValueError`` on concrete input before any work. Under
  ``jax.jit`` (values cannot raise) :func:`compute_qparams` gives every block that holds a non-finite value a NaN
  scale, so the block dequantizes to NaN -- never to a silent finite value. (:func:`encode` with caller-supplied
  parameters cannot do that: under ``jit`` such elements get arbitrary codes.)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import is_concrete
from quant.floats import (
    FLOAT_SPECS, float_decode, float_emax, float_encode, float_max, has_nan, round_to_float, round_to_float_generic,
)
from quant.intgrid import absmax_scale, int_range, minmax_grid, pow2_ceil, safe_scale
from quant.mx import MXFormat, e8m0_from_amax, mx_elements, mx_scale_mul

__all__ = [
    "GRANULARITIES", "IntFormat", "FloatFormat", "NF4Format", "TernaryFormat", "BinaryFormat", "Format",
    "QParams", "FLOAT_SPECS", "NF4_LEVELS", "int_range", "reduce_stats", "expand", "compute_qparams",
    "quantize_levels", "dequantize_levels", "encode", "decode", "round_trip", "round_to_float", "float_max",
    "representable_range", "round_to_float_generic", "float_encode", "float_decode", "float_emax", "has_nan",
    "MXFormat", "minmax_grid", "absmax_scale", "safe_scale", "pow2_ceil", "has_special_codes",
    "INT2", "INT3", "INT4", "INT8", "FP8_E4M3", "FP8_E5M2", "FP6_E3M2", "FP6_E2M3", "FP4_E2M1", "NF4", "TERNARY",
    "BINARY",
]

GRANULARITIES = ("tensor", "channel", "group", "input_channel")


def _check_granularity(fmt) -> None:
    if fmt.granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {fmt.granularity!r}")
    if fmt.granularity == "group" and (fmt.group_size is None or fmt.group_size < 1):
        raise ValueError("granularity='group' needs a positive group_size")
    if fmt.group_size is not None and fmt.group_size < 1:
        raise ValueError(f"group_size must be positive, got {fmt.group_size}")
    if not 0.0 < fmt.clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {fmt.clip_ratio}")


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """b-bit uniform integer quantization.

    symmetric:  ``s = clip_ratio * max|x| / (2^(b-1) - 1)``, ``q = clip(round(x / s), -2^(b-1), 2^(b-1) - 1)``,
    ``x_hat = s q``.
    asymmetric: ``lo = min(clip_ratio * min x, 0)``, ``hi = max(clip_ratio * max x, 0)`` (zero stays exactly
    representable, as in GPTQ), ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``,
    ``q = clip(round(x / s) + z, 0, 2^b - 1)``, ``x_hat = s (q - z)``.
    ``pow2_scale`` rounds ``s`` up to a power of two, ``s = 2^ceil(log2 s)`` (ZeroQuant-FP: shifts instead of
    multiplies; rounding up keeps the range unclipped). Both grids are :mod:`quant.intgrid`'s (the *absmax grid*
    and the *min/max grid*); GPTQ/RTN ``sym=True`` is a third, the *GPTQ offset grid* (see there).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    clip_ratio: float = 1.0
    pow2_scale: bool = False
    in_axis: int = -2
    out_axis: int = -1

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"IntFormat bits must be an int in [2, 8], got {self.bits!r}")
        _check_granularity(self)


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """Low-precision float (FP8 E4M3/E5M2, FP6 E3M2/E2M3, FP4 E2M1) with an optional scale.

    ``x_hat = s * RNE_fmt(clip(x / s, -max, max))`` where ``RNE_fmt`` rounds to the nearest value with ``m``
    mantissa bits and exponent ``>= 1 - bias`` (subnormals below), ties to even -- bit-exact with the ``ml_dtypes``
    cast of the clipped value (NaN/inf: see the module docstring and :mod:`quant.floats`).
    ``scaled=True``: ``s = clip_ratio * max|x| / max_fmt`` per granularity block, over the finite elements;
    ``scaled=False``: ``s = 1`` (a plain cast, saturating instead of overflowing).
    ``pow2_scale=True`` rounds ``s`` *up* to a power of two, ``s = 2^ceil(log2(amax / max_fmt))``, so nothing
    clips. This is **not** the OCP MX rule (which rounds the exponent of ``amax`` *down* and saturates, giving half
    this scale in the top of each binade): use :class:`quant.mx.MXFormat` for MXFP8/MXFP6/MXFP4.
    """

    name: str = "e4m3"
    scaled: bool = True
    granularity: str = "tensor"
    group_size: int | None = None
    clip_ratio: float = 1.0
    pow2_scale: bool = False
    in_axis: int = -2
    out_axis: int = -1

    def __post_init__(self):
        if self.name not in FLOAT_SPECS:
            raise ValueError(f"FloatFormat name must be one of {sorted(FLOAT_SPECS)}, got {self.name!r}")
        _check_granularity(self)

    @property
    def bits(self) -> int:
        e, m, _ = FLOAT_SPECS[self.name]
        return 1 + e + m

    @property
    def symmetric(self) -> bool:
        return True


# QLoRA (Dettmers et al. 2023) NormalFloat-4 levels: bitsandbytes' table (``functional.get_4bit_type("nf4")``, the
# values of ``create_normal_map(0.9677083)``), exact float32. Pinned by tests/quant/test_reference_formats.py to
# the table bitsandbytes 0.50.2 returns (tests/data/quant_reference.npz, scripts/make_quant_reference.py).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class NF4Format:
    """NormalFloat4 (QLoRA): ``s = absmax`` per block (default blocks of 64 along the input axis),
    ``q = argmin_i |x / s - NF4_LEVELS[i]|``, ``x_hat = s * NF4_LEVELS[q]``."""

    granularity: str = "group"
    group_size: int | None = 64
    clip_ratio: float = 1.0
    in_axis: int = -2
    out_axis: int = -1
    bits: int = dataclasses.field(default=4, init=False)
    symmetric: bool = dataclasses.field(default=True, init=False)
    pow2_scale: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        _check_granularity(self)


@dataclasses.dataclass(frozen=True)
class TernaryFormat:
    """BitNet b1.58 (Ma et al. 2024): ``s = mean|W|`` (absmean), ``q = clip(round(W / (s + eps)), -1, 1)``,
    ``x_hat = s q``. Stored in 2 bits."""

    granularity: str = "tensor"
    group_size: int | None = None
    clip_ratio: float = 1.0
    in_axis: int = -2
    out_axis: int = -1
    bits: int = dataclasses.field(default=2, init=False)
    symmetric: bool = dataclasses.field(default=True, init=False)
    pow2_scale: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        _check_granularity(self)


@dataclasses.dataclass(frozen=True)
class BinaryFormat:
    """Binary weights (XNOR-Net, Rastegari et al. 2016): ``s = mean|W|``, ``q = sign(W)`` (``sign(0) = +1``),
    ``x_hat = s q``. Stored in 1 bit."""

    granularity: str = "channel"
    group_size: int | None = None
    clip_ratio: float = 1.0
    in_axis: int = -2
    out_axis: int = -1
    bits: int = dataclasses.field(default=1, init=False)
    symmetric: bool = dataclasses.field(default=True, init=False)
    pow2_scale: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        _check_granularity(self)


Format = Union[IntFormat, FloatFormat, MXFormat, NF4Format, TernaryFormat, BinaryFormat]
"""Any number format of this module: what ``compute_qparams``, ``quantize_levels``, ``dequantize_levels``,
``round_trip`` and :func:`quant.fake_quant` accept."""

INT2 = IntFormat(2)
INT3 = IntFormat(3)
INT4 = IntFormat(4, granularity="group", group_size=128)
INT8 = IntFormat(8)
FP8_E4M3 = FloatFormat("e4m3")
FP8_E5M2 = FloatFormat("e5m2")
FP6_E3M2 = FloatFormat("e3m2")
FP6_E2M3 = FloatFormat("e2m3")
FP4_E2M1 = FloatFormat("e2m1", granularity="group", group_size=32)
NF4 = NF4Format()
TERNARY = TernaryFormat()
BINARY = BinaryFormat()


class QParams(NamedTuple):
    """Scale and zero point, compact (see module docstring). ``zero`` is ``None`` for symmetric formats; for
    asymmetric ints it holds integer values in the scale's dtype."""

    scale: jax.Array
    zero: jax.Array | None = None


# ----------------------------------------------------------------------------------------------------- granularity

def _axes(fmt, ndim: int) -> tuple[int, int]:
    return fmt.in_axis % ndim, fmt.out_axis % ndim


def _blocked(x: jax.Array, fmt):
    """Reshape ``x`` so that each scale block is reduced over the returned ``axes``; also return the compact shape."""
    ndim = x.ndim
    if fmt.granularity == "tensor" or ndim < 2:
        return x, tuple(range(ndim)), (1,) * ndim
    ia, oa = _axes(fmt, ndim)
    if ia == oa:
        raise ValueError(f"in_axis and out_axis resolve to the same axis {ia} for shape {x.shape}")
    if fmt.granularity == "channel":
        axes = tuple(a for a in range(ndim) if a != oa)
        return x, axes, tuple(x.shape[a] if a == oa else 1 for a in range(ndim))
    if fmt.granularity == "group":
        gax, g = ia, fmt.group_size
        keep_others = True
    else:  # input_channel: per input channel, reduced over the output axis (in groups of group_size if given)
        gax, g = oa, fmt.group_size or x.shape[oa]
        keep_others = False
    n = x.shape[gax]
    if n % g:
        raise ValueError(f"axis {gax} of shape {x.shape} (size {n}) is not divisible by group_size {g}")
    xb = x.reshape(x.shape[:gax] + (n // g, g) + x.shape[gax + 1:])
    if keep_others:  # group: one scale per (group, all other indices)
        axes = (gax + 1,)
        compact = tuple(n // g if a == gax else x.shape[a] for a in range(ndim))
    else:  # input_channel: one scale per (input channel, group of outputs), reduced over remaining axes
        axes = tuple(a if a < gax else a + 1 for a in range(ndim) if a not in (ia, gax)) + (gax + 1,)
        compact = tuple(n // g if a == gax else (x.shape[a] if a == ia else 1) for a in range(ndim))
    return xb, tuple(sorted(axes)), compact


def reduce_stats(x: jax.Array, fmt, fn) -> jax.Array:
    """Apply a reduction ``fn(blocked_x, axis=axes)`` per scale block and return it in compact shape
    (e.g. ``reduce_stats(w, fmt, jnp.max)`` is the block-wise max)."""
    xb, axes, compact = _blocked(x, fmt)
    return fn(xb, axis=axes).reshape(compact)


def expand(p: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    """Broadcast a compact parameter to ``shape``: axes whose size divides the tensor's are repeated (groups)."""
    if p is None:
        return None
    p = jnp.asarray(p)
    if p.ndim != len(shape):
        return p  # caller-provided, broadcasting
    for a, (ps, xs) in enumerate(zip(p.shape, shape)):
        if ps != xs and ps != 1:
            if xs % ps:
                raise ValueError(f"parameter shape {p.shape} does not tile tensor shape {shape} on axis {a}")
            p = jnp.repeat(p, xs // ps, axis=a)
    return p


# ----------------------------------------------------------------------------------------------------- non-finite

def has_special_codes(fmt: Format) -> bool:
    """Whether the format can store NaN/inf (FP8 codes, the MX NaN scale); see the module docstring."""
    return isinstance(fmt, MXFormat) or (isinstance(fmt, FloatFormat) and has_nan(fmt.name))


def _refuse_non_finite(x, fmt: Format, what: str) -> None:
    """Eager inputs only (a traced value cannot raise): ``ValueError`` on NaN/inf for formats without codes."""
    if has_special_codes(fmt) or not is_concrete(x):
        return
    finite = jnp.all(jnp.isfinite(jnp.asarray(x)))
    if not is_concrete(finite):  # a concrete constant inside a jit trace: staged out, no value either
        return
    if not bool(finite):
        raise ValueError(f"{what}: input has NaN or inf values, which {type(fmt).__name__}"
                         f"{'(' + fmt.name + ')' if isinstance(fmt, FloatFormat) else ''} cannot represent")


# ----------------------------------------------------------------------------------------------------- qparams

def compute_qparams(x: jax.Array, fmt: Format) -> QParams:
    """Scale (and zero point) per block from the tensor's statistics, in compact shape, float32.

    Int symmetric ``s = c max|x| / (2^(b-1)-1)``, asymmetric ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``
    (:mod:`quant.intgrid`, see :class:`IntFormat`); float ``s = c max|x| / max_fmt`` over finite elements (``1``
    unscaled); MX the E8M0 bytes of :mod:`quant.mx` (uint8); NF4 ``s = c max|x|``; ternary/binary
    ``s = c mean|x|``. All-zero blocks get ``s = 1``. Non-finite input: see the module docstring.
    """
    _refuse_non_finite(x, fmt, "compute_qparams")
    return _compute_qparams(x, fmt)


def _compute_qparams_impl(x: jax.Array, fmt: Format) -> QParams:
    x = jnp.asarray(x).astype(jnp.float32)
    if isinstance(fmt, MXFormat):
        return QParams(e8m0_from_amax(reduce_stats(jnp.abs(x), fmt, jnp.max), fmt.elem), None)
    c = fmt.clip_ratio
    if isinstance(fmt, IntFormat):
        if fmt.symmetric:
            s, z = absmax_scale(c * reduce_stats(jnp.abs(x), fmt, jnp.max), fmt.bits, pow2=fmt.pow2_scale), None
        else:
            lo = jnp.minimum(c * reduce_stats(x, fmt, jnp.min), 0.0)
            hi = jnp.maximum(c * reduce_stats(x, fmt, jnp.max), 0.0)
            s, z = minmax_grid(lo, hi, fmt.bits, pow2=fmt.pow2_scale)
    elif isinstance(fmt, FloatFormat):
        if not fmt.scaled:
            s, z = jnp.ones((1,) * x.ndim, jnp.float32), None
        else:
            amax = reduce_stats(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0), fmt, jnp.max)
            s, z = safe_scale(c * amax / float_max(fmt.name)), None
            s = pow2_ceil(s) if fmt.pow2_scale else s
    elif isinstance(fmt, NF4Format):
        s, z = safe_scale(c * reduce_stats(jnp.abs(x), fmt, jnp.max)), None
    elif isinstance(fmt, (TernaryFormat, BinaryFormat)):
        s, z = safe_scale(c * reduce_stats(jnp.abs(x), fmt, jnp.mean)), None
    else:
        raise TypeError(f"unknown format {fmt!r}")
    if not has_special_codes(fmt):  # traced non-finite input: NaN scale for its block (see module docstring)
        if isinstance(fmt, FloatFormat) and not fmt.scaled:  # one scale for the tensor, whatever the granularity
            bad = jnp.any(~jnp.isfinite(x)).reshape((1,) * x.ndim)
        else:
            bad = reduce_stats(~jnp.isfinite(x), fmt, jnp.any)
        s = jnp.where(bad, jnp.nan, jnp.broadcast_to(s, bad.shape))
    return QParams(s, z)


def representable_range(fmt: Format, qparams: QParams, shape) -> tuple[jax.Array, jax.Array]:
    """``(lo, hi)`` of the values the format can represent with these parameters (expanded to ``shape``); used by
    the clipped straight-through estimator."""
    s = expand(qparams.scale, shape)
    if isinstance(fmt, MXFormat):
        hi = mx_scale_mul(float_max(fmt.elem), s)
        return -hi, hi
    if isinstance(fmt, IntFormat):
        qmin, qmax = int_range(fmt.bits, fmt.symmetric)
        z = 0.0 if qparams.zero is None else expand(qparams.zero, shape)
        return s * (qmin - z), s * (qmax - z)
    if isinstance(fmt, FloatFormat):
        m = float_max(fmt.name)
        return -m * s, m * s
    return -s, s  # NF4, ternary and binary: levels span [-1, 1] * s


# ----------------------------------------------------------------------------------------------------- levels

def quantize_levels(x: jax.Array, fmt: Format, qparams: QParams) -> jax.Array:
    """The quantized *level* of each element, float32: the integer ``q`` for int formats (with zero point added for
    asymmetric), the rounded value ``RNE(x / s)`` for float formats (the element ``P`` for MX), the level index for
    NF4, ``{-1,0,1}`` / ``{-1,1}`` for ternary / binary. ``dequantize_levels`` inverts it."""
    return _quantize_levels(x, fmt, qparams)


def _quantize_levels_impl(x: jax.Array, fmt: Format, qparams: QParams) -> jax.Array:
    x = jnp.asarray(x).astype(jnp.float32)
    s = expand(qparams.scale, x.shape)
    if isinstance(fmt, MXFormat):
        return mx_elements(x, s, fmt.elem)
    if isinstance(fmt, IntFormat):
        qmin, qmax = int_range(fmt.bits, fmt.symmetric)
        if fmt.symmetric:
            return jnp.clip(jnp.round(x / s), qmin, qmax)
        return jnp.clip(jnp.round(x / s) + expand(qparams.zero, x.shape), qmin, qmax)
    if isinstance(fmt, FloatFormat):
        return round_to_float(x / s, fmt.name)
    if isinstance(fmt, NF4Format):
        y = jnp.clip(x / s, -1.0, 1.0)
        lv = jnp.asarray(NF4_LEVELS)
        mid = (lv[1:] + lv[:-1]) / 2  # nearest level = number of midpoints below y
        return jnp.sum(y[..., None] > mid, axis=-1).astype(jnp.float32)
    if isinstance(fmt, TernaryFormat):
        return jnp.clip(jnp.round(x / (s + 1e-8)), -1, 1)
    if isinstance(fmt, BinaryFormat):
        return jnp.where(x >= 0, 1.0, -1.0)
    raise TypeError(f"unknown format {fmt!r}")


def dequantize_levels(q: jax.Array, fmt: Format, qparams: QParams, dtype=jnp.float32) -> jax.Array:
    """The real values of quantized levels ``q`` (the inverse of :func:`quantize_levels`), in ``dtype``: ``q · s`` for
    symmetric int, float, ternary and binary formats, ``(q − z) · s`` for asymmetric int, ``NF4_LEVELS[q] · s`` for
    NF4 and the exact power-of-two scaling ``q · 2^(c − 127)`` for MX (``c`` the E8M0 scale byte); ``s`` (or ``c``)
    and ``z`` are ``qparams.scale`` / ``qparams.zero`` broadcast to ``q``'s shape."""
    return _dequantize_levels(q, fmt, qparams, dtype)


def _dequantize_levels_impl(q: jax.Array, fmt: Format, qparams: QParams, dtype=jnp.float32) -> jax.Array:
    q = jnp.asarray(q)
    s = expand(qparams.scale, q.shape)
    if isinstance(fmt, MXFormat):
        out = mx_scale_mul(q, s)
    elif isinstance(fmt, IntFormat) and not fmt.symmetric:
        out = (q - expand(qparams.zero, q.shape)) * s
    elif isinstance(fmt, NF4Format):
        out = jnp.asarray(NF4_LEVELS)[q.astype(jnp.int32)] * s
    else:
        out = q * s
    return out.astype(dtype)


def round_trip(x: jax.Array, fmt: Format, qparams: QParams | None = None) -> jax.Array:
    """``dequantize(quantize(x))`` in ``x``'s dtype, no gradient rule (see :func:`quant.fake_quant` for STE)."""
    if qparams is None:
        _refuse_non_finite(x, fmt, "compute_qparams")
    return _round_trip(x, fmt, qparams)


def _round_trip_impl(x: jax.Array, fmt: Format, qparams: QParams | None) -> jax.Array:
    qp = _compute_qparams_impl(x, fmt) if qparams is None else qparams
    return _dequantize_levels_impl(_quantize_levels_impl(x, fmt, qp), fmt, qp, dtype=jnp.asarray(x).dtype)


# ----------------------------------------------------------------------------------------------------- codes

def encode(x: jax.Array, fmt: Format, qparams: QParams) -> jax.Array:
    """Unsigned ``uint8`` codes in ``[0, 2^bits)`` (see module docstring)."""
    _refuse_non_finite(x, fmt, "encode")
    return _encode(x, fmt, qparams)


def _encode_impl(x: jax.Array, fmt: Format, qparams: QParams) -> jax.Array:
    q = _quantize_levels_impl(x, fmt, qparams)
    if isinstance(fmt, IntFormat):
        off = 2 ** (fmt.bits - 1) if fmt.symmetric else 0
        return (q + off).astype(jnp.uint8)
    if isinstance(fmt, (FloatFormat, MXFormat)):
        return float_encode(q, fmt.elem if isinstance(fmt, MXFormat) else fmt.name)
    if isinstance(fmt, NF4Format):
        return q.astype(jnp.uint8)
    if isinstance(fmt, TernaryFormat):
        return (q + 1).astype(jnp.uint8)
    if isinstance(fmt, BinaryFormat):
        return ((q + 1) / 2).astype(jnp.uint8)
    raise TypeError(f"unknown format {fmt!r}")


def decode(codes: jax.Array, fmt: Format, qparams: QParams, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`encode`: values ``x_hat`` from codes and parameters."""
    return _decode(codes, fmt, qparams, dtype)


def _decode_impl(codes: jax.Array, fmt: Format, qparams: QParams, dtype=jnp.float32) -> jax.Array:
    c = jnp.asarray(codes).astype(jnp.int32)
    if isinstance(fmt, IntFormat):
        off = 2 ** (fmt.bits - 1) if fmt.symmetric else 0
        q = (c - off).astype(jnp.float32)
    elif isinstance(fmt, (FloatFormat, MXFormat)):
        q = float_decode(c, fmt.elem if isinstance(fmt, MXFormat) else fmt.name)
    elif isinstance(fmt, NF4Format):
        q = c
    elif isinstance(fmt, TernaryFormat):
        q = (c - 1).astype(jnp.float32)
    elif isinstance(fmt, BinaryFormat):
        q = (2 * c - 1).astype(jnp.float32)
    else:
        raise TypeError(f"unknown format {fmt!r}")
    return _dequantize_levels_impl(q, fmt, qparams, dtype)


# One compiled program per (shape, format) instead of a dozen op-by-op dispatches when called eagerly (the non-finite
# checks above stay outside, on the concrete input); inside a caller's jit these inline like any jitted function.
_compute_qparams = jax.jit(_compute_qparams_impl, static_argnums=1)
_quantize_levels = jax.jit(_quantize_levels_impl, static_argnums=1)
_dequantize_levels = jax.jit(_dequantize_levels_impl, static_argnums=(1, 3))
_encode = jax.jit(_encode_impl, static_argnums=1)
_decode = jax.jit(_decode_impl, static_argnums=(1, 3))
_round_trip = jax.jit(_round_trip_impl, static_argnums=1)
