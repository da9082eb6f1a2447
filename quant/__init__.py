"""quant: number formats, bit-packed quantized arrays, fake quantization with straight-through gradients, QAT.

Core API (stable; ``quant.ptq`` builds on it)
--------------------------------------------
Formats are frozen dataclasses (hashable, usable as static jit args)::

    IntFormat(bits=4, symmetric=True, granularity="group", group_size=128, clip_ratio=1.0, pow2_scale=False,
              in_axis=-2, out_axis=-1)
    FloatFormat("e4m3" | "e5m2" | "e3m2" | "e2m3" | "e2m1", scaled=True, granularity="tensor", ...)
        (pow2_scale=True rounds the scale *up* to a power of two: not the MX rule)
    MXFormat("e4m3" | "e5m2" | "e3m2" | "e2m3" | "e2m1", group_size=32)   OCP MX v1.0: E8M0 scale
        2^(floor(log2 amax) - emax_elem) per 32 elements, saturating elements (MXFP8_E4M3 ... MXFP4_E2M1)
    NF4Format(group_size=64), TernaryFormat() (BitNet b1.58 absmean), BinaryFormat()

Granularity: ``"tensor"``, ``"channel"`` (per output channel = ``out_axis``, default -1: Dense kernels are
``[in, out]``), ``"group"`` (``group_size`` along ``in_axis``, default -2, one scale per group and output channel),
``"input_channel"`` (per input channel, optionally in ``group_size`` groups of output channels). 1-D tensors fall
back to ``"tensor"``.

Parameters and elementwise maths (``quant.formats``)::

    qp = compute_qparams(w, fmt)            # QParams(scale, zero): compact shapes, e.g. [in//g, out] for "group"
    q  = quantize_levels(w, fmt, qp)        # integer levels (float32): sym in [-2^(b-1), 2^(b-1)-1], asym [0, 2^b-1]
    w_hat = dequantize_levels(q, fmt, qp)   # s * q   or   s * (q - z)
    w_hat = round_trip(w, fmt, qp)          # both (no gradient rule)
    codes = encode(w, fmt, qp); w_hat = decode(codes, fmt, qp)    # uint8 codes in [0, 2^bits)
    expand(qp.scale, w.shape)               # compact -> full shape (any broadcastable qp is accepted as-is)
    representable_range(fmt, qp, shape)     # (lo, hi) of the grid
    minmax_grid(lo, hi, bits), absmax_scale(amax, bits)   # the integer grids shared with quant.ptq (quant.intgrid)

NaN/inf: FP8 stores them (ml_dtypes' codes); MX gives the block a NaN scale; every other format raises ValueError
(NaN block scale under jit). See ``quant.formats``.

e.g. GPTQ with groups: for each block of ``g`` input rows ``W[i:i+g]`` (Dense ``[in, out]``) call
``compute_qparams(W[i:i+g], IntFormat(b, granularity="channel"))`` -> scale ``[1, out]``, then quantize row ``W[j]``
with ``round_trip(W[j], fmt, QParams(scale[0], zero[0] if zero is not None else None))``.

Storage (``quant.qarray``, ``quant.packing``)::

    qa = quantize(w, fmt)          # QuantizedArray pytree: packed uint8 codes + scale (+ zero); fmt/shape/dtype static
    w_hat = dequantize(qa)         # == round_trip(w, fmt) exactly
    qa.nbytes, qa.bits_per_element
    quantize_tree(params, [(r"embed|head", None), (r"kernel$", fmt)]); dequantize_tree(tree)
    pack_bits(codes, bits); unpack_bits(packed, bits, n)      # any bits in 1..8, along the last axis

Training-time::

    fake_quant(x, fmt, qparams=None, ste="clipped" | "identity")   # custom-VJP straight-through estimator
    quant.lsq: lsq_fake_quant(x, step, bits, signed, offset=None), lsq_init, lsqplus_init   (LSQ / LSQ+)
    quant.statsq: statsq_fake_quant(w, bits), cga_freeze(rules, boundary_range, start_step)  (OFQ StatsQ / CGA)
    quant.qkr: qk_product, qkr_logits, qkr_attention                                         (OFQ QKR)
    quant.oscillation: oscillation_init / oscillation_update / oscillation_summary           (Nagel et al.)
    quant.activation: dynamic_act_quant (per token / tensor), static_act_quant, calibrate_amax
    quant.gaussws: gaussws_fake_quant(w, key, step) = cast_bf16(w + R step), R = round(N(0,1)/2)      (GaussWS)
    quant.qat: QATConfig(weights=((regex, FakeQuantW | LSQW | StatsQW | None), ...),
                         activations=((regex, DynamicActQ | StaticActQ | LSQActQ | None), ...), qkr=QKRConfig(...))
               qat_init(cfg, model, params, *sample) -> {"params", "quant"}; qat_apply(cfg, model, calib) -> apply;
               qat_calibrate; quantize_weights; weight_levels
"""

from jaxmodels import __version__  # the distribution's one version
from quant import activation, floats, formats, gaussws, intgrid, lsq, mx, oscillation, packing, qarray, qat, qkr, statsq
from quant.fake_quant import STE_MODES, fake_quant, ste_round
from quant.formats import (
    BINARY, FLOAT_SPECS, FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2, GRANULARITIES, INT2, INT3, INT4, INT8,
    NF4, NF4_LEVELS, TERNARY, BinaryFormat, FloatFormat, Format, IntFormat, MXFormat, NF4Format, QParams,
    TernaryFormat, absmax_scale, compute_qparams, decode, dequantize_levels, encode, expand, float_max,
    has_special_codes, int_range, minmax_grid, quantize_levels, reduce_stats, representable_range, round_to_float,
    round_trip, safe_scale,
)
from quant import serving  # GPTQ / AutoAWQ / compressed-tensors FP8 folders (export_hf, load_hf_quantized)
from quant.mx import MXFP4_E2M1, MXFP6_E2M3, MXFP6_E3M2, MXFP8_E4M3, MXFP8_E5M2, e8m0_to_float
from quant.packing import pack_bits, packed_last_dim, unpack_bits
from quant.qarray import (
    QuantizedArray, dequantize, dequantize_tree, is_quantized, match_rule, quantize, quantize_tree,
)

__all__ = [
    "formats", "floats", "intgrid", "mx", "packing", "qarray", "activation", "gaussws", "lsq", "oscillation", "qat", "qkr", "statsq",
    "IntFormat", "FloatFormat", "NF4Format", "TernaryFormat", "BinaryFormat", "Format", "QParams", "GRANULARITIES",
    "FLOAT_SPECS", "NF4_LEVELS", "INT2", "INT3", "INT4", "INT8", "FP8_E4M3", "FP8_E5M2", "FP6_E3M2", "FP6_E2M3",
    "FP4_E2M1", "NF4", "TERNARY", "BINARY",
    "MXFormat", "MXFP8_E4M3", "MXFP8_E5M2", "MXFP6_E3M2", "MXFP6_E2M3", "MXFP4_E2M1", "e8m0_to_float",
    "minmax_grid", "absmax_scale", "safe_scale", "has_special_codes",
    "compute_qparams", "quantize_levels", "dequantize_levels", "round_trip", "encode", "decode", "expand",
    "reduce_stats", "representable_range", "round_to_float", "float_max", "int_range",
    "pack_bits", "unpack_bits", "packed_last_dim",
    "QuantizedArray", "quantize", "dequantize", "quantize_tree", "dequantize_tree", "match_rule", "is_quantized",
    "fake_quant", "ste_round", "STE_MODES", "serving",
]
