"""Round-to-nearest (RTN) weight quantization: the PTQ baseline, no calibration data.

    ŵ = s · (clamp(round(w / s) + z, 0, 2^b − 1) − z)

with (s, z) from the min/max of each (output channel, input group) — the grid the GPTQ reference uses for its RTN
baseline (IST-DASLab/gptq ``quant.py``), so that GPTQ with an identity Hessian reproduces it exactly.

:func:`rtn_format` rounds to any :mod:`quant.formats` format instead (``ŵ = round_trip(w, fmt)``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ._common import check_bits, grid_record, rtn_minmax

__all__ = ["RTNConfig", "rtn", "rtn_quantize_weight", "rtn_format"]

_rtn_minmax = jax.jit(rtn_minmax, static_argnums=(1, 2, 3))  # one compile per layer shape, not one per eager op


def _format_round_trip_impl(w, fmt):
    from quant.qarray import dequantize, quantize

    qa = quantize(w, fmt)
    return qa, dequantize(qa)


# one compiled program per (layer shape, dtype, format) instead of quantize/dequantize's eager ops, each of which
# compiled (and cached) its own small program for every layer shape: on the tiny HF Llama that was ~6 CPU-s and
# ~250 MiB of RSS per format for 14 linears of 3 shapes (the same ops, so the same values: the tests compare the
# records bit for bit with the eager quant.qarray round trip)
_format_round_trip_jit = jax.jit(_format_round_trip_impl, static_argnums=(1,))


def format_round_trip(w, fmt):
    """``(quantize(w, fmt), dequantize(that))``, jitted once per (shape, dtype, fmt); eager if ``fmt`` is unhashable."""
    try:
        hash(fmt)
    except TypeError:
        return _format_round_trip_impl(w, fmt)
    return _format_round_trip_jit(w, fmt)


@dataclasses.dataclass(frozen=True)
class RTNConfig:
    """``bits`` (2..8), ``group_size`` (input features per scale; ``-1``: one per output channel), ``sym``: the
    GPTQ reference's symmetric grid (zero point fixed at 2^(b−1), scale 2·max|w| / (2^b − 1))."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False

    def validate(self) -> None:
        check_bits(self.bits, self.group_size)
        if not isinstance(self.sym, bool):
            raise ValueError(f"sym must be a bool, got {self.sym!r}")


def rtn_quantize_weight(w, H=None, config: RTNConfig = RTNConfig(), *, kernel_layout: bool = True) -> dict:
    """RTN of one Flax kernel ``w[in, out]`` (or ``W[out, in]`` with ``kernel_layout=False``). ``H`` (the layer
    statistic of the ``*_quantize_weight(w, H_or_stats, config)`` convention) is unused: RTN needs no data.

    Returns the per-layer record of :mod:`quant.ptq` (``weight``, ``format="int"``, ``bits``, ``group_size``,
    ``sym``, ``codes``, ``scale``, ``zero``, ``g_idx``, ``perm=None``), as :func:`quant.ptq.gptq.gptq_quantize_weight`.
    """
    if not isinstance(config, RTNConfig):
        raise TypeError(f"config must be an RTNConfig, got {type(config).__name__}")
    config.validate()
    w_in = jnp.asarray(w)
    if w_in.ndim != 2:
        raise ValueError(f"expected a 2-D kernel, got shape {w_in.shape}")
    W = jnp.asarray(w_in, jnp.float32)
    W = W.T if kernel_layout else W
    w_hat, codes, scale, zero = _rtn_minmax(W, config.bits, config.group_size, config.sym)
    return grid_record(w_in, w_hat, codes, scale, zero, config.group_size, kernel_layout, bits=config.bits,
                       sym=config.sym)


def rtn(params, model=None, calib_batch=None, config: RTNConfig = RTNConfig(), *, include: str = r"kernel$",
        progress: bool | None = None):
    """RTN every 2-D kernel of ``params`` whose path matches ``include`` (``model``: a
    :class:`quant.ptq.blocks.BlockModel`, then only its blocks' linears, with per-layer errors on ``calib_batch``).
    Returns ``(quantized_params, report)`` like :func:`quant.ptq.gptq.gptq` (``report["config"]`` always present)."""
    import re

    from jaxmodels.tree import flatten, unflatten

    from ._common import pbar

    if not isinstance(config, RTNConfig):
        raise TypeError(f"config must be an RTNConfig (rtn(params, model, calib, RTNConfig(bits, group_size))), "
                        f"got {type(config).__name__}")
    config.validate()
    flat = dict(flatten(params))
    layers = {}
    report = {"method": "rtn", "config": dataclasses.asdict(config), "layers": layers}
    if model is None:
        targets = [p for p, v in flat.items() if re.search(include, p) and getattr(v, "ndim", 0) == 2]
        gs = config.group_size
        for p in targets:  # every shape checked before any work
            if gs != -1 and flat[p].shape[0] % gs:
                raise ValueError(f"{p}: input features {flat[p].shape[0]} are not divisible by group_size {gs}")
        for p in pbar(targets, progress, desc=f"RTN w{config.bits}"):
            layers[p] = rtn_quantize_weight(flat[p], None, config)
            flat[p] = layers[p]["weight"]
        return unflatten(flat, like=params), report
    from .engine import quantize_layers

    def layer(w, stats, cfg):
        return rtn_quantize_weight(w, None, cfg)

    # the float stream feeds the blocks (RTN's weights need no data; its errors are judged on float inputs)
    out, rep = quantize_layers(params, model, calib_batch, layer, config, feed="float", progress=progress,
                               desc=f"RTN w{config.bits}", method="rtn", needs=None)
    return out, rep


def rtn_format(params, fmt, include: str = r"kernel$"):
    """RTN of every matching 2-D kernel with any :mod:`quant.formats` format/granularity (int, fp8/fp6/fp4, NF4,
    ternary, binary; tensor/channel/group/input-channel): ``ŵ = round_trip(w, fmt)``.

    Returns ``(params, report)``; every layer record holds ``weight`` (= ``round_trip(w, fmt)``, bit for bit),
    ``format`` (the format object), ``bits``, ``group_size`` and ``packed``: the :class:`quant.qarray.QuantizedArray`
    that :func:`quant.ptq.export.quantized_tree` stores."""
    import re

    from jaxmodels.tree import flatten, unflatten

    if not hasattr(fmt, "bits") or not hasattr(fmt, "granularity"):
        raise TypeError(f"fmt must be a quant.formats format, got {fmt!r}")
    flat = dict(flatten(params))
    layers = {}
    for p, v in flat.items():
        if re.search(include, p) and getattr(v, "ndim", 0) == 2:
            qa, w_hat = format_round_trip(v, fmt)
            layers[p] = {"weight": w_hat, "format": fmt, "bits": int(fmt.bits),
                         "group_size": getattr(fmt, "group_size", None), "packed": qa}
            flat[p] = w_hat
    return unflatten(flat, like=params), {"method": "rtn_format", "config": {"format": fmt}, "layers": layers}
