"""Round-to-nearest (RTN) weight quantization: the PTQ baseline, no calibration data.

    ŵ = s · (clamp(round(w / s) + z, 0, 2^b − 1) − z)

with (s, z) from the min/max of each (output channel, input group) — the grid the GPTQ reference uses for its RTN
baseline, so that GPTQ with an identity Hessian reproduces it exactly.
"""

from __future__ import annotations

import jax.numpy as jnp

from ._common import check_bits, grid_record, rtn_minmax

__all__ = ["rtn_quantize_weight"]


def rtn_quantize_weight(w, bits: int = 4, group_size: int = 128, sym: bool = False, *, kernel_layout: bool = True):
    """RTN of one Flax kernel ``w[in, out]`` (or ``W[out, in]`` with ``kernel_layout=False``).

    Returns the same dict as :func:`quant.ptq.gptq.gptq_quantize_weight` (``weight``, ``codes``, ``scale``, ``zero``,
    ``g_idx``, ``perm=None``).
    """
    check_bits(bits, group_size)
    w_in = jnp.asarray(w)
    W = jnp.asarray(w_in, jnp.float32)
    W = W.T if kernel_layout else W
    w_hat, codes, scale, zero = rtn_minmax(W, bits, group_size, sym)
    return grid_record(w_in, w_hat, codes, scale, zero, group_size, kernel_layout)


def rtn(params, model=None, calib_batch=None, *, bits: int = 4, group_size: int = 128, sym: bool = False,
        include: str = r"kernel$", progress: bool | None = None):
    """RTN every 2-D kernel of ``params`` whose path matches ``include`` (``model``: a
    :class:`quant.ptq.blocks.BlockModel`, then only its blocks' linears, with per-layer errors on ``calib_batch``).
    Returns ``(quantized_params, report)`` like :func:`quant.ptq.gptq.gptq`."""
    import re

    from jaxmodels.tree import flatten, unflatten

    from ._common import pbar
    from .blocks import capture_dense, dense_names, get_sub
    from .gptq import layer_error

    check_bits(bits, group_size)
    flat = dict(flatten(params))
    layers = {}
    if model is None:
        targets = [p for p, v in flat.items() if re.search(include, p) and getattr(v, "ndim", 0) == 2]
        for p in pbar(targets, progress, desc=f"RTN w{bits}"):
            layers[p] = rtn_quantize_weight(flat[p], bits, group_size, sym)
            flat[p] = layers[p]["weight"]
        return unflatten(flat, like=params), {"method": "rtn", "layers": layers}
    h = ctx = tok = None
    if calib_batch is not None:
        h, ctx = model.embed(params, calib_batch)
        tok = model.token_weight(ctx)
    for bp in pbar(model.block_paths, progress, desc=f"RTN w{bits}"):
        block = get_sub(params, bp)
        rec = capture_dense(model, block, h, ctx)[1] if h is not None else None
        for name in dense_names(block):
            p = f"{bp}/{name}/kernel"
            r = rtn_quantize_weight(flat[p], bits, group_size, sym)
            if rec is not None:
                r["error"] = layer_error(rec[name][0], flat[p], r["weight"], tok)
            layers[p] = r
            flat[p] = r["weight"]
        if h is not None:
            h = model.apply_block(block, h, ctx)
    return unflatten(flat, like=params), {"method": "rtn", "layers": layers,
                                          "config": {"bits": bits, "group_size": group_size, "sym": sym}}


def rtn_format(params, fmt, include: str = r"kernel$"):
    """RTN of every matching 2-D kernel with any :mod:`quant.formats` format/granularity (int, fp8/fp6/fp4, NF4,
    ternary, binary; tensor/channel/group/input-channel): ``ŵ = round_trip(w, fmt)``."""
    import re

    from jaxmodels.tree import map_with_path
    from quant.formats import round_trip

    return map_with_path(lambda p, v: round_trip(v, fmt) if re.search(include, p) and getattr(v, "ndim", 0) == 2
                         else v, params)
