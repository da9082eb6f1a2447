"""The AutoAWQ GEMM layout (``quant_method: awq``, ``version: gemm``; Lin et al., 2024, "AWQ"), 4-bit codes.

Per linear with ``in`` inputs, ``out`` outputs and groups of ``q_group_size`` consecutive inputs
(AutoAWQ ``WQLinear_GEMM.from_linear``):

* ``qweight`` int32 ``[in, out/8]``: output columns ``8c .. 8c+7`` of input row ``i`` in word ``c``, the value of
  column ``8c + AWQ_ORDER[k]`` at bits ``4k .. 4k+3``, ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``;
* ``qzeros`` int32 ``[G, out/8]``: the zero points packed the same way (stored as they are, no ``− 1``);
* ``scales`` float16 ``[G, out]``;

and AutoAWQ's ``dequantize_gemm``: ``W[i, o] = scales[i // gs, o] · (q[i, o] − z[i // gs, o])``.

A symmetric record (llm-awq ``zero_point=False``, codes offset by 8) is written with explicit zero points 8, which
the GEMM layout needs anyway; ``zero_point`` in the config is then still true (the stored grid has zero points).
"""

from __future__ import annotations

import numpy as np

from .records import FP16_MAX, IntCodes

__all__ = ["AWQ_ORDER", "AWQ_REVERSE_ORDER", "pack_awq", "unpack_awq", "check_awq"]

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
AWQ_REVERSE_ORDER = np.argsort(AWQ_ORDER)  # [0, 4, 1, 5, 2, 6, 3, 7]


def _pack_cols(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v).astype(np.uint32)
    n, m = v.shape
    v = v.reshape(n, m // 8, 8)[:, :, AWQ_ORDER]
    words = np.zeros((n, m // 8), np.uint32)
    for k in range(8):
        words |= v[:, :, k] << np.uint32(4 * k)
    return words.view(np.int32)


def _unpack_cols(words: np.ndarray) -> np.ndarray:
    w = np.asarray(words).view(np.uint32)
    n, c = w.shape
    fields = np.stack([(w >> np.uint32(4 * k)) & 0xF for k in range(8)], axis=-1)  # field k = column AWQ_ORDER[k]
    return fields[:, :, AWQ_REVERSE_ORDER].reshape(n, c * 8).astype(np.int32)


def check_awq(lin: IntCodes, name: str) -> None:
    """ValueError (naming the layer) when ``lin`` does not fit the AutoAWQ GEMM layout."""
    if lin.bits != 4:
        raise ValueError(f"{name}: the AutoAWQ GEMM layout holds 4-bit codes, got {lin.bits} bits")
    n_in, n_out = lin.shape
    if n_out % 8:
        raise ValueError(f"{name}: {n_out} output features are not a multiple of 8 (AutoAWQ GEMM packs 8 per int32)")
    if not lin.contiguous():
        raise ValueError(f"{name}: AutoAWQ GEMM has no g_idx: groups must be consecutive inputs (no act-order)")
    if np.any(np.abs(lin.scale) > FP16_MAX):
        raise ValueError(f"{name}: scales exceed the float16 range of the AWQ 'scales' tensor")


def pack_awq(lin: IntCodes) -> dict[str, np.ndarray]:
    """``{"qweight", "qzeros", "scales"}`` of one linear (checked by :func:`check_awq` first)."""
    check_awq(lin, "layer")
    return {"qweight": _pack_cols(lin.codes), "qzeros": _pack_cols(lin.zero), "scales": lin.scale.astype(np.float16)}


def unpack_awq(t: dict, group_size: int = -1, sym: bool = False) -> IntCodes:
    """The :class:`IntCodes` of one AutoAWQ GEMM linear (scales as float32 values of the stored float16)."""
    codes = _unpack_cols(t["qweight"])
    zeros = _unpack_cols(t["qzeros"])
    scales = np.asarray(t["scales"]).astype(np.float32)
    n_in = codes.shape[0]
    gs = n_in // scales.shape[0]
    return IntCodes(codes, scales, zeros, (np.arange(n_in) // gs).astype(np.int32), 4, group_size, sym)
