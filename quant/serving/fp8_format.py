"""FP8 E4M3 weights (Micikevicius et al., 2022, "FP8 Formats for Deep Learning") in the compressed-tensors layout
(``quant_method: compressed-tensors``, format ``float-quantized``; what vLLM and transformers read for FP8
checkpoints of llm-compressor).

Per linear ``[out, in]`` (nn.Linear layout): ``weight`` float8_e4m3fn ``[out, in]`` (the codes' bit patterns),
``weight_scale`` float32 ``[out, 1]`` (``strategy: channel``) or ``[1]`` (``strategy: tensor``), symmetric, no zero
point; compressed-tensors ``dequantize``: ``W = weight.to(scale.dtype) · weight_scale`` (the same float32 product
as :mod:`quant.formats`' ``s · decode(c)``, so the two agree bit for bit).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .records import FPCodes

__all__ = ["pack_fp8", "unpack_fp8", "fp8_scheme"]


def pack_fp8(lin: FPCodes) -> dict[str, np.ndarray]:
    """``{"weight", "weight_scale"}`` of one linear."""
    w = np.ascontiguousarray(lin.codes.T).view(ml_dtypes.float8_e4m3fn)
    s = lin.scale.astype(np.float32)
    return {"weight": w, "weight_scale": s.reshape(-1, 1) if lin.strategy == "channel" else s.reshape(1)}


def unpack_fp8(t: dict) -> FPCodes:
    """The inverse of :func:`pack_fp8`: one linear's compressed-tensors tensors (``weight`` float8_e4m3fn ``[out, in]``,
    ``weight_scale`` ``[out, 1]`` or ``[1]``) as :class:`FPCodes` (uint8 codes ``[in, out]``, float32 scale, the
    strategy read from the scale's size); ``ValueError`` if the weight is not float8_e4m3fn."""
    w = np.asarray(t["weight"])
    if w.dtype != np.dtype(ml_dtypes.float8_e4m3fn):
        raise ValueError(f"compressed-tensors FP8 weight must be float8_e4m3fn, got {w.dtype}")
    s = np.asarray(t["weight_scale"]).astype(np.float32)
    strategy = "tensor" if s.size == 1 else "channel"
    return FPCodes(np.ascontiguousarray(w.T).view(np.uint8), s.reshape(-1), strategy)


def fp8_scheme(strategy: str, targets: list[str]) -> dict:
    """One compressed-tensors config group: weight-only FP8 E4M3, static symmetric scales."""
    return {"targets": targets,
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False,
                        "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "float-quantized"}
