"""ZeroQ's calibration, quantized model and mixed precision (Cai et al., CVPR 2020; the equations are in
:mod:`quant.ptq.zeroq`, which re-exports every name here): static min/max activation ranges of every quantizable
layer input (:func:`calibrate_ranges`), the quantized apply with those ranges and per-channel weights
(:func:`quantized_apply`), the KL sensitivity Ω_i(k) (:func:`sensitivity`) and the Pareto frontier / bit selection
under a size budget (:func:`pareto_frontier`, :func:`select_bits`).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.capture import module_path
from jaxmodels.sharding import DATA
from jaxmodels.train import synchronize_on_cpu_mesh
from jaxmodels.tree import flatten, unflatten
from quant.fake_quant import fake_quant
from quant.formats import IntFormat, compute_qparams
from quant.qat import QUANTIZABLE_MODULES, FakeQuantW, QATConfig, quantize_weights
from quant.ptq._common import pbar

PyTree = Any

__all__ = ["calibrate_ranges", "quantized_apply", "sensitivity", "pareto_frontier", "select_bits",
           "quantizable_layers"]


# ------------------------------------------------------------------------------------------------ calibration

def _compile(patterns):
    if patterns is None:
        return None
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    return tuple(re.compile(p) if isinstance(p, str) else p for p in patterns)


def _selected(path, inc, exc) -> bool:
    if inc is not None and not any(p.search(path) for p in inc):
        return False
    return not (exc is not None and any(p.search(path) for p in exc))


def _layer_ranges_impl(model, inc, exc, variables, x):
    got: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, QUANTIZABLE_MODULES) and args:
            path = module_path(mod)
            if _selected(path, inc, exc):
                a = args[0].astype(jnp.float32)
                r = jnp.stack([jnp.minimum(a.min(), 0.0), jnp.maximum(a.max(), 0.0)])
                got[path] = r if path not in got else jnp.stack([jnp.minimum(got[path][0], r[0]),
                                                                 jnp.maximum(got[path][1], r[1])])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, x)
    return got


_layer_ranges = jax.jit(_layer_ranges_impl, static_argnums=(0, 1, 2))


def quantizable_layers(model: nn.Module, variables: PyTree, x: jax.Array, include=None, exclude=None) -> list[str]:
    """Module paths of the Dense / DenseGeneral / Conv / Einsum layers the model calls on ``x``, in call order
    (abstract evaluation, no FLOPs)."""
    inc, exc = _compile(include), _compile(exclude)
    shapes = jax.eval_shape(lambda v, z: _layer_ranges_impl(model, inc, exc, v, z), variables, x)
    return list(shapes)


def calibrate_ranges(model: nn.Module, variables: PyTree, batches: jax.Array | Iterable[jax.Array], *,
                     include=None, exclude=None, mesh: Mesh | None = None,
                     progress: bool | None = None) -> dict[str, jax.Array]:
    """Static per-tensor activation ranges (ZeroQ ``QuantAct`` with ``running_stat``): for every selected
    Dense / DenseGeneral / Conv / Einsum input ``x``, ``[lo, hi] = [min(0, min x), max(0, max x)]`` running over
    ``batches`` (an array = one batch, or an iterable of arrays; e.g. :func:`distill_data`'s ``data``).

    ``include`` / ``exclude``: regexes (``re.search``) on the module path. With ``mesh`` each batch is sharded over
    ``"data"``; min/max are exact, so the ranges equal the single-device ones. Returns ``{path: float32 [2]}``.
    """
    inc, exc = _compile(include), _compile(exclude)
    if isinstance(batches, (jax.Array, np.ndarray)):
        batches = [batches]
    fn = _layer_ranges
    if mesh is not None:
        fn = synchronize_on_cpu_mesh(_layer_ranges, mesh)
        variables = jax.device_put(variables, NamedSharding(mesh, P()))
    out: dict[str, jax.Array] | None = None
    for x in pbar(batches, progress, desc="zeroq calibrate"):
        x = jnp.asarray(x)
        if out is None:  # validate the selection before running anything
            if not quantizable_layers(model, variables, x, include, exclude):
                raise ValueError("zeroq: no Dense/DenseGeneral/Conv/Einsum layer matched include/exclude")
        if mesh is not None:
            x = jax.device_put(x, NamedSharding(mesh, P(DATA, *([None] * (x.ndim - 1)))))
        r = fn(model, inc, exc, variables, x)
        out = r if out is None else {k: jnp.stack([jnp.minimum(out[k][0], v[0]), jnp.maximum(out[k][1], v[1])])
                                     for k, v in r.items()}
    if out is None:
        raise ValueError("zeroq: `batches` is empty")
    return out


# ------------------------------------------------------------------------------------------------ quantized model

def _check_bits(bits, what):
    if bits is not None and (not isinstance(bits, (int, np.integer)) or isinstance(bits, bool)
                             or not 2 <= bits <= 8):
        raise ValueError(f"zeroq: {what} must be an integer in 2..8 (or None for float), got {bits!r}")


def _weight_config(weight_bits, layer_bits) -> QATConfig:
    fmt = lambda b: FakeQuantW(IntFormat(int(b), symmetric=False, granularity="channel"))  # noqa: E731
    rules = []
    for path, b in (layer_bits or {}).items():
        rules.append((f"^{re.escape(path)}/kernel$", None if b is None else fmt(b)))
    if weight_bits is not None:
        rules.append((r"kernel$", fmt(weight_bits)))
    return QATConfig(weights=tuple(rules))


def quantized_apply(model: nn.Module, ranges: Mapping[str, jax.Array] | None, weight_bits: int | None = 8,
                    act_bits: int | None = 8, layer_bits: Mapping[str, int | None] | None = None,
                    layer_act_bits: Mapping[str, int | None] | None = None):
    """``apply(variables, x)``: ``model.apply`` with ZeroQ's fake quantization (Cai et al., 2020; reference
    ``quant_modules.py``):

    * weights: every ``kernel`` (``layer_bits[path]`` bits for the layers it names — mixed precision —, else
      ``weight_bits``; ``None`` keeps float) per output channel, asymmetric min/max:
      ``s = (hi − lo) / (2^b − 1)``, ``ŵ = s (clip(round(w / s) + z, 0, 2^b − 1) − z)``;
    * activations: the input of every layer in ``ranges`` (:func:`calibrate_ranges`) with its static per-tensor
      ``[lo, hi]`` and the same asymmetric grid at ``layer_act_bits[path]`` bits for the layers it names (e.g. the
      8-bit image entering the stem), else ``act_bits`` (``None``: float activations).

    Straight-through gradients (:func:`quant.fake_quant`); jit-able; returns the model's output dtype.
    """
    _check_bits(weight_bits, "weight_bits")
    _check_bits(act_bits, "act_bits")
    for p, b in (layer_bits or {}).items():
        _check_bits(b, f"layer_bits[{p!r}]")
    for p, b in (layer_act_bits or {}).items():
        _check_bits(b, f"layer_act_bits[{p!r}]")
    ranges = dict(ranges or {})
    layer_act_bits = dict(layer_act_bits or {})
    act_of = {p: layer_act_bits.get(p, act_bits) for p in ranges}
    if (act_bits is not None or any(b is not None for b in layer_act_bits.values())) and not ranges:
        raise ValueError("zeroq: quantized activations need calibrated ranges (calibrate_ranges)")
    unknown = [p for p in layer_act_bits if p not in ranges]
    if unknown:
        raise ValueError(f"zeroq: layer_act_bits names {unknown[0]!r}, which has no calibrated range")
    cfg = _weight_config(weight_bits, layer_bits)
    fmts = {p: IntFormat(int(b), symmetric=False, granularity="tensor") for p, b in act_of.items() if b is not None}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, QUANTIZABLE_MODULES) or not args:
            return next_fun(*args, **kwargs)
        path = module_path(mod)
        if path not in fmts:
            return next_fun(*args, **kwargs)
        x, afmt = args[0], fmts[path]
        qp = compute_qparams(ranges[path], afmt)  # min/max of [lo, hi] = (lo, hi): IntFormat's asymmetric grid
        return next_fun(fake_quant(x, afmt, qp), *args[1:], **kwargs)

    def apply(variables, x):
        variables = dict(variables)
        variables["params"] = quantize_weights(cfg, variables["params"])
        with nn.intercept_methods(interceptor):
            return model.apply(variables, x)

    return apply


# ------------------------------------------------------------------------------------------------ mixed precision

def _kl_impl(model, variables, qparams, x):
    p = jax.nn.log_softmax(model.apply(variables, x).astype(jnp.float32), -1)
    q = jax.nn.log_softmax(model.apply({**variables, "params": qparams}, x).astype(jnp.float32), -1)
    return jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1))


_kl = jax.jit(_kl_impl, static_argnums=0)
# every kernel quantized at each width, one program for all widths
_quantize_all = jax.jit(lambda bits, params: tuple(quantize_weights(_weight_config(b, None), params) for b in bits),
                        static_argnums=0)


def sensitivity(model: nn.Module, variables: PyTree, data: jax.Array, bits: Sequence[int] = (2, 4, 8),
                include=None, exclude=None, progress: bool | None = None) -> dict[str, dict[int, float]]:
    """ZeroQ sensitivity (paper Eq. 3) of every selected layer at every bit width::

        Ω_i(k) = (1/N) Σ_j KL( softmax M(θ; x_j) ‖ softmax M(θ̃_i(k); x_j) )

    where ``θ̃_i(k)`` quantizes only layer ``i``'s kernel to ``k`` bits (per output channel, asymmetric min/max, as
    :func:`quantized_apply`) and ``x_j`` are the (distilled) inputs ``data``. Returns ``{layer path: {k: Ω}}``
    (floats); one compile for all layers and widths.
    """
    bits = tuple(bits)
    if not bits:
        raise ValueError("zeroq: bits must name at least one bit width")
    for b in bits:
        _check_bits(b, "every entry of bits")
    layers = quantizable_layers(model, variables, data, include, exclude)
    flat = flatten(variables["params"])
    layers = [p for p in layers if p + "/kernel" in flat]
    if not layers:
        raise ValueError("zeroq: no layer with a kernel matched include/exclude")
    # Quantize every kernel once per width, then swap one layer's kernel at a time (no per-layer requantization).
    quantized = dict(zip(bits, map(flatten, _quantize_all(bits, variables["params"]))))
    out: dict[str, dict[int, float]] = {p: {} for p in layers}
    for path, b in pbar([(p, b) for p in layers for b in bits], progress, desc="zeroq sensitivity"):
        qflat = dict(flat)
        qflat[path + "/kernel"] = quantized[b][path + "/kernel"]
        out[path][b] = float(_kl(model, variables, unflatten(qflat, variables["params"]), data))
    return out


def pareto_frontier(sens: Mapping[str, Mapping[int, float]], num_params: Mapping[str, int]
                    ) -> list[tuple[int, float, dict[str, int]]]:
    """The Pareto frontier of ZeroQ's mixed-precision search (paper §3.2): every non-dominated
    ``(size, Ω, config)`` with ``size = Σ_i |θ_i| k_i`` bits and ``Ω = Σ_i Ω_i(k_i)``, found by dynamic programming
    over the layers (after each layer only the configurations that no other beats in both size and Ω are kept).
    Sorted by size; Ω strictly decreases along it."""
    if not sens:
        raise ValueError("zeroq: sens is empty")
    empty = [p for p, per_bits in sens.items() if not per_bits]
    if empty:
        raise ValueError(f"zeroq: sens[{empty[0]!r}] has no bit width")
    missing = [p for p in sens if p not in num_params]
    if missing:
        raise ValueError(f"zeroq: num_params has no entry for layer {missing[0]!r}")
    front: list[tuple[int, float, dict[str, int]]] = [(0, 0.0, {})]
    for path, per_bits in sens.items():
        cand = [(s + int(num_params[path]) * int(k), o + float(v), {**cfg, path: int(k)})
                for s, o, cfg in front for k, v in per_bits.items()]
        cand.sort(key=lambda t: (t[0], t[1]))
        front = []
        for c in cand:
            if not front or c[1] < front[-1][1]:
                front.append(c)
    return front


def select_bits(sens: Mapping[str, Mapping[int, float]], num_params: Mapping[str, int], budget_bits: int
                ) -> dict[str, int]:
    """The configuration of minimal ``Σ_i Ω_i(k_i)`` with ``Σ_i |θ_i| k_i <= budget_bits`` (ZeroQ's choice on the
    Pareto frontier for a target model size)."""
    front = pareto_frontier(sens, num_params)
    ok = [f for f in front if f[0] <= budget_bits]
    if not ok:
        raise ValueError(f"zeroq: budget {budget_bits} bits is below the smallest configuration ({front[0][0]} bits)")
    return ok[-1][2]
