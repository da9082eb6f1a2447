"""Quantization-aware training wrapper for any linen model, configured by path-regex rules (no model edits).

Weights: before ``model.apply`` every parameter whose path matches a weight rule is replaced by its fake-quantized
value (straight-through gradients reach the latent float weights; learnable LSQ steps receive their LSQ gradients).
Activations: ``nn.intercept_methods`` fake-quantizes the input of every ``Dense`` / ``DenseGeneral`` / ``Conv`` /
``Einsum`` whose module path matches an activation rule. Query-key reparameterization (:mod:`quant.qkr`) replaces
matching attention modules' logits computation, again by interception.

Rules are ``(regex, quantizer)`` pairs, first ``re.search`` match wins, ``None`` keeps the leaf in float, e.g.::

    cfg = QATConfig(
        weights=((r"patch_embed|head|embed", None), (r"kernel$", StatsQW(4))),
        activations=((r"mlp/fc\\d", DynamicActQ(8)),),
        qkr=QKRConfig(r"attn$", bits=4, num_heads=4))
    qvars = qat_init(cfg, model, params, x_sample)        # {"params": params, "quant": {learnable steps}}
    apply = qat_apply(cfg, model)                          # apply(qvars, x) -> model output
    loss = lambda qv: ce(apply(qv, x), y); jax.grad(loss)(qvars)

Weight quantizers: :class:`FakeQuantW` (any :mod:`quant.formats` format, min-max / absmax parameters, STE),
:class:`LSQW` (LSQ / LSQ+), :class:`StatsQW` (OFQ StatsQ). Activation quantizers: :class:`DynamicActQ`, :class:`StaticActQ` (needs ``calib`` from
:func:`qat_calibrate`), :class:`LSQActQ` (learnable step, initialised from the sample batch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.capture import module_path
from jaxmodels.tree import flatten, map_with_path
from quant.activation import amax_stat, dynamic_act_quant, static_act_quant
from quant.fake_quant import fake_quant
from quant.formats import Format, compute_qparams, quantize_levels
from quant.lsq import lsq_fake_quant, lsq_init, lsq_levels, lsqplus_init
from quant.qarray import match_rule
from quant.statsq import statsq_fake_quant, statsq_levels

__all__ = ["FakeQuantW", "LSQW", "StatsQW", "DynamicActQ", "StaticActQ", "LSQActQ", "QKRConfig",
           "QATConfig", "qat_init", "qat_apply", "qat_calibrate", "quantize_weights", "weight_levels",
           "QUANTIZABLE_MODULES"]

QUANTIZABLE_MODULES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)


# ------------------------------------------------------------------------------------------------ quantizer configs

@dataclasses.dataclass(frozen=True)
class FakeQuantW:
    """Fixed-format fake quantization with parameters from the weight's own statistics (``compute_qparams``)."""
    fmt: Format
    ste: str = "clipped"


@dataclasses.dataclass(frozen=True)
class LSQW:
    """LSQ (``plus=False``) / LSQ+ (``plus=True``, learnable offset) on weights; per output channel by default."""
    bits: int
    per_channel: bool = True
    plus: bool = False


@dataclasses.dataclass(frozen=True)
class StatsQW:
    """OFQ StatsQ: scale ``2 mean|W|`` per output channel, not learned."""
    bits: int


@dataclasses.dataclass(frozen=True)
class DynamicActQ:
    """Dynamic activation fake quantization (:func:`quant.activation.dynamic_act_quant`): ``bits``-bit scales from the
    input's own statistics per ``"token"`` (last axis reduced) or per ``"tensor"``, symmetric absmax or asymmetric
    min/max (``symmetric=False``); straight-through gradients."""

    bits: int = 8
    granularity: str = "token"
    symmetric: bool = True


@dataclasses.dataclass(frozen=True)
class StaticActQ:
    """Static symmetric activation fake quantization (:func:`quant.activation.static_act_quant`) with a calibrated
    ``amax`` per module (``calib`` from :func:`qat_calibrate`): ``max|x|`` over the calibration batches, per tensor or
    per channel (``per_channel``), or a ``percentile`` of ``|x|`` to clip outliers."""

    bits: int = 8
    per_channel: bool = False
    percentile: float | None = None


@dataclasses.dataclass(frozen=True)
class LSQActQ:
    """LSQ (``plus=False``) / LSQ+ (``plus=True``, learnable offset) on a module's input: one learnable step per module,
    initialised from the sample batch by :func:`qat_init`, ``bits`` wide, ``signed`` or unsigned range."""

    bits: int = 8
    signed: bool = True
    plus: bool = False


@dataclasses.dataclass(frozen=True)
class QKRConfig:
    """Query-key reparameterization on attention modules whose path matches ``pattern`` (see :mod:`quant.qkr`)."""
    pattern: str
    bits: int | None  # None: reparameterize only (float W_qk)
    num_heads: int
    query: str = "query"
    key: str = "key"


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """The QAT rules (module docstring): ``weights`` and ``activations`` are ``(regex, quantizer)`` pairs (first
    ``re.search`` match on the path wins; None keeps it in float) with :class:`FakeQuantW` / :class:`LSQW` /
    :class:`StatsQW` for weights and :class:`DynamicActQ` / :class:`StaticActQ` / :class:`LSQActQ` for activations,
    ``qkr`` an optional :class:`QKRConfig`, and ``min_ndim`` (leaves with fewer axes, e.g. biases and norm scales,
    stay in float). Invalid rules raise at construction."""

    weights: tuple = ()
    activations: tuple = ()
    qkr: QKRConfig | None = None
    min_ndim: int = 2  # leaves with fewer dims (biases, norm scales) stay in float

    def __post_init__(self):
        for rules, kinds, what in ((self.weights, (FakeQuantW, LSQW, StatsQW), "weight"),
                                   (self.activations, (DynamicActQ, StaticActQ, LSQActQ), "activation")):
            for rule in rules:
                if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
                    raise ValueError(f"{what} rules must be (regex, quantizer) pairs, got {rule!r}")
                if rule[1] is not None and not isinstance(rule[1], kinds):
                    raise ValueError(f"{what} rule {rule[0]!r}: quantizer must be one of "
                                     f"{[k.__name__ for k in kinds]} or None, got {rule[1]!r}")


# ------------------------------------------------------------------------------------------------ weights

def _qkr_skip(cfg: QATConfig, path: str) -> bool:
    """Query/key kernels of QKR attention modules are quantized as the product W_q W_k^T, not separately."""
    if cfg.qkr is None:
        return False
    import re
    parts = path.split("/")
    if len(parts) < 3 or parts[-2] not in (cfg.qkr.query, cfg.qkr.key):
        return False
    return re.search(cfg.qkr.pattern, "/".join(parts[:-2])) is not None


def _weight_rule(cfg: QATConfig, path: str, leaf):
    if jnp.ndim(leaf) < cfg.min_ndim or _qkr_skip(cfg, path):
        return None
    return match_rule(path, cfg.weights)


def quantize_weights(cfg: QATConfig, params: Any, quant_state: dict | None = None) -> Any:
    """``params`` with every matched weight replaced by its fake-quantized value."""
    quant_state = quant_state or {}

    def fn(path, w):
        q = _weight_rule(cfg, path, w)
        if q is None:
            return w
        if isinstance(q, FakeQuantW):
            return fake_quant(w, q.fmt, ste=q.ste)
        if isinstance(q, LSQW):
            st = quant_state["w:" + path]
            return lsq_fake_quant(w, st["step"], q.bits, True, st.get("offset"))
        if isinstance(q, StatsQW):
            return statsq_fake_quant(w, q.bits)
        raise TypeError(q)

    return map_with_path(fn, params)


def weight_levels(cfg: QATConfig, qvars: dict) -> dict[str, jax.Array]:
    """Integer levels of every quantized weight (``{path: levels}``, flat), incl. QKR products ``.../W_qk``; feed
    them to :func:`quant.oscillation.oscillation_update`."""
    params, qs = qvars["params"], qvars.get("quant", {})
    out = {}
    for path, w in flatten(params).items():
        q = _weight_rule(cfg, path, w)
        if q is None:
            continue
        if isinstance(q, FakeQuantW):
            out[path] = quantize_levels(w, q.fmt, compute_qparams(w, q.fmt))
        elif isinstance(q, LSQW):
            st = qs["w:" + path]
            out[path] = lsq_levels(w, st["step"], q.bits, True, st.get("offset"))
        elif isinstance(q, StatsQW):
            out[path] = statsq_levels(w, q.bits)
    if cfg.qkr is not None:
        from quant.qkr import qk_product
        flat = flatten(params)
        import re
        for path in flat:
            parts = path.split("/")
            if len(parts) >= 3 and parts[-2] == cfg.qkr.query and parts[-1] == "kernel":
                prefix = "/".join(parts[:-2])
                if re.search(cfg.qkr.pattern, prefix):
                    wq, wk = flat[path], flat[f"{prefix}/{cfg.qkr.key}/kernel"]
                    if cfg.qkr.bits is None:
                        continue
                    w_qk = qk_product(wq, wk, cfg.qkr.num_heads).reshape(-1, wq.shape[0])
                    out[prefix + "/W_qk"] = statsq_levels(w_qk, cfg.qkr.bits, out_axis=0)
    return out


# ------------------------------------------------------------------------------------------------ activations

def _act_interceptor(cfg: QATConfig, quant_state: dict, calib: dict | None, record: dict | None):
    from quant.qkr import qkr_attention

    def interceptor(f, args, kwargs, ctx):
        mod = ctx.module
        if ctx.method_name != "__call__":
            return f(*args, **kwargs)
        path = module_path(mod)
        if cfg.qkr is not None and hasattr(mod, "num_heads"):
            import re
            if re.search(cfg.qkr.pattern, path):
                if mod.num_heads != cfg.qkr.num_heads:
                    raise ValueError(f"QKRConfig.num_heads={cfg.qkr.num_heads} but {path!r} has {mod.num_heads}")
                if not mod.is_initializing() and record is None:
                    return qkr_attention(mod, cfg.qkr, *args, **kwargs)
        if not isinstance(mod, QUANTIZABLE_MODULES) or not args:
            return f(*args, **kwargs)
        q = match_rule(path, cfg.activations)
        if q is None:
            return f(*args, **kwargs)
        x, rest = args[0], args[1:]
        if record is not None:  # calibration / init pass: record statistics, run in float
            record.setdefault(path, []).append(x)
            return f(*args, **kwargs)
        if isinstance(q, DynamicActQ):
            x = dynamic_act_quant(x, q.bits, q.granularity, q.symmetric)
        elif isinstance(q, StaticActQ):
            if calib is None or path not in calib:
                raise ValueError(f"StaticActQ at {path!r} needs calib from qat_calibrate")
            x = static_act_quant(x, calib[path], q.bits)
        elif isinstance(q, LSQActQ):
            st = quant_state["a:" + path]
            x = lsq_fake_quant(x, st["step"], q.bits, q.signed, st.get("offset"))
        return f(x, *rest, **kwargs)

    return interceptor


class _Recorder:
    """The inputs of every module an activation rule matches, ``{module path: [inputs]}``, from one jitted float
    forward (compiled once per input structure and shapes; non-array arguments are static)."""

    def __init__(self, cfg: QATConfig, model: nn.Module):
        self.cfg, self.model, self._fns = cfg, model, {}

    def __call__(self, params, args, kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
        is_array = tuple(isinstance(l, (jax.Array, np.ndarray)) for l in leaves)
        static = tuple(None if a else l for l, a in zip(leaves, is_array))
        key = (treedef, is_array, static)
        try:
            fn = self._fns.get(key)
        except TypeError:  # an unhashable non-array argument: trace it in, uncached
            key, fn = None, None
        if fn is None:
            fn = jax.jit(lambda p, arrays: self._record(p, treedef, is_array, static, arrays))
            if key is not None:
                self._fns[key] = fn
        return fn(params, [l for l, a in zip(leaves, is_array) if a])

    def _record(self, params, treedef, is_array, static, arrays):
        it = iter(arrays)
        args, kwargs = jax.tree_util.tree_unflatten(treedef, [next(it) if a else s for a, s in zip(is_array, static)])
        record: dict[str, list] = {}
        with nn.intercept_methods(_act_interceptor(self.cfg, {}, None, record)):
            self.model.apply({"params": params}, *args, **kwargs)
        return record


@functools.lru_cache(maxsize=16)
def _cached_recorder(cfg: QATConfig, model: nn.Module) -> _Recorder:
    return _Recorder(cfg, model)


def _recorder(cfg: QATConfig, model: nn.Module) -> _Recorder:
    """One recorder per (config, model), so that ``qat_init`` and ``qat_calibrate`` share its compiled forwards."""
    try:
        return _cached_recorder(cfg, model)
    except TypeError:  # an unhashable config or model
        return _Recorder(cfg, model)


def _record_inputs(cfg, model, params, args, kwargs):
    return _recorder(cfg, model)(params, args, kwargs)


# ------------------------------------------------------------------------------------------------ public API

def qat_init(cfg: QATConfig, model: nn.Module, params: Any, *sample_args, **sample_kwargs) -> dict:
    """``{"params": params, "quant": {...}}``: learnable LSQ steps (``"w:<path>"`` / ``"a:<module path>"``)
    initialised from the weights / from activations of ``sample_args`` (LSQ: ``2 mean|x| / sqrt(Q_P)``; LSQ+:
    3-sigma for weights, min-max for activations)."""
    qs: dict[str, dict] = {}
    for path, w in flatten(params).items():
        q = _weight_rule(cfg, path, w)
        if isinstance(q, LSQW):
            axis = -1 if q.per_channel else None
            p = lsqplus_init(w, q.bits, True, axis, "3sigma") if q.plus else lsq_init(w, q.bits, True, axis)
            qs["w:" + path] = {"step": p.step, **({"offset": p.offset} if q.plus else {})}
    out = {"params": params, "quant": qs}
    if any(isinstance(q, LSQActQ) for _, q in cfg.activations):
        if not sample_args:
            raise ValueError("qat_init needs sample inputs to initialise LSQActQ steps")
        record = _record_inputs(cfg, model, params, sample_args, sample_kwargs)
        for path, xs in record.items():
            q = match_rule(path, cfg.activations)
            if isinstance(q, LSQActQ):
                x = jnp.concatenate([jnp.reshape(a, (-1,)) for a in xs])
                p = lsqplus_init(x, q.bits, q.signed, None, "minmax") if q.plus else lsq_init(x, q.bits, q.signed,
                                                                                              None)
                qs["a:" + path] = {"step": p.step.reshape(()),
                                   **({"offset": p.offset.reshape(())} if q.plus else {})}
    return out


def qat_calibrate(cfg: QATConfig, model: nn.Module, params: Any, batches, progress: bool | None = None
                  ) -> dict[str, jax.Array]:
    """Static activation ranges: running max of ``amax`` per :class:`StaticActQ` module over ``batches`` (each a
    tuple of positional model inputs or a single array). A tqdm bar shows unless ``progress=False`` or env
    ``WEIGHTLAB_NO_PROGRESS=1``."""
    from jaxmodels.progress import progress_bar
    batches = progress_bar(batches, progress, desc="qat_calibrate")
    calib: dict[str, jax.Array] = {}
    recorder = _recorder(cfg, model)  # one compiled forward for every batch of the same shapes
    for b in batches:
        args = b if isinstance(b, tuple) else (b,)
        record = recorder(params, args, {})
        for path, xs in record.items():
            q = match_rule(path, cfg.activations)
            if isinstance(q, StaticActQ):
                for x in xs:
                    a = amax_stat(x, q.per_channel, q.percentile)
                    calib[path] = a if path not in calib else jnp.maximum(calib[path], a)
    if not calib and any(isinstance(q, StaticActQ) for _, q in cfg.activations):
        raise ValueError("qat_calibrate: no StaticActQ module saw any input")
    return calib


def qat_apply(cfg: QATConfig, model: nn.Module, calib: dict | None = None, method: Callable | str | None = None
              ) -> Callable[..., Any]:
    """``apply(qvars, *args, **kwargs)``: ``model.apply`` with quantized weights (and activations).

    ``qvars`` is :func:`qat_init`'s dict; differentiate w.r.t. ``qvars["params"]`` and ``qvars["quant"]``.
    """
    needs_intercept = bool(cfg.activations) or cfg.qkr is not None

    def apply(qvars, *args, **kwargs):
        qs = qvars.get("quant", {})
        params = quantize_weights(cfg, qvars["params"], qs)
        kw = dict(kwargs)
        if method is not None:
            kw["method"] = method
        if not needs_intercept:
            return model.apply({"params": params}, *args, **kw)
        with nn.intercept_methods(_act_interceptor(cfg, qs, calib, None)):
            return model.apply({"params": params}, *args, **kw)

    return apply
