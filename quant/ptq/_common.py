"""Shared helpers of the PTQ methods: the uniform min/max grid used by GPTQ/RTN (IST-DASLab/gptq ``quant.py``),
the AWQ grid (mit-han-lab/llm-awq ``pseudo_quantize_tensor``), progress bars and config validation. The grids are
each reference's statistics (range widened to contain 0 or not, all-zero rows, floors) fed to the one grid
definition of :mod:`quant.intgrid` (``quant.formats.minmax_grid`` / ``absmax_scale``), which ``IntFormat`` uses too.

Weights here are in the *GPTQ layout* ``W[out, in]`` (rows = output channels, "columns" = input features);
Flax ``Dense`` kernels are ``[in, out]`` and are transposed at the method boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmodels.progress import progress_bar as pbar  # the library's one bar helper, under its PTQ call sites' name
from quant.formats import absmax_scale, minmax_grid


def check_bits(bits: int, group_size: int) -> None:
    if not isinstance(bits, (int,)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise ValueError(f"group_size must be -1 (per output channel) or a positive integer, got {group_size!r}")


def minmax_params(x: jax.Array, bits: int, sym: bool) -> tuple[jax.Array, jax.Array]:
    """GPTQ ``Quantizer.find_params`` (weight=True, per channel) on rows of ``x[rows, cols]``.

    xmin = min(min_j x, 0), xmax = max(max_j x, 0); symmetric: xmax = max(|xmin|, xmax), xmin = -xmax;
    all-zero rows get [-1, 1]; then :func:`quant.formats.minmax_grid`: scale = (xmax - xmin) / maxq,
    zero = (maxq+1)/2 if sym (the *GPTQ offset grid*) else round(-xmin/scale). Returns ``(scale[rows], zero[rows])``.
    """
    xmin = jnp.minimum(x.min(axis=1), 0.0)
    xmax = jnp.maximum(x.max(axis=1), 0.0)
    if sym:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(both0, -1.0, xmin)
    xmax = jnp.where(both0, 1.0, xmax)
    return minmax_grid(xmin, xmax, bits, offset_zero=sym)


def quantize_codes(x, scale, zero, maxq):
    """q = clamp(round(x/scale) + zero, 0, maxq) (broadcasting ``scale``/``zero`` against ``x``)."""
    return jnp.clip(jnp.round(x / scale) + zero, 0, maxq)


def qdq(x, scale, zero, maxq):
    """GPTQ ``quantize``: scale * (clamp(round(x/scale) + zero, 0, maxq) - zero)."""
    return scale * (quantize_codes(x, scale, zero, maxq) - zero)


def group_view(w: jax.Array, group_size: int) -> jax.Array:
    """``w[out, in]`` -> ``[out, n_groups, group_size]`` (group_size=-1: one group spanning all inputs)."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise ValueError(f"input features {in_f} are not divisible by group_size {gs}")
    return w.reshape(out_f, in_f // gs, gs)


def rtn_minmax(w: jax.Array, bits: int, group_size: int = -1, sym: bool = False):
    """Round-to-nearest of ``w[out, in]`` on the GPTQ min/max grid per (output channel, input group).

    Returns ``(w_hat, codes[out, in] uint8, scale[out, n_groups], zero[out, n_groups])``.
    """
    maxq = 2**bits - 1
    g = group_view(w, group_size)
    o, ng, gs = g.shape
    scale, zero = minmax_params(g.reshape(o * ng, gs), bits, sym)
    scale, zero = scale.reshape(o, ng), zero.reshape(o, ng)
    codes = quantize_codes(g, scale[..., None], zero[..., None], maxq)
    w_hat = (scale[..., None] * (codes - zero[..., None])).reshape(w.shape)
    return w_hat, codes.reshape(w.shape).astype(jnp.uint8), scale, zero


AWQ_MIN_RANGE = 1e-5  # llm-awq's floor on max - min (and on max|w| without a zero point)


def awq_grid(w: jax.Array, bits: int, group_size: int = 128):
    """Asymmetric llm-awq grid of ``w[out, in]``: ``(scale, zero)`` of shape ``[out, n_groups]``:
    :func:`quant.formats.minmax_grid` on ``[min, max]`` (not widened to contain 0) with ``min_range=1e-5``."""
    g = group_view(w, group_size)
    return minmax_grid(g.min(-1), g.max(-1), bits, min_range=AWQ_MIN_RANGE)


def awq_pseudo_quantize(w: jax.Array, bits: int, group_size: int = 128, zero_point: bool = True) -> jax.Array:
    """llm-awq ``pseudo_quantize_tensor`` on ``w[out, in]`` per (output channel, input group).

    Asymmetric: scale = max(max - min, 1e-5) / (2^b - 1), zero = clamp(-round(min/scale), 0, 2^b - 1),
    w_hat = (clamp(round(w/scale) + zero, 0, 2^b - 1) - zero) * scale.
    Symmetric: scale = max|w| / (2^(b-1) - 1), w_hat = clamp(round(w/scale), -2^(b-1), 2^(b-1) - 1) * scale.
    """
    g = group_view(w, group_size)
    if zero_point:
        maxq = 2**bits - 1
        scale, zero = minmax_grid(g.min(-1, keepdims=True), g.max(-1, keepdims=True), bits, min_range=AWQ_MIN_RANGE)
        out = (jnp.clip(jnp.round(g / scale) + zero, 0, maxq) - zero) * scale
    else:  # the absmax grid
        qmax = 2 ** (bits - 1) - 1
        scale = absmax_scale(jnp.abs(g).max(-1, keepdims=True), bits, min_amax=AWQ_MIN_RANGE)
        out = jnp.clip(jnp.round(g / scale), -qmax - 1, qmax) * scale
    return out.reshape(w.shape)


def grid_record(w_in, w_hat, codes, scale, zero, group_size: int, kernel_layout: bool = True, *, bits: int,
                sym: bool, **extra) -> dict:
    """The per-layer record (the report schema of :mod:`quant.ptq`) of a PTQ method whose weights lie on a uniform
    integer grid with contiguous input groups: ``weight`` (in ``w_in``'s layout and dtype), ``format="int"``,
    ``bits``, ``group_size``, ``sym``, ``codes``, ``scale``/``zero`` ``[out, G]``, ``g_idx``, ``perm=None`` and any
    ``extra`` entries. ``w_hat``/``codes`` are in the GPTQ layout ``[out, in]``; ``kernel_layout``: return them as
    Flax kernels ``[in, out]``. :func:`quant.ptq.export.pack_layer` packs it."""
    C = w_hat.shape[1]
    gs = C if group_size == -1 else group_size
    return {
        "weight": (w_hat.T if kernel_layout else w_hat).astype(jnp.asarray(w_in).dtype),
        "format": "int",
        "bits": int(bits),
        "group_size": int(group_size),
        "sym": bool(sym),
        "codes": codes.T if kernel_layout else codes,
        "scale": scale,
        "zero": zero,
        "g_idx": (jnp.arange(C) // gs).astype(jnp.int32),
        "perm": None,
        **extra,
    }
