"""From a per-layer record of a :mod:`quant.ptq` report to the codes a serving format stores, checked first.

A record (the report schema of :mod:`quant.ptq`) holds ``codes`` ``[in, out]`` in the original input order,
``scale``/``zero`` ``[out, G]``, ``g_idx`` ``[in]`` and ``bits``/``group_size``/``sym``; its kernel is

    W[i, o] = scale[o, g_idx[i]] · (codes[i, o] − zero[o, g_idx[i]])        (sym: zero = 2^(b−1))

which is exactly the GPTQ / AutoAWQ dequantization ``scales[g_idx] * (w_int − zeros[g_idx])``. FP records
(:func:`quant.ptq.rtn.rtn_format` with a :class:`quant.formats.FloatFormat`, or ``format="e4m3"`` with codes) hold
FP bit patterns: ``W = scale · decode(codes)``.

:func:`int_codes` / :func:`fp_codes` reject (``ValueError`` naming the layer) what a format cannot hold: another
code family, run-time transforms (AWQ ``in_scale`` not folded, RSQ rotations, LoRC factors), codes or zero points
outside ``[0, 2^b − 1]``, group sizes that do not divide the inputs, non-finite scales, and records whose codes do
not reproduce their own kernel.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from quant.formats import FloatFormat, IntFormat

__all__ = ["IntCodes", "FPCodes", "int_codes", "fp_codes", "FP16_MAX"]

FP16_MAX = 65504.0


@dataclasses.dataclass
class IntCodes:
    """One linear's integer codes in the original input order: ``codes`` ``[in, out]``, ``scale`` ``[G, out]``
    (float32 as the method computed it), ``zero`` ``[G, out]`` int (sym: 2^(b−1)), ``g_idx`` ``[in]``."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    g_idx: np.ndarray
    bits: int
    group_size: int
    sym: bool
    in_scale: np.ndarray | None = None  # an AWQ input scale export_hf folds into the tensors producing x

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, scale_dtype=np.float16) -> np.ndarray:
        """``W[in, out] = s[g_idx] · (codes − zero[g_idx])`` in float32 with the scales rounded to ``scale_dtype``
        first (float16: what the serving checkpoint holds; the float32 product is exact, |c − z| < 2^8 and the
        scale has 11 significant bits, so casting it to float16 gives the float16 arithmetic of the references)."""
        s = self.scale.astype(scale_dtype).astype(np.float32)
        return s[self.g_idx] * (self.codes.astype(np.float32) - self.zero[self.g_idx].astype(np.float32))

    def contiguous(self) -> bool:
        n_in = self.codes.shape[0]
        gs = n_in if self.group_size == -1 else self.group_size
        return bool(np.array_equal(self.g_idx, np.arange(n_in) // gs))


@dataclasses.dataclass
class FPCodes:
    """One linear's FP8 codes: ``codes`` ``[in, out]`` uint8 bit patterns of ``name``, ``scale`` float32 of shape
    ``[out]`` (``strategy="channel"``) or ``[1]`` (``"tensor"``); ``W[i, o] = scale[o] · decode(codes[i, o])``."""

    codes: np.ndarray
    scale: np.ndarray
    strategy: str
    name: str = "e4m3"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> np.ndarray:
        import ml_dtypes

        v = self.codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        return v * self.scale.astype(np.float32)[None, :]


_RUNTIME = (("in_scale", "an AWQ input scale (x / s at run time) that was not folded into the previous layer"),
            ("rotation_seed", "an RSQ rotation (W = R · W_stored)"),
            ("lorc", "LoRC low-rank factors"))


def _no_runtime(rec: dict, name: str, what: str, allow_in_scale: bool = False):
    for key, desc in _RUNTIME:
        if rec.get(key) is not None and not (key == "in_scale" and allow_in_scale):
            raise ValueError(f"{name}: the record needs {desc}, which the {what} format cannot hold")


def _check_reproduces(name: str, got: np.ndarray, rec: dict):
    want = np.asarray(rec.get("stored", rec["weight"]), np.float32)
    if want.shape != got.shape:
        raise ValueError(f"{name}: codes shape {got.shape} != the record's kernel shape {want.shape}")
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    tol = 1e-6 * max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)
    if not err <= tol:
        raise ValueError(f"{name}: the record's codes and scales do not reproduce its kernel (max |diff| {err:.3g})")


def _int_format(rec):
    f = rec.get("format")
    if f == "int":
        return True
    return isinstance(f, IntFormat)


def int_codes(rec: dict, name: str, what: str = "GPTQ", allow_in_scale: bool = False) -> IntCodes:
    """The :class:`IntCodes` of one record, every check done (see the module docstring)."""
    if not isinstance(rec, dict) or "weight" not in rec:
        raise ValueError(f"{name}: not a quant.ptq per-layer record")
    fmt = rec.get("format")
    if not _int_format(rec):
        kind = getattr(fmt, "name", fmt)
        raise ValueError(f"{name}: the {what} format holds integer codes; this layer's format is {kind!r}")
    if rec.get("packed") is not None or rec.get("codes") is None:
        raise ValueError(f"{name}: the record has no integer 'codes' (an rtn_format / codebook record); quantize it "
                         f"with quant.ptq.rtn / gptq / awq to export it as {what}")
    _no_runtime(rec, name, what, allow_in_scale)
    bits, gs, sym = int(rec["bits"]), rec["group_size"], bool(rec.get("sym", False))
    codes = np.asarray(rec["codes"])
    if codes.ndim != 2:
        raise ValueError(f"{name}: codes must be [in, out], got shape {codes.shape}")
    n_in, n_out = codes.shape
    gs = -1 if gs in (-1, None) else int(gs)
    g = n_in if gs == -1 else gs
    if g < 1 or n_in % g:
        raise ValueError(f"{name}: group_size {gs} does not divide the {n_in} input features")
    n_groups = n_in // g
    maxq = 2 ** bits - 1
    if codes.min(initial=0) < 0 or codes.max(initial=0) > maxq:
        raise ValueError(f"{name}: codes outside [0, {maxq}] for {bits} bits")
    scale = np.asarray(rec["scale"], np.float32)
    if scale.shape != (n_out, n_groups):
        raise ValueError(f"{name}: scale shape {scale.shape} != [out, G] = {(n_out, n_groups)}")
    if not np.all(np.isfinite(scale)):
        raise ValueError(f"{name}: non-finite scales")
    if sym:
        zero = np.full((n_groups, n_out), 2 ** (bits - 1), np.int32)
    else:
        z = np.asarray(rec["zero"], np.float32)
        if z.shape != (n_out, n_groups):
            raise ValueError(f"{name}: zero shape {z.shape} != [out, G] = {(n_out, n_groups)}")
        if not np.array_equal(z, np.round(z)) or z.min(initial=0) < 0 or z.max(initial=0) > maxq:
            raise ValueError(f"{name}: zero points must be integers in [0, {maxq}]")
        zero = z.T.astype(np.int32)
    g_idx = np.asarray(rec.get("g_idx", np.arange(n_in) // g))
    if g_idx.shape != (n_in,) or g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= n_groups:
        raise ValueError(f"{name}: g_idx must be [{n_in}] group indices in [0, {n_groups})")
    out = IntCodes(codes.astype(np.int32), scale.T.copy(), zero, g_idx.astype(np.int32), bits, gs, sym)
    _check_reproduces(name, out.dequantize(np.float32), rec)
    return out


def fp_codes(rec: dict, name: str, what: str = "compressed-tensors FP8") -> FPCodes:
    """The :class:`FPCodes` (FP8 E4M3, per-channel or per-tensor scale) of one record, every check done."""
    from quant.packing import unpack_bits

    if not isinstance(rec, dict) or "weight" not in rec:
        raise ValueError(f"{name}: not a quant.ptq per-layer record")
    _no_runtime(rec, name, what)
    fmt = rec.get("format")
    n_in, n_out = np.shape(rec["weight"])
    if isinstance(fmt, FloatFormat):
        if fmt.name != "e4m3" or not fmt.scaled or fmt.in_axis != -2 or fmt.out_axis != -1:
            raise ValueError(f"{name}: the {what} format holds scaled e4m3 codes of an [in, out] kernel; this layer "
                             f"is {fmt}")
        qa = rec.get("packed")
        codes = np.asarray(unpack_bits(qa.packed, 8, n_out)).astype(np.uint8)
        scale = np.asarray(qa.scale, np.float32)
    elif fmt == "e4m3" and rec.get("codes") is not None:
        codes = np.asarray(rec["codes"]).astype(np.uint8)
        scale = np.asarray(rec["scale"], np.float32).T  # [G, out]
    else:
        kind = getattr(fmt, "name", fmt)
        raise ValueError(f"{name}: the {what} format holds FP8 E4M3 codes; this layer's format is {kind!r}")
    if scale.size == 1:
        strategy, scale = "tensor", scale.reshape(1)
    elif scale.shape == (1, n_out):
        strategy, scale = "channel", scale.reshape(n_out)
    else:
        raise ValueError(f"{name}: {what} holds one scale per output channel or per tensor; this layer has scales "
                         f"of shape {scale.shape} (groups along the inputs)")
    if not np.all(np.isfinite(scale)):
        raise ValueError(f"{name}: non-finite scales")
    out = FPCodes(codes, scale.astype(np.float32), strategy)
    _check_reproduces(name, out.dequantize(), rec)
    return out
