"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel / transformers / vLLM ``quant_method: gptq``).

Per linear with ``in`` inputs, ``out`` outputs, ``b`` bits and ``G`` groups (Frantar et al., 2023, "GPTQ"; layout
of AutoGPTQ ``QuantLinear.pack`` and GPTQModel):

* ``qweight`` int32 ``[in·b/32, out]``: the codes of each output column packed along the *input* axis as a
  little-endian bit stream (input ``i`` at bits ``b·i .. b·i+b−1`` of the column's stream; for b ∈ {2, 4, 8}
  word ``i // (32/b)``, shift ``b·(i mod 32/b)``; b = 3 spans words, 32 codes per 3 words);
* ``qzeros`` int32 ``[G, out·b/32]``: the zero points packed the same way along the *output* axis;
* ``scales`` float16 ``[G, out]``; ``g_idx`` int32 ``[in]`` (the group of each input, act-order included);

and the dequantized kernel ``W[i, o] = scales[g_idx[i], o] · (q[i, o] − z[g_idx[i], o])``.

Zero-point convention (``checkpoint_format``):

* ``"gptq"`` (v1, the default; what transformers, vLLM and every AutoGPTQ release read): the stored field is
  ``(z − 1) mod 2^b`` and readers add 1 back (AutoGPTQ ``(field & maxq) + 1``; GPTQModel adds ``0x11111111``-style
  constants to the packed words; exllama kernels ``+ 1``). A zero point of 0 (a group with no negative weight on
  an asymmetric grid) therefore reads back as 2^b in all of them, so it is rejected here (use ``"gptq_v2"``).
* ``"gptq_v2"`` (GPTQModel): the stored field is ``z`` itself.

Symmetric grids store ``z = 2^(b−1)`` (v1 field ``2^(b−1) − 1``), as AutoGPTQ does.
"""

from __future__ import annotations

import numpy as np

from .records import FP16_MAX, IntCodes

__all__ = ["pack_le", "unpack_le", "pack_gptq", "unpack_gptq", "GPTQ_BITS", "CHECKPOINT_FORMATS"]

GPTQ_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def pack_le(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``codes[n, m]`` (values < 2^bits) along axis 0 into int32 ``[n·bits/32, m]``: each column a
    little-endian bit stream (code ``k`` at bits ``bits·k ..``). ``n·bits`` must be a multiple of 32."""
    codes = np.asarray(codes).astype(np.uint64)
    n, m = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} values of {bits} bits do not fill whole 32-bit words")
    bitplanes = (codes[:, None, :] >> np.arange(bits, dtype=np.uint64)[None, :, None]) & 1  # [n, bits, m]
    stream = bitplanes.reshape(n * bits // 32, 32, m)
    words = (stream << np.arange(32, dtype=np.uint64)[None, :, None]).sum(axis=1)
    return words.astype(np.uint32).view(np.int32)


def unpack_le(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_le`: int32 ``[n·bits/32, m]`` -> int32 codes ``[n, m]``."""
    w = np.asarray(words).view(np.uint32).astype(np.uint64)
    if w.shape[0] * 32 != n * bits:
        raise ValueError(f"{w.shape[0]} words of 32 bits do not hold {n} values of {bits} bits")
    stream = (w[:, None, :] >> np.arange(32, dtype=np.uint64)[None, :, None]) & 1  # [W, 32, m]
    bitplanes = stream.reshape(n, bits, w.shape[1])
    return (bitplanes << np.arange(bits, dtype=np.uint64)[None, :, None]).sum(axis=1).astype(np.int32)


def check_gptq(lin: IntCodes, name: str, checkpoint_format: str = "gptq") -> None:
    """ValueError (naming the layer) when ``lin`` does not fit the GPTQ layout (see the module docstring)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    b = lin.bits
    if b not in GPTQ_BITS:
        raise ValueError(f"{name}: GPTQ checkpoints hold {GPTQ_BITS}-bit codes, got {b} bits")
    n_in, n_out = lin.shape
    for what, n in (("input", n_in), ("output", n_out)):
        if (n * b) % 32 or (b == 3 and n % 32):
            raise ValueError(f"{name}: {n} {what} features do not pack into whole int32 words at {b} bits "
                             f"(need a multiple of {32 if b == 3 else 32 // b})")
    if np.any(np.abs(lin.scale) > FP16_MAX):
        raise ValueError(f"{name}: scales exceed the float16 range of the GPTQ 'scales' tensor")
    if checkpoint_format == "gptq" and not lin.sym and np.any(lin.zero == 0):
        g, o = np.argwhere(lin.zero == 0)[0]
        raise ValueError(f"{name}: zero point 0 (group {g}, output {o}) cannot be stored in the v1 GPTQ format "
                         "(readers add 1 to the stored z − 1); use checkpoint_format='gptq_v2'")


def pack_gptq(lin: IntCodes, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """``{"qweight", "qzeros", "scales", "g_idx"}`` of one linear (checked by :func:`check_gptq` first)."""
    check_gptq(lin, "layer", checkpoint_format)
    maxq = 2 ** lin.bits - 1
    z = lin.zero if checkpoint_format == "gptq_v2" else (lin.zero - 1) & maxq
    return {"qweight": pack_le(lin.codes, lin.bits),
            "qzeros": pack_le(z.T, lin.bits).T.copy(),
            "scales": lin.scale.astype(np.float16),
            "g_idx": lin.g_idx.astype(np.int32)}


def unpack_gptq(t: dict, bits: int, checkpoint_format: str = "gptq", group_size: int = -1,
                sym: bool = False) -> IntCodes:
    """The :class:`IntCodes` of one GPTQ linear (``t``: its ``qweight``/``qzeros``/``scales``/``g_idx``; scales
    kept as float32 values of the stored float16)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    scales = np.asarray(t["scales"]).astype(np.float32)
    n_groups, n_out = scales.shape
    n_in = np.asarray(t["qweight"]).shape[0] * 32 // bits
    g_idx = np.asarray(t["g_idx"]).astype(np.int32) if "g_idx" in t else np.arange(n_in) // (n_in // n_groups)
    codes = unpack_le(t["qweight"], bits, n_in)
    z = unpack_le(np.asarray(t["qzeros"]).T, bits, n_out).T
    if checkpoint_format == "gptq":
        z = (z + 1) & (2 ** bits - 1)
    return IntCodes(codes, scales, z.astype(np.int32), g_idx, bits, group_size, sym)
