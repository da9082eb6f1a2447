"""ZeroQuant-FP: W4A8 post-training quantization with floating-point formats (Wu, Yao & He 2023, "ZeroQuant-FP: A
Leap Forward in LLMs Post-Training W4A8 Quantization Using Floating-Point Formats", arXiv 2307.09782).

Weights: FP4 E2M1 with one scale per (output channel, group of ``group_size`` input features), quantized with GPTQ
run on the FP4 grid (:func:`quant.ptq.gptq.gptq_quantize_weight` with an :class:`FPQuantizer`), or round-to-nearest:

    S_g = max_{i in g} |w_i| / 6,     ŵ_i = S_g · RNE_E2M1(clip(w_i / S_g, -6, 6))

(``RNE_E2M1`` rounds to {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}, ties to even; :func:`quant.formats.round_to_float`).

Activations: FP8 E4M3 with a dynamic scale per token ``t`` (the input of every ``nn.Dense``):

    s_t = max_i |x_{t,i}| / 448,      x̂_{t,i} = s_t · RNE_E4M3(x_{t,i} / s_t)

Scale constraint (the paper's Section on casting FP4 to FP8). An FP8 tensor-core GEMM needs the FP4 weights in FP8;
with an arbitrary scale that cast is a multiplication ``q · S_g`` in high precision followed by a rounding. When the
part of the scale that varies along the reduction axis is a power of two, ``2^k``, the cast is exact and costs only
an addition of ``k`` to the exponent bits (a shift), because ``q · 2^k`` of an E2M1 value ``q`` is an E4M3 value for
every ``k`` in ``[-8, 6]`` (:func:`pow2_exponent_range`). The paper maps the scales to powers of two in two ways:

* ``"m1"`` -- map every scale to a power of two:  ``Ŝ_g = 2^⌈log2 S_g⌉``.
  The FP8 weight is ``q · Ŝ_g`` itself.
* ``"m2"`` -- collect the scales of one output channel ``S = [S_1, ..., S_G]``, take their maximum
  ``S_max = max_g S_g`` and map only the ratios to powers of two:  ``Ŝ_g = S_max · 2^⌈log2(S_g / S_max)⌉``.
  The FP8 weight is ``q · 2^{k_g}`` (``k_g = ⌈log2(S_g / S_max)⌉ <= 0``) and ``S_max`` (one real number per output
  channel) multiplies the GEMM output together with the token scale:
  ``y_{t,o} = s_t · S_max,o · Σ_i x8_{t,i} w8_{i,o}``. M2 keeps the precise per-channel magnitude, so it loses
  less than M1.

Both round the exponent *up* (``⌈·⌉``), so ``Ŝ_g >= S_g`` and no weight is clipped (the range only grows by < 2x).
``exact_cast=True`` (default) also clamps ``k`` into :func:`pow2_exponent_range` so that the FP4 -> FP8 shift is
exact for every weight (a no-op unless ``⌈log2(S_g / S_max)⌉ < -8`` (M2: a group ~500x smaller than its row's
largest) or ``⌈log2 S_g⌉ ∉ [-8, 6]`` (M1)); the per-layer report says ``cast_exact``. Under GPTQ, M2's ``S_max`` is the row maximum of
the weight before GPTQ's updates (every group of a row must share one anchor; a group whose updated weights outgrow
it gets ``k > 0``).

The paper reports (OPT / LLaMA) that FP8 activations beat INT8, FP4 weights match or beat INT4, and that both scale
constraints cost little relative to unconstrained W4A8; LoRC (:mod:`quant.ptq.lorc`) recovers more on small models.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from quant.fake_quant import fake_quant
from quant.formats import FLOAT_SPECS, FloatFormat, QParams, decode, encode, float_max, round_to_float
from quant.formats import safe_scale as _safe  # the one all-zero-block guard (quant.intgrid)

__all__ = ["ZeroQuantFPConfig", "FPQuantizer", "pow2_scales", "pow2_exponent_range", "fp_act_quant",
           "zeroquant_fp_weight", "zeroquant_fp", "forward_a8", "embed_a8", "POW2_METHODS"]

POW2_METHODS = (None, "m1", "m2")


# ----------------------------------------------------------------------------------------------------- pow2 scales

def pow2_exponent_range(weight_format: str = "e2m1", cast_format: str = "e4m3") -> tuple[int, int]:
    """The shifts ``k`` for which ``v · 2^k`` is exactly representable in ``cast_format`` for EVERY value ``v`` of
    ``weight_format`` (needs ``mantissa(weight) <= mantissa(cast)``):

        k_min = log2(min subnormal of cast) − log2(min subnormal of weight)   (the lowest bit must survive)
        k_max = ⌊log2(max of cast / max of weight)⌋                           (the largest value must not overflow)

    FP4 E2M1 -> FP8 E4M3: ``[-8, 6]`` (0.5 · 2^-8 = 2^-9 is E4M3's smallest subnormal; 6 · 2^6 = 384 <= 448).
    """
    for n in (weight_format, cast_format):
        if n not in FLOAT_SPECS:
            raise ValueError(f"float format must be one of {sorted(FLOAT_SPECS)}, got {n!r}")
    ew, mw, _ = FLOAT_SPECS[weight_format]
    ec, mc, _ = FLOAT_SPECS[cast_format]
    if mw > mc:
        raise ValueError(f"{weight_format} has {mw} mantissa bits, more than {cast_format}'s {mc}: "
                         "a power-of-two shift cannot make the cast exact")
    sub_w = 1 - (2 ** (ew - 1) - 1) - mw
    sub_c = 1 - (2 ** (ec - 1) - 1) - mc
    return sub_c - sub_w, int(math.floor(math.log2(float_max(cast_format) / float_max(weight_format))))


def _ceil_log2(x: jax.Array) -> jax.Array:
    """⌈log2 x⌉ for positive float32, exactly (from the binary exponent; no log rounding)."""
    m, e = jnp.frexp(x)  # x = m 2^e, 0.5 <= m < 1
    return jnp.where(m == 0.5, e - 1, e)


def pow2_scales(scale, method: str, anchor=None, k_range: tuple[int, int] | None = None):
    """ZeroQuant-FP's power-of-two scale constraint (module docstring). ``scale[..., G]``: positive group scales of
    one output channel along the last axis.

    ``"m1"``: ``k = ⌈log2 S⌉``, ``Ŝ = 2^k``.
    ``"m2"``: ``S_max = anchor`` (default ``max`` over the last axis, kept broadcastable), ``k = ⌈log2(S / S_max)⌉``,
    ``Ŝ = S_max · 2^k``.
    ``k`` is clipped to ``k_range`` when given. Returns ``(Ŝ, k)`` (float32, int32); ``Ŝ >= S`` unless clipped.
    Jittable; ``k`` is exact (frexp, and for M2 a check of ``S_max · 2^k >= S`` that is itself exact).
    """
    if method not in ("m1", "m2"):
        raise ValueError(f"pow2 method must be 'm1' or 'm2', got {method!r}")
    s = jnp.asarray(scale, jnp.float32)
    if method == "m1":
        base = jnp.ones_like(s)
        k = _ceil_log2(s)
    else:
        base = jnp.max(s, axis=-1, keepdims=True) if anchor is None else jnp.asarray(anchor, jnp.float32)
        base = jnp.broadcast_to(base, s.shape)
        k = _ceil_log2(s / base)
        k = jnp.where(jnp.ldexp(base, k) < s, k + 1, k)  # s / base may have rounded down onto a power of two
    if k_range is not None:
        k = jnp.clip(k, k_range[0], k_range[1])
    return jnp.ldexp(base, k), k.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------- quantizer

@dataclasses.dataclass(frozen=True)
class FPQuantizer:
    """The FP weight grid as a GPTQ quantizer (see :mod:`quant.ptq.gptq`): ``S_g = max|w_g| / max_fmt`` per row and
    group, optionally mapped to powers of two (``pow2`` = ``"m1"`` / ``"m2"``; M2's anchor is the row's
    ``max|W| / max_fmt`` from :meth:`prepare`); ``codes`` are the format's bit patterns (:func:`quant.formats.encode`),
    ``values = S · RNE_fmt(clip(w / S))``."""

    name: str = "e2m1"
    pow2: str | None = None
    k_range: tuple[int, int] | None = None

    @property
    def fmt(self) -> FloatFormat:
        return FloatFormat(self.name, granularity="tensor")

    def prepare(self, W):
        if self.pow2 != "m2":
            return None
        return _safe(jnp.max(jnp.abs(jnp.asarray(W, jnp.float32)), axis=-1) / float_max(self.name))

    def params(self, groups, aux):
        s = _safe(jnp.max(jnp.abs(groups), axis=-1) / float_max(self.name))  # [R, G]
        if self.pow2 is not None:
            s, _ = pow2_scales(s, self.pow2, None if aux is None else aux[:, None], self.k_range)
        return s, jnp.zeros_like(s)

    def quantize(self, w, scale, zero):
        return encode(w, self.fmt, QParams(scale, None)).astype(jnp.float32)

    def dequantize(self, codes, scale, zero):
        return decode(codes, self.fmt, QParams(scale, None))


# ----------------------------------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class ZeroQuantFPConfig:
    """``weight_format``: FP weight format (``"e2m1"`` FP4; also FP6 ``"e3m2"``/``"e2m3"``, FP8); ``group_size``
    (``-1``: one scale per output channel); ``pow2``: scale constraint ``None`` / ``"m1"`` / ``"m2"``;
    ``act_format``: activation format (``None``: weight-only), ``act_granularity`` ``"token"`` / ``"tensor"``;
    ``algorithm``: ``"gptq"`` or ``"rtn"``; GPTQ's ``act_order`` / ``static_groups`` / ``block_size`` /
    ``percdamp``; ``exact_cast``: clamp the pow2 exponents so the FP4 -> FP8 cast is exact; ``calib_act_quant``:
    calibrate on FP8-quantized inputs (the inputs the deployed W4A8 layer sees)."""

    weight_format: str = "e2m1"
    group_size: int = 128
    pow2: str | None = "m2"
    act_format: str | None = "e4m3"
    act_granularity: str = "token"
    algorithm: str = "gptq"
    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128
    percdamp: float = 0.01
    exact_cast: bool = True
    calib_act_quant: bool = True

    @property
    def cast_format(self) -> str:
        return self.act_format or "e4m3"

    def validate(self) -> None:
        if self.weight_format not in FLOAT_SPECS:
            raise ValueError(f"weight_format must be one of {sorted(FLOAT_SPECS)}, got {self.weight_format!r}")
        if self.act_format is not None and self.act_format not in FLOAT_SPECS:
            raise ValueError(f"act_format must be None or one of {sorted(FLOAT_SPECS)}, got {self.act_format!r}")
        if self.act_granularity not in ("token", "tensor"):
            raise ValueError(f"act_granularity must be 'token' or 'tensor', got {self.act_granularity!r}")
        if self.pow2 not in POW2_METHODS:
            raise ValueError(f"pow2 must be one of {POW2_METHODS}, got {self.pow2!r}")
        if self.algorithm not in ("gptq", "rtn"):
            raise ValueError(f"algorithm must be 'gptq' or 'rtn', got {self.algorithm!r}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise ValueError(f"group_size must be -1 or a positive integer, got {self.group_size!r}")
        if self.pow2 is not None and self.exact_cast:
            pow2_exponent_range(self.weight_format, self.cast_format)  # raises if no shift can be exact
        self.gptq_config().validate()

    def gptq_config(self):
        from .gptq import GPTQConfig

        return GPTQConfig(bits=1 + sum(FLOAT_SPECS[self.weight_format][:2]), group_size=self.group_size, sym=True,
                          act_order=self.act_order, static_groups=self.static_groups, block_size=self.block_size,
                          percdamp=self.percdamp)

    def quantizer(self) -> FPQuantizer:
        kr = pow2_exponent_range(self.weight_format, self.cast_format) if self.pow2 and self.exact_cast else None
        return FPQuantizer(self.weight_format, self.pow2, kr)


# ----------------------------------------------------------------------------------------------------- activations

def _check_act(name, granularity):
    if name not in FLOAT_SPECS:
        raise ValueError(f"activation format must be one of {sorted(FLOAT_SPECS)}, got {name!r}")
    if granularity not in ("token", "tensor"):
        raise ValueError(f"granularity must be 'token' or 'tensor', got {granularity!r}")


def fp_act_quant(x: jax.Array, name: str = "e4m3", granularity: str = "token") -> jax.Array:
    """Dynamic FP activation fake-quant: ``s = max|x| / max_fmt`` per token (last axis reduced) or per tensor,
    ``x̂ = s · RNE_fmt(x / s)`` (all-zero tokens: ``s = 1``), in ``x``'s dtype, straight-through gradient
    (:func:`quant.fake_quant`)."""
    _check_act(name, granularity)
    xs = jax.lax.stop_gradient(jnp.asarray(x)).astype(jnp.float32)
    axes = (-1,) if granularity == "token" else tuple(range(xs.ndim))
    s = _safe(jnp.max(jnp.abs(xs), axis=axes, keepdims=True) / float_max(name))
    return fake_quant(x, FloatFormat(name, granularity="tensor"), QParams(s, None))


@dataclasses.dataclass(frozen=True)
class _FPAct:
    """Hashable :func:`fp_act_quant` (a static argument of the jitted block capture)."""

    name: str
    granularity: str

    def __call__(self, x):
        return fp_act_quant(x, self.name, self.granularity)


def _a8(model, block_params, h, ctx, act):
    """One block with every Dense input FP-fake-quantized (``act = (format, granularity)``; ``None``: float):
    ``(output, {dense_name: (quantized input, output)})``."""
    from .blocks import capture_dense

    return capture_dense(model, block_params, h, ctx, None if act is None else _FPAct(*act))


def forward_a8(model, params, batch, act_format: str | None = "e4m3", granularity: str = "token"):
    """``model.forward`` (a :class:`quant.ptq.blocks.BlockModel`) with the input of every ``nn.Dense`` of every
    block fake-quantized by :func:`fp_act_quant` (``flax.linen.intercept_methods``; ``act_format=None``: float)."""
    if act_format is not None:
        _check_act(act_format, granularity)
    act = None if act_format is None else (act_format, granularity)
    h, ctx = model.embed(params, batch)
    from .blocks import get_sub

    for i, p in enumerate(model.block_paths):
        h = _a8(model, get_sub(params, p), h, model.block_ctx(i, ctx), act)[0]
    return model.head(params, h, ctx)


def embed_a8(model, params, batches, act_format: str | None = "e4m3", granularity: str = "token") -> np.ndarray:
    """:func:`forward_a8` over a list of batches, concatenated (as :func:`quant.ptq.evaluate.embed_batches`)."""
    return np.concatenate([np.asarray(forward_a8(model, params, b, act_format, granularity)) for b in batches])


# ----------------------------------------------------------------------------------------------------- one layer

@functools.partial(jax.jit, static_argnames=("qz", "gs"))
def _rtn_fp(W, qz, gs):
    """Round-to-nearest on the quantizer's grid, ``W[out, in]``: (values, codes, scale[out, G], zero[out, G])."""
    R, C = W.shape
    scale, zero = qz.params(W.reshape(R, C // gs, gs), qz.prepare(W))
    s_full = jnp.repeat(scale, gs, axis=1)
    codes = qz.quantize(W, s_full, 0.0)
    return qz.dequantize(codes, s_full, 0.0), codes.astype(jnp.uint8), scale, zero


@functools.partial(jax.jit, static_argnames=("qz", "cast"))
def _exponents(W, scale, codes, g_idx, qz, cast):
    """``(anchor, k, exact)``: ``Ŝ = base · 2^k`` (base 1 for M1, ``S_max`` for M2; exact from the binary exponents)
    and whether every FP8 weight ``q · 2^k`` is representable in ``cast`` (the cast is then a pure shift)."""
    anchor = qz.prepare(W)
    base = jnp.ones_like(scale) if anchor is None else jnp.broadcast_to(anchor[:, None], scale.shape)
    k = (jnp.frexp(scale)[1] - jnp.frexp(base)[1]).astype(jnp.int32)
    levels = decode(codes, qz.fmt, QParams(jnp.ones((), jnp.float32)))  # the FP4 values q, [out, in]
    v = jnp.ldexp(levels, k[:, g_idx])
    return anchor, k, jnp.all(round_to_float(v, cast) == v)


def zeroquant_fp_weight(w, H=None, config: ZeroQuantFPConfig = ZeroQuantFPConfig(), *,
                        kernel_layout: bool = True) -> dict:
    """ZeroQuant-FP of one Flax kernel ``w[in, out]`` (``kernel_layout=False``: ``W[out, in]``): GPTQ on the FP grid
    with Hessian ``H[in, in]`` (``config.algorithm="gptq"``), or round-to-nearest (``"rtn"``, ``H`` unused).

    Returns the per-layer record of :mod:`quant.ptq` as :func:`quant.ptq.gptq.gptq_quantize_weight` (``weight`` in
    ``w``'s layout and dtype, ``format`` = ``config.weight_format``, ``bits``, ``group_size``, ``sym=True``,
    ``codes`` = FP bit patterns, ``scale`` = the effective (power-of-two-mapped) scales ``[out, G]``, ``zero=None``,
    ``g_idx``, ``perm``) plus ``anchor`` (M2's ``S_max[out]``, else ``None``), ``exponent`` (``k[out, G]``:
    ``Ŝ = 2^k`` (M1) or ``S_max 2^k`` (M2), else ``None``) and ``cast_exact`` (every ``q · 2^k`` exactly representable in the
    activation format, i.e. the FP4 -> FP8 cast is a pure exponent shift; ``None`` without pow2).
    """
    config.validate()
    if config.algorithm == "gptq" and H is None:
        raise ValueError("ZeroQuant-FP with algorithm='gptq' needs the Hessian H (or use algorithm='rtn')")
    qz = config.quantizer()
    w_in = jnp.asarray(w)
    if w_in.ndim != 2:
        raise ValueError(f"expected a 2-D kernel, got shape {w_in.shape}")
    W = jnp.asarray(w_in, jnp.float32)
    W = W.T if kernel_layout else W
    R, C = W.shape
    gs = C if config.group_size == -1 else config.group_size
    if C % gs:
        raise ValueError(f"input features {C} not divisible by group_size {gs}")
    if config.algorithm == "gptq":
        from .gptq import gptq_quantize_weight

        r = gptq_quantize_weight(W, H, config.gptq_config(), kernel_layout=False, quantizer=qz)
        Q, codes = jnp.asarray(r["weight"], jnp.float32), r["codes"]
        dead = np.diag(np.asarray(H)) == 0
        W = W.at[:, jnp.asarray(dead)].set(0.0) if dead.any() else W  # as GPTQ did before its prepare(W)
    else:
        Q, codes, scale, zero = _rtn_fp(W, qz, gs)
        r = {"scale": scale, "zero": zero, "g_idx": np.arange(C, dtype=np.int32) // gs, "perm": None}
    r["anchor"], r["exponent"], r["cast_exact"] = None, None, None
    if config.pow2 is not None:
        r["anchor"], r["exponent"], exact = _exponents(W, jnp.asarray(r["scale"], jnp.float32), codes,
                                                       jnp.asarray(r["g_idx"]), qz, config.cast_format)
        r["cast_exact"] = bool(exact)
    r["weight"] = (Q.T if kernel_layout else Q).astype(w_in.dtype)
    r["codes"] = jnp.asarray(codes.T if kernel_layout else codes).astype(jnp.uint8)
    # the report schema of quant.ptq: FP codes (bit patterns of ``weight_format``), no zero point
    r.update(format=config.weight_format, bits=qz.fmt.bits, group_size=config.group_size, sym=True, zero=None)
    return r


# ----------------------------------------------------------------------------------------------------- whole model

def zeroquant_fp(params, model, calib_batch, config: ZeroQuantFPConfig = ZeroQuantFPConfig(), *,
                 progress: bool | None = None):
    """ZeroQuant-FP every linear of ``model`` (a :class:`quant.ptq.blocks.BlockModel`), block by block.

    As :func:`quant.ptq.gptq.gptq`: each block sees the outputs of the already-quantized previous blocks; with
    ``config.act_format`` and ``calib_act_quant`` those blocks run W4A8 and every linear's Hessian
    ``H = 2 Σ_t m_t x̂_t x̂_tᵀ / Σ_t m_t`` is built from its FP8-quantized inputs ``x̂`` (``m_t``: 0 on padding).
    ``algorithm="rtn"`` needs no ``calib_batch`` (then no per-layer errors).

    Returns ``(quantized_params, report)``: the params with dequantized FP4 kernels (activations are NOT part of the
    params: run them with :func:`forward_a8` / :func:`embed_a8`) and ``{"method", "config", "layers": {path:
    {weight, codes, scale, anchor, exponent, cast_exact, g_idx, perm, error}}, "cast_exact"}`` where ``error`` is
    ``‖X̂W − X̂Ŵ‖² / ‖X̂W‖²`` on the calibration tokens.
    """
    from .blocks import dense_names, get_sub

    config.validate()
    if config.algorithm == "gptq" and calib_batch is None:
        raise ValueError("ZeroQuant-FP with algorithm='gptq' needs a calibration batch")
    for bp in model.block_paths:  # every kernel's shape checked before any work
        for name in dense_names(get_sub(params, bp)):
            c = get_sub(get_sub(params, bp), name)["kernel"].shape[0]
            if config.group_size != -1 and c % config.group_size:
                raise ValueError(f"{bp}/{name}: input features {c} not divisible by group_size {config.group_size}")
    act = (config.act_format, config.act_granularity) if config.act_format and config.calib_act_quant else None
    from .engine import quantize_layers

    def layer(w, stats, cfg):
        return zeroquant_fp_weight(w, stats.H if cfg.algorithm == "gptq" else None, cfg)

    out, rep = quantize_layers(params, model, calib_batch, layer, config, act=None if act is None else _FPAct(*act),
                               progress=progress, desc=f"ZeroQuant-FP {config.weight_format}", method="zeroquant_fp",
                               needs="hessian" if config.algorithm == "gptq" else None)
    layers = rep["layers"]
    exact = [r["cast_exact"] for r in layers.values() if r["cast_exact"] is not None]
    return out, {"method": "zeroquant_fp", "config": dataclasses.asdict(config), "layers": layers,
                 "cast_exact": all(exact) if exact else None}
