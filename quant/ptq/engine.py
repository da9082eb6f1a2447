"""The one block walker of :mod:`quant.ptq`: every calibrated method is a walk over a
:class:`~quant.ptq.blocks.BlockModel`'s blocks with a per-block step, and most of them a per-layer quantizer.

The walk (GPTQ's ``opt_sequential``, llm-awq's ``run_awq``, BRECQ/FlexRound's block reconstruction)::

    h⁽⁰⁾ = embed(params, batch_b)                       for every calibration batch b
    for block ℓ = 0 .. L−1:
        step(view_ℓ) -> (block params', {linear: record}, block info)
        h⁽ℓ⁺¹⁾ = f_ℓ(h⁽ℓ⁾; block params')   feed="quantized" (GPTQ, RSQ, ZeroQuant-FP, codebook, mixed precision)
        h⁽ℓ⁺¹⁾ = f_ℓ(h⁽ℓ⁾; block params)    feed="float"     (AWQ, RTN)
        both streams                         feed="both"      (FlexRound: X_q in, f_ℓ(X_fp; W) as target)

``view_ℓ`` (:class:`BlockView`) gives the step what it needs, computed lazily and *streamed over the calibration
batches*: the per-linear Hessians ``H = 2 Σ_t m_t x_t x_tᵀ / Σ_t m_t`` (m_t: the model's token weights, 0 on
padding, or RSQ's importance weights) are accumulated batch by batch, so only the hidden states of the calibration
set are held, never the inputs of every linear; the per-layer output error ``‖XW − XŴ‖² / ‖XW‖²`` is accumulated
the same way. Steps that need all tokens at once (AWQ's block-output search, FlexRound's and the codebook block
fine-tuning) read :meth:`BlockView.hidden` / :meth:`BlockView.records` on the concatenated batches
(``streaming=False`` concatenates them once, at the start).

Per-layer quantizers (:data:`LAYER_QUANTIZERS`): ``quantizer(w, stats, config) -> record`` with ``w`` the Flax
kernel ``[in, out]``, ``stats`` a :class:`LayerStats` (``H``, or the inputs ``x`` for FlexRound, or ``None`` for a
data-free quantizer) and ``record`` the per-layer report schema of :mod:`quant.ptq` (``weight`` = the dequantized
kernel, ``format``, ``bits``, ``group_size``, ...). Block-level transforms wrap them (:class:`LayerTransform`): a
rotation ``w -> Rᵀw, H -> RᵀHR`` undone on the result (RSQ), LoRC's low-rank compensation of the result
(:class:`LoRCTransform`), a per-layer config (mixed-precision allocation: ``layer_config(path) -> config``); AWQ's
scaling/clipping is a block step of its own (it searches on the whole block).

:func:`quantize_layers` is the generic method: ``quantize_layers(params, model, calib, "gptq", GPTQConfig(4, 128))``
runs any registered quantizer (``"rtn"``, ``"gptq"``, ``"zeroquant_fp"``, ``"codebook"``, ``"flexround"`` (layer-wise
reconstruction), ``"format"``: any :mod:`quant.formats` format) on every BlockModel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._common import pbar
from .blocks import BlockModel, capture_dense, dense_names, get_sub, set_kernels, set_sub

__all__ = ["LayerStats", "BlockView", "walk_blocks", "quantize_layers", "calibration_batches", "concat_batches",
           "LAYER_QUANTIZERS", "register_layer_quantizer", "LayerTransform", "RotationTransform", "LoRCTransform",
           "report"]

FEEDS = ("quantized", "float", "both")


# ------------------------------------------------------------------------------------------------ calibration

def calibration_batches(calib) -> list | None:
    """``None`` -> ``None``; one batch (a dict or an array of token ids) -> ``[batch]``; a list/tuple of batches
    (each of the model's batch form) -> the list. Batches are embedded one at a time by the walk."""
    if calib is None:
        return None
    if isinstance(calib, (list, tuple)):
        if not calib:
            raise ValueError("calibration: an empty list of batches")
        return list(calib)
    return [calib]


def concat_batches(batches: list):
    """The batches as one (concatenated along the leading axis; every batch must have the same keys and the same
    trailing shape, e.g. sequence length)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    if isinstance(first, dict):
        keys = set(first)
        for i, b in enumerate(batches):
            if set(b) != keys:
                raise ValueError(f"calibration batch {i} has keys {sorted(b)}, batch 0 has {sorted(keys)}")
        out = {}
        for k in first:
            shapes = {np.shape(b[k])[1:] for b in batches}
            if len(shapes) != 1:
                raise ValueError(f"calibration batches differ in {k!r} shapes {sorted(shapes)}: pad them to one "
                                 "sequence length")
            out[k] = np.concatenate([np.asarray(b[k]) for b in batches])
        return out
    shapes = {np.shape(b)[1:] for b in batches}
    if len(shapes) != 1:
        raise ValueError(f"calibration batches differ in shape {sorted(shapes)}")
    return np.concatenate([np.asarray(b) for b in batches])


# ------------------------------------------------------------------------------------------------ statistics

@dataclasses.dataclass
class LayerStats:
    """Calibration statistics of one linear: ``H`` (``2 Σ m_t x_t x_tᵀ / Σ m_t``, float32 ``[in, in]``),
    ``n_tokens`` (Σ m_t), and for quantizers that need the inputs themselves ``x`` ``[..., in]`` with token weights
    ``tok`` ``x.shape[:-1]``."""

    H: jax.Array | None = None
    n_tokens: float = 0.0
    x: jax.Array | None = None
    tok: jax.Array | None = None


@jax.jit
def _weighted_gram(x, w):
    """``(Σ_t w_t x_t x_tᵀ, Σ_t w_t)`` of one batch (jitted: one compile per shape instead of one per eager op)."""
    x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    w = jnp.asarray(w, jnp.float32).reshape(-1)
    return (x * w[:, None]).T @ x, w.sum()


@jax.jit
def _hessian(S, n):
    return 2.0 * S / jnp.maximum(n, 1e-12)


@jax.jit
def _error_terms(x, w, w_hat, weights):
    """``(Σ_t m_t ‖x_t W − x_t Ŵ‖², Σ_t m_t ‖x_t W‖²)`` of one batch."""
    x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    y, y_hat = x @ jnp.asarray(w, jnp.float32), x @ jnp.asarray(w_hat, jnp.float32)
    m = jnp.asarray(weights, jnp.float32).reshape(-1)
    return jnp.sum(m[:, None] * (y - y_hat) ** 2), jnp.sum(m[:, None] * y**2)


class _Stream:
    """One calibration batch: hidden state entering the current block, the batch ctx and its token weights."""

    __slots__ = ("h", "h_float", "ctx", "tok")

    def __init__(self, h, ctx, tok):
        self.h, self.h_float, self.ctx, self.tok = h, h, ctx, tok


class BlockView:
    """What a block step sees: the block (``path``, ``index``, float ``params``, ``names`` of its linears) and its
    calibration data, streamed over the batches (see the module docstring). Captures are cached when there is one
    batch and recomputed per batch otherwise (memory: one batch of linear inputs at a time)."""

    def __init__(self, model: BlockModel, path: str, index: int, params, streams: list[_Stream] | None, act,
                 source=None):
        self.model, self.path, self.index, self.params = model, path, index, params
        self.source = params if source is None else source  # the block's params in their own dtype
        self.names = dense_names(params)
        self._streams = streams
        self._act = act
        self._cache: dict = {}
        self.float_outputs: dict[int, Any] = {}  # a step may leave f(h_float; W) of batch b here for the walk

    # -- data
    @property
    def has_data(self) -> bool:
        return self._streams is not None

    @property
    def n_batches(self) -> int:
        return 0 if self._streams is None else len(self._streams)

    def block_ctx(self, b: int = 0) -> dict:
        return self.model.block_ctx(self.index, self._streams[b].ctx)

    def ctx(self, b: int = 0) -> dict:
        return self._streams[b].ctx

    def tok(self, b: int = 0):
        return self._streams[b].tok

    def hidden(self, b: int = 0, stream: str = "quantized"):
        """Input hidden state of batch ``b`` (``stream="float"``: the float model's, with ``feed="both"``)."""
        s = self._streams[b]
        return s.h if stream == "quantized" else s.h_float

    def capture(self, b: int = 0, params=None, stream: str = "quantized"):
        """``(block output, {linear: (input, output)})`` of batch ``b`` through ``params`` (default: the float
        block) with the walk's activation transform on every linear input."""
        key = (b, stream)
        if params is None and key in self._cache:
            return self._cache[key]
        out = capture_dense(self.model, self.params if params is None else params, self.hidden(b, stream),
                            self.block_ctx(b), self._act)
        if params is None and self.n_batches == 1:
            self._cache[key] = out
        return out

    def records(self, b: int = 0):
        return self.capture(b)[1]

    # -- statistics
    def hessians(self, names: Sequence[str] | None = None, token_weights_fn=None) -> dict[str, LayerStats]:
        """``{name: LayerStats(H, n_tokens)}`` accumulated over the batches: H = 2 Σ_b Σ_t m_t x_t x_tᵀ / Σ m_t with
        ``m = token_weights_fn(records, ctx)`` (default the model's token weights)."""
        names = self.names if names is None else list(names)
        key = ("H", token_weights_fn)
        if key in self._cache:
            return self._cache[key]
        S, n = {}, {}
        for b in range(self.n_batches):
            rec = self.records(b)
            tw = self.tok(b) if token_weights_fn is None else token_weights_fn(rec, self.ctx(b))
            for nm in names:
                g, c = _weighted_gram(rec[nm][0], tw)
                S[nm] = g if nm not in S else S[nm] + g
                n[nm] = c if nm not in n else n[nm] + c
        out = {nm: LayerStats(_hessian(S[nm], n[nm]), float(n[nm])) for nm in names}
        self._cache[key] = out
        return out

    def inputs(self, name: str) -> LayerStats:
        """The inputs of linear ``name`` over all batches (concatenated; needs equal trailing shapes) and their
        token weights: the statistic of quantizers that learn on the data (layer-wise FlexRound)."""
        xs = [self.records(b)[name][0] for b in range(self.n_batches)]
        ts = [jnp.asarray(self.tok(b), jnp.float32) for b in range(self.n_batches)]
        x = xs[0] if len(xs) == 1 else jnp.concatenate(xs)
        t = ts[0] if len(ts) == 1 else jnp.concatenate(ts)
        return LayerStats(x=x, tok=t, n_tokens=float(t.sum()))

    def errors(self, pairs: dict[str, tuple]) -> dict[str, float]:
        """``{name: ‖XW − XŴ‖² / ‖XW‖²}`` over the real tokens of every batch, for ``pairs = {name: (W, Ŵ)}``
        (kernels ``[in, out]``; X: the linear's captured input)."""
        num, den = {}, {}
        for b in range(self.n_batches):
            rec = self.records(b)
            for nm, (w, w_hat) in pairs.items():
                a, c = _error_terms(rec[nm][0], w, w_hat, self.tok(b))
                num[nm] = a if nm not in num else num[nm] + a
                den[nm] = c if nm not in den else den[nm] + c
        return {nm: float(num[nm] / jnp.maximum(den[nm], 1e-30)) for nm in pairs}


# ------------------------------------------------------------------------------------------------ the walk

def walk_blocks(params, model: BlockModel, calib, step: Callable[[BlockView], tuple], *, feed: str = "quantized",
                act=None, streaming: bool = True, progress: bool | None = None, desc: str = "PTQ",
                float32: bool = False):
    """Walk ``model``'s blocks in order (module docstring). ``step(view) -> (new_block_params, {linear_name:
    record}, block_info or None)``; ``act``: a hashable transform of every linear input in the captures and in the
    quantized stream (ZeroQuant-FP's FP8 activations); ``streaming=False``: concatenate the calibration batches
    into one first; ``float32``: run the streams in float32 (FlexRound).

    Returns ``(params', {kernel_path: record}, {block_path: info})``; ``params`` is not modified.
    """
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    if not model.block_paths:
        raise ValueError("the BlockModel has no blocks")
    batches = calibration_batches(calib)
    if batches is not None and not streaming:
        batches = [concat_batches(batches)]
    streams = None
    if batches is not None:
        streams = []
        for bt in batches:
            h, ctx = model.embed(params, bt)
            if float32:
                h = jnp.asarray(h, jnp.float32)
            streams.append(_Stream(h, ctx, model.token_weight(ctx)))
    out = params
    layers, blocks = {}, {}
    to32 = (lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), t)) if float32 else (lambda t: t)
    for i, bp in enumerate(pbar(model.block_paths, progress, desc=desc)):
        block = get_sub(params, bp)
        view = BlockView(model, bp, i, to32(block) if float32 else block, streams, act, source=block)
        new_block, recs, info = step(view)
        for name, r in recs.items():
            layers[f"{bp}/{name}/kernel"] = r
        if info is not None:
            blocks[bp] = info
        out = set_sub(out, bp, new_block)
        if streams is not None:
            qb = to32(new_block)
            for b, s in enumerate(streams):
                kw = model.block_ctx(i, s.ctx)
                if feed == "float":
                    cached = view._cache.get((b, "quantized"))  # the float block's output on this very input
                    s.h = cached[0] if cached is not None else _apply(model, view.params, s.h, kw, act)
                    s.h_float = s.h
                elif feed == "quantized":
                    s.h = _apply(model, qb, s.h, kw, act)
                    s.h_float = s.h
                else:
                    y = view.float_outputs.get(b)
                    s.h_float = y if y is not None else _apply(model, view.params, s.h_float, kw, None)
                    s.h = _apply(model, qb, s.h, kw, act)
                if float32:
                    s.h, s.h_float = jnp.asarray(s.h, jnp.float32), jnp.asarray(s.h_float, jnp.float32)
    return out, layers, blocks


def _apply(model, block_params, h, kw, act):
    if act is None:
        return model.apply_block(block_params, h, kw)
    return capture_dense(model, block_params, h, kw, act)[0]


# ------------------------------------------------------------------------------------------------ quantizers

def _rtn_layer(w, stats, config):
    from .rtn import rtn_quantize_weight

    return rtn_quantize_weight(w, None, config)


def _gptq_layer(w, stats, config):
    from .gptq import gptq_quantize_weight

    return gptq_quantize_weight(w, stats.H, config)


def _zeroquant_fp_layer(w, stats, config):
    from .zeroquant_fp import zeroquant_fp_weight

    return zeroquant_fp_weight(w, None if stats is None else stats.H, config)


def _codebook_layer(w, stats, config):
    from .codebook import codebook_quantize_weight

    return codebook_quantize_weight(w, stats.H, config)


def _flexround_layer(w, stats, config):
    from .flexround import flexround_quantize_weight

    return flexround_quantize_weight(w, stats.x, config, token_weights=stats.tok, progress=False)


def _format_layer(w, stats, fmt):
    from .rtn import format_round_trip

    qa, w_hat = format_round_trip(w, fmt)
    return {"weight": w_hat, "format": fmt, "bits": int(fmt.bits),
            "group_size": getattr(fmt, "group_size", None), "packed": qa}


# name -> (quantizer, statistic it needs: "hessian" | "inputs" | "hessian?" (optional: used when data is given)
# | None)
LAYER_QUANTIZERS: dict[str, tuple[Callable, str | None]] = {
    "rtn": (_rtn_layer, None),
    "gptq": (_gptq_layer, "hessian"),
    "zeroquant_fp": (_zeroquant_fp_layer, "hessian?"),
    "codebook": (_codebook_layer, "hessian"),
    "flexround": (_flexround_layer, "inputs"),
    "format": (_format_layer, None),
}


def register_layer_quantizer(name: str, fn: Callable, needs: str | None) -> None:
    """Add ``fn(w, stats, config) -> record`` under ``name``; ``needs``: ``"hessian"``, ``"inputs"`` or ``None``."""
    if needs not in (None, "hessian", "hessian?", "inputs"):
        raise ValueError(f"needs must be None, 'hessian', 'hessian?' or 'inputs', got {needs!r}")
    LAYER_QUANTIZERS[name] = (fn, needs)


# ------------------------------------------------------------------------------------------------ transforms

class LayerTransform:
    """A transform around the per-layer quantizer: ``before(path, w, stats) -> (w', stats', undo)`` with
    ``undo(w_hat') -> w_hat`` (or ``None``), and ``after(path, w, record) -> record``."""

    def before(self, path, w, stats):
        return w, stats, None

    def after(self, path, w, record):
        return record


class RotationTransform(LayerTransform):
    """RSQ / QuaRot: ``w -> Rᵀ w``, ``H -> Rᵀ H R`` with ``R = rotation(path, n)`` orthogonal; the result is brought
    back as ``R ŵ`` (the deployed layer rotates its input online: ``x W = (x R)(Rᵀ W)``). ``seeds`` records the
    seed per layer path when ``rotation`` returns ``(R, seed)``."""

    def __init__(self, rotation: Callable[[str, int], tuple]):
        self.rotation = rotation
        self.seeds: dict[str, Any] = {}

    def before(self, path, w, stats):
        R, seed = self.rotation(path, w.shape[0])
        self.seeds[path] = seed
        R = jnp.asarray(R)
        st = stats
        if stats is not None and stats.H is not None:
            st = dataclasses.replace(stats, H=R.T @ stats.H @ R)
        return R.T @ w, st, (lambda kh, R=R: R @ kh)


class LoRCTransform(LayerTransform):
    """LoRC (Yao et al., 2023) inside the walk: ``Ŵ ← Ŵ + Q(Û)Q(V̂)ᵀ`` from the SVD of ``W − Ŵ`` (see
    :mod:`quant.ptq.lorc`) right after each layer is quantized, so later blocks calibrate on the compensated
    model. The record keeps the base codes (``stored``) and the factors under ``lorc``."""

    def __init__(self, rank: int, factor_format=None):
        from .lorc import LORC_FACTOR_FORMAT, _check

        self.factor_format = LORC_FACTOR_FORMAT if factor_format is None else factor_format
        _check(rank, self.factor_format)
        self.rank = int(rank)

    def after(self, path, w, record):
        from .lorc import _lorc, lorc_bits_per_weight

        rank = min(self.rank, *w.shape)
        new, Uh, Vh, norm_e, err, norm_w = _lorc(w, record["weight"], rank, self.factor_format)
        nw = max(float(norm_w), 1e-30)
        out = dict(record)
        out["stored"] = record.get("stored", record["weight"])
        out["weight"] = new
        out["lorc"] = {"U": Uh[:, :rank], "V": Vh[:, :rank], "factor_format": self.factor_format,
                       "error_before": float(norm_e) / nw, "error_after": float(err) / nw,
                       "bits_per_weight": lorc_bits_per_weight(w.shape, rank, self.factor_format)}
        return out


# ------------------------------------------------------------------------------------------------ generic method

def report(method: str, config, layers: dict, **extra) -> dict:
    """The report every method returns: ``{"method", "config", "layers": {kernel_path: record}, **extra}``."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else config
    return {"method": method, "config": cfg, "layers": layers, **extra}


def quantize_layers(params, model: BlockModel, calib, quantizer, config=None, *, layer_config=None,
                    transforms: Sequence[LayerTransform] = (), token_weights_fn=None, act=None,
                    feed: str = "quantized", errors: bool = True, progress: bool | None = None,
                    desc: str | None = None, method: str | None = None, needs: str | None = "auto"):
    """Quantize every linear of every block of ``model`` with a per-layer quantizer, block by block.

    ``quantizer``: a name of :data:`LAYER_QUANTIZERS` or a callable ``(w, stats, config) -> record`` (then
    ``needs`` says which statistic it takes); ``config``: its config (``layer_config(kernel_path) -> config``
    overrides it per layer: mixed precision); ``transforms``: :class:`LayerTransform` s applied in order before
    and in reverse after; ``token_weights_fn(records, ctx) -> m [B, T]`` replaces the token weights of the
    Hessians (RSQ); ``act``, ``feed``: as :func:`walk_blocks`. Each record gets ``error`` (relative output error
    on the calibration tokens, when there is data and ``errors``) and ``stored`` (what its codes dequantize to,
    when a transform changed the weight). Returns ``(params', report)``.
    """
    if isinstance(quantizer, str):
        if quantizer not in LAYER_QUANTIZERS:
            raise ValueError(f"unknown layer quantizer {quantizer!r}; known: {sorted(LAYER_QUANTIZERS)}")
        name = quantizer
        fn, need = LAYER_QUANTIZERS[quantizer]
    else:
        name, fn, need = getattr(quantizer, "__name__", "custom"), quantizer, None if needs == "auto" else needs
    if needs != "auto":
        need = needs
    if need == "hessian?":
        need = "hessian" if calib is not None else None
    if need is not None and calib is None:
        raise ValueError(f"layer quantizer {name!r} needs calibration data ({need})")

    def step(view: BlockView):
        stats = {}
        if need == "hessian":
            stats = view.hessians(token_weights_fn=token_weights_fn)
        new_k, recs, pairs = {}, {}, {}
        for nm in view.names:
            path = f"{view.path}/{nm}/kernel"
            k = get_sub(view.params, nm)["kernel"]
            st = view.inputs(nm) if need == "inputs" else stats.get(nm)
            cfg = config if layer_config is None else layer_config(path)
            kq, undos = k, []
            for t in transforms:
                kq, st, u = t.before(path, kq, st)
                undos.append(u)
            r = fn(kq, st, cfg)
            w_hat = r["weight"]
            for u in reversed(undos):
                if u is not None:
                    w_hat = u(w_hat)
            if any(u is not None for u in undos):
                r["stored"] = r["weight"]
                r["weight"] = w_hat
            for t in reversed(transforms):
                r = t.after(path, k, r)
            recs[nm] = r
            new_k[nm] = r["weight"]
            pairs[nm] = (k, r["weight"])
        if errors and view.has_data:
            for nm, e in view.errors(pairs).items():
                recs[nm]["error"] = e
        return set_kernels(view.params, new_k), recs, None

    out, layers, _ = walk_blocks(params, model, calib, step, feed=feed, act=act, progress=progress,
                                 desc=desc or f"{name}")
    return out, report(method or name, config, layers)
