"""LoRC, low-rank compensation of the quantization error (Yao, Wu, Li, Youn & He 2023, "ZeroQuant-V2: Exploring
Post-training Quantization in LLMs from Comprehensive Study to Low Rank Compensation", arXiv 2303.08302; used on
top of FP4 weights in ZeroQuant-FP).

For a weight ``W`` (any kernel, seen as the matrix ``[prod(leading dims), out]``) and its quantized ``Ŵ`` from ANY
method (RTN, GPTQ, AWQ, ZeroQuant-FP, ...):

    E = W − Ŵ = U Σ Vᵀ                       (SVD)
    Û = U_r Σ_r^{1/2},   V̂ = V_r Σ_r^{1/2}    (the r largest singular triplets, √Σ split between both factors)
    Ŵ_LoRC = Ŵ + Q(Û) Q(V̂)ᵀ

with ``Q`` the factors' own quantizer (ZeroQuant-V2: 8 bits; here any :mod:`quant.formats` format, default symmetric
INT8 with one scale per rank component, i.e. per column of ``Û``/``V̂``; ``None`` keeps them in float). Without
factor quantization ``‖E − ÛV̂ᵀ‖_F`` is the optimal rank-r error (Eckart-Young), non-increasing in ``r``, and zero
at full rank.

Storage: ``r (m + n) b_f`` bits for the factors plus their scales, i.e. ``r (m + n) b_f / (m n) + scales`` extra
bits per weight of an ``m × n`` matrix (:func:`lorc_bits_per_weight`).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from quant.formats import IntFormat, compute_qparams, round_trip

__all__ = ["lorc", "lorc_factors", "lorc_weight", "lorc_bits_per_weight", "LORC_FACTOR_FORMAT"]

LORC_FACTOR_FORMAT = IntFormat(8, symmetric=True, granularity="channel")  # per rank component (column of Û / V̂)


def _check(rank, factor_format):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRC rank must be a positive integer, got {rank!r}")
    if factor_format is not None and not hasattr(factor_format, "bits"):
        raise ValueError(f"factor_format must be a quant.formats format or None, got {factor_format!r}")


def _matrix_shape(shape) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"LoRC needs a kernel with >= 2 dims, got shape {tuple(shape)}")
    return int(np.prod(shape[:-1])), int(shape[-1])


@jax.jit
def _svd_factors(w, w_hat, rank):
    """Float factors of one kernel with ``rank`` traced (one compile per shape for every rank and factor format):
    kept at full width ``min(m, n)`` with the columns beyond ``rank`` zeroed (they quantize to exactly zero: the
    scales are per column). Returns ``(Û, V̂, ‖E‖_F, ‖W‖_F)``."""
    m, n = _matrix_shape(w.shape)
    W = jnp.asarray(w, jnp.float32).reshape(m, n)
    E = W - jnp.asarray(w_hat, jnp.float32).reshape(m, n)
    U, S, Vt = jnp.linalg.svd(E, full_matrices=False)
    sq = jnp.where(jnp.arange(S.shape[0]) < rank, jnp.sqrt(S), 0.0)
    return U * sq, Vt.T * sq, jnp.linalg.norm(E), jnp.linalg.norm(W)


@functools.partial(jax.jit, static_argnames=("factor_format",))
def _compensate(w, w_hat, Uh, Vh, factor_format):
    """``(Ŵ + Q(Û)Q(V̂)ᵀ in w_hat's shape/dtype, Q(Û), Q(V̂), ‖W − Ŵ_LoRC‖_F)``."""
    if factor_format is not None:
        Uh, Vh = round_trip(Uh, factor_format), round_trip(Vh, factor_format)
    new = jnp.asarray(w_hat, jnp.float32) + (Uh @ Vh.T).reshape(jnp.shape(w_hat))
    err = jnp.linalg.norm(jnp.asarray(w, jnp.float32) - new)
    return new.astype(jnp.asarray(w_hat).dtype), Uh, Vh, err


@functools.partial(jax.jit, static_argnums=1)
def _pack_factor(f, factor_format):
    from quant.qarray import quantize

    return quantize(f, factor_format)


@jax.jit
def _same(qa, ref):
    from quant.qarray import dequantize

    return jnp.all(dequantize(qa, jnp.float32) == ref)


def _lorc(w, w_hat, rank, factor_format):
    Uh, Vh, norm_e, norm_w = _svd_factors(w, w_hat, rank)
    new, Uh, Vh, err = _compensate(w, w_hat, Uh, Vh, factor_format)
    return new, Uh, Vh, norm_e, err, norm_w


def _check_pair(w, w_hat, rank, factor_format):
    _check(rank, factor_format)
    if jnp.shape(w) != jnp.shape(w_hat):
        raise ValueError(f"w and w_hat shapes differ: {jnp.shape(w)} vs {jnp.shape(w_hat)}")
    m, n = _matrix_shape(jnp.shape(w))
    if rank > min(m, n):
        raise ValueError(f"LoRC rank {rank} exceeds min(m, n) = {min(m, n)} of the {m}x{n} matrix")


def lorc_factors(w, w_hat, rank: int, factor_format=LORC_FACTOR_FORMAT):
    """``(Û [m, r], V̂ [n, r])`` (float32, already fake-quantized with ``factor_format``) of ``E = w − w_hat``
    reshaped to ``[m, n] = [prod(leading dims), last dim]``. Jittable (``rank`` a Python int)."""
    _check_pair(w, w_hat, rank, factor_format)
    _, Uh, Vh, *_ = _lorc(w, w_hat, rank, factor_format)
    return Uh[:, :rank], Vh[:, :rank]


def lorc_weight(w, w_hat, rank: int, factor_format=LORC_FACTOR_FORMAT):
    """``Ŵ + Q(Û) Q(V̂)ᵀ`` in ``w_hat``'s shape and dtype (computed in float32). Jittable."""
    _check_pair(w, w_hat, rank, factor_format)
    return _lorc(w, w_hat, rank, factor_format)[0]


def lorc_bits_per_weight(shape, rank: int, factor_format=LORC_FACTOR_FORMAT, *, scale_bits: int = 16,
                         float_bits: int = 16) -> float:
    """Extra storage of LoRC per weight of a kernel of ``shape`` (``[m, n]`` after reshaping):

        (r (m + n) b_f + (#scales + #zero points) · scale_bits) / (m n)

    ``b_f`` = ``factor_format.bits`` (``float_bits`` when the factors stay in float, e.g. fp16, and then no scales).
    """
    _check(rank, factor_format)
    m, n = _matrix_shape(tuple(shape))
    if factor_format is None:
        return rank * (m + n) * float_bits / (m * n)
    extra = 0
    for d in (m, n):
        qp = jax.eval_shape(lambda a: compute_qparams(a, factor_format), jax.ShapeDtypeStruct((d, rank), jnp.float32))
        extra += int(np.prod(qp.scale.shape)) + (0 if qp.zero is None else int(np.prod(qp.zero.shape)))
    return (rank * (m + n) * int(factor_format.bits) + extra * scale_bits) / (m * n)


def lorc(params_float, params_quant, rank: int, *, report: dict | None = None, factor_format=LORC_FACTOR_FORMAT,
         include: str = r"kernel$", progress: bool | None = None):
    """LoRC on every leaf with >= 2 dims whose path matches ``include`` (``re.search``) and whose quantized value
    differs from the float one; every other leaf is taken from ``params_quant`` as is.

    A post-processing step, not a PTQ method of the ``(params, model, calib, config)`` convention: it needs no
    model or data, only the float weights and ANY method's result. ``params_float``: the original weights;
    ``params_quant``: the method's output (same structure); ``report``: that method's report, which makes the result
    exportable (:func:`quant.ptq.export.quantized_tree` packs the base codes and the factors).

    Returns ``(params, report)``: ``Ŵ + Q(Û)Q(V̂)ᵀ`` per compensated kernel (dtype of ``params_quant``) and ``{"method":
    "lorc", "rank", "factor_format", "base" (the base report's method or None), "layers": {path: record},
    "bits_per_weight"}``. Each record holds ``U``/``V`` (the fake-quantized factors ``[m, r]``/``[n, r]``),
    ``U_packed``/``V_packed`` (their :class:`quant.qarray.QuantizedArray`, ``None`` for float factors),
    ``error_before``/``error_after`` (relative Frobenius errors ``‖W − ·‖_F / ‖W‖_F``) and ``bits_per_weight`` (the
    factors' extra storage); with ``report`` it is the base method's record (``format``, ``codes``, ``scale``, ...)
    with ``weight`` = the compensated kernel, ``stored`` = what the base codes dequantize to, and ``lorc`` = the
    LoRC entries above. ``bits_per_weight`` of the report is the extra storage averaged over the compensated weights.
    """
    from jaxmodels.tree import check_compatible, flatten, unflatten

    from ._common import pbar

    _check(rank, factor_format)
    check_compatible(params_float, params_quant)
    if report is not None and not isinstance(report.get("layers"), dict):
        raise ValueError("report must be a quant.ptq report with a 'layers' dict")
    pat = re.compile(include)
    ff, fq = flatten(params_float), flatten(params_quant)
    targets = [p for p, v in fq.items() if pat.search(p) and getattr(v, "ndim", 0) >= 2]
    for p in targets:  # every shape checked before any SVD
        m, n = _matrix_shape(fq[p].shape)
        if rank > min(m, n):
            raise ValueError(f"LoRC rank {rank} exceeds min(m, n) = {min(m, n)} of {p} ({m}x{n})")
    out = dict(fq)
    layers = {}
    bits = n_w = 0.0
    for p in pbar(targets, progress, desc=f"LoRC r{rank}"):
        Uf, Vf, norm_e, norm_w = _svd_factors(ff[p], fq[p], rank)
        new, Uh, Vh, norm_after = _compensate(ff[p], fq[p], Uf, Vf, factor_format)
        norm_e, norm_w = float(norm_e), max(float(norm_w), 1e-30)
        if norm_e == 0.0:  # not quantized: nothing to compensate
            continue
        out[p] = new
        bpw = lorc_bits_per_weight(fq[p].shape, rank, factor_format)
        size = int(np.prod(fq[p].shape))
        U, V = Uh[:, :rank], Vh[:, :rank]
        packed = {"U_packed": None, "V_packed": None}
        if factor_format is not None:
            # the factors' qparams are per rank component (column) or span all columns of the zero-padded factor
            # by max |.|: quantizing the r kept columns alone gives the same codes and values
            packed = {"U_packed": _pack_factor(Uf[:, :rank], factor_format),
                      "V_packed": _pack_factor(Vf[:, :rank], factor_format)}
            for k, ref in (("U_packed", U), ("V_packed", V)):
                if not bool(_same(packed[k], ref)):
                    raise AssertionError(f"LoRC {p}: packed factor {k[0]} differs from the fake-quantized one")
        rec = {"U": U, "V": V, **packed, "factor_format": factor_format, "error_before": norm_e / norm_w,
               "error_after": float(norm_after) / norm_w, "bits_per_weight": bpw}
        if report is not None and p in report["layers"]:
            base = report["layers"][p]
            kept = {k: v for k, v in base.items() if k != "error"}  # (its output error was the base weight's)
            rec = {**kept, "weight": new, "stored": base.get("stored", base["weight"]), "lorc": rec,
                   "error_before": rec["error_before"], "error_after": rec["error_after"]}
        layers[p] = rec
        bits += bpw * size
        n_w += size
    return unflatten(out, like=params_quant), {"method": "lorc", "rank": int(rank), "factor_format": factor_format,
                                               "base": None if report is None else report.get("method"),
                                               "config": {"rank": int(rank), "factor_format": factor_format,
                                                          "base": None if report is None else report.get("config")},
                                               "layers": layers, "bits_per_weight": bits / n_w if n_w else 0.0}
