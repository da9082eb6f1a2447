"""Activation capture for linen models: the inputs of every linear layer (``nn.Dense``, ``nn.DenseGeneral``,
``nn.Conv`` and therefore every attention projection, which in ``jaxmodels`` is a plain ``nn.Dense``), reduced on
the fly into per-layer statistics, so calibration over many batches never stores activations.

Used by data-aware merging (RegMean's Gram matrices) and by post-training quantization (GPTQ's Hessian ``2 XᵀX``,
AWQ's per-channel mean ``|x|``). Layers are keyed by their module path, which is the path of their parameters:
the statistics under ``"block_0/attn/query"`` belong to ``params["block_0"]["attn"]["query"]["kernel"]``.

Every layer input is viewed as a matrix ``X`` of shape ``[tokens, d_in]`` such that the layer computes
``X @ W`` with ``W = kernel.reshape(d_in, -1)``:

* Dense / DenseGeneral(axis=-1): ``X = x.reshape(-1, d_in)``.
* Conv (``feature_group_count == 1``): ``X`` = the im2col patches, feature order ``(kh, kw, c_in)`` to match
  ``kernel.reshape(kh * kw * c_in, c_out)``; the padding is the layer's own.

Statistics (all float32, sums over every token of every batch): ``gram = XᵀX`` ``[d_in, d_in]``, ``count`` (number
of tokens), ``sum = Σ x`` ``[d_in]``, ``abs_sum = Σ |x|`` ``[d_in]`` and ``abs_max = max |x|`` ``[d_in]``.
Means are ``sum / count`` and ``abs_sum / count``.

Public API::

    collect_stats(apply_fn, params, batches, *, include=None, exclude=None, stats=("gram",), mesh=None,
                  progress=None) -> dict[str, LayerStats]
    make_accumulate_step(apply_fn, *, include=None, exclude=None, stats=("gram",), mesh=None)
        -> (init(params, batch) -> stats, step(stats, params, batch) -> stats)      # jitted, for custom loops
    capture_inputs(apply_fn, params, batch, layer) -> list[jax.Array]   # raw inputs of one layer, one per call
    capture_outputs(apply_fn, params, batch, layer) -> list[jax.Array]  # raw outputs of one layer, one per call
    layer_order(apply_fn, params, batch, *, include=None, exclude=None) -> list[str]  # execution order
    layer_input_matrix(module, x) -> X [tokens, d_in]

``apply_fn(params, batch)`` is any function that runs a linen module's ``apply`` (e.g.
``lambda p, x: model.apply({"params": p}, x)``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.progress import progress_bar, progress_enabled  # noqa: F401  (progress_enabled: old import path)
from jaxmodels.sharding import DATA

PyTree = Any

__all__ = [
    "LayerStats",
    "STAT_NAMES",
    "LINEAR_TYPES",
    "module_path",
    "layer_input_matrix",
    "make_accumulate_step",
    "collect_stats",
    "capture_inputs",
    "capture_outputs",
    "layer_order",
    "progress_enabled",
]

STAT_NAMES = ("gram", "count", "sum", "abs_sum", "abs_max")
LINEAR_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv)


class LayerStats(NamedTuple):
    """Per-layer running statistics of the layer input matrix ``X [tokens, d_in]``; disabled fields are ``None``."""

    gram: jax.Array | None  # Σ XᵀX, [d_in, d_in]
    count: jax.Array  # number of tokens (rows of X), float32 scalar
    sum: jax.Array | None  # Σ_t x_t, [d_in]
    abs_sum: jax.Array | None  # Σ_t |x_t|, [d_in]
    abs_max: jax.Array | None  # max_t |x_t|, [d_in]

    @property
    def mean(self) -> jax.Array:
        return self.sum / self.count

    @property
    def abs_mean(self) -> jax.Array:
        return self.abs_sum / self.count


def module_path(module: nn.Module) -> str:
    """A bound linen module's path as one ``"/"``-joined string, e.g. ``"block_0/attn/query"``: the key of its
    statistics, and the path of its parameters (``params["block_0"]["attn"]["query"]``)."""
    return "/".join(str(p) for p in module.path)


def _compile(patterns):
    if patterns is None:
        return None
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    return [re.compile(p) if isinstance(p, str) else p for p in patterns]


def _selected(path: str, inc, exc) -> bool:
    if inc is not None and not any(p.search(path) for p in inc):
        return False
    return not (exc is not None and any(p.search(path) for p in exc))


def _conv_padding(module: nn.Conv, nd: int):
    pad = module.padding
    if isinstance(pad, str):
        if pad.upper() in ("SAME", "VALID"):
            return pad.upper()
        raise ValueError(f"capture: Conv {module_path(module)!r} padding {pad!r} is not supported (SAME/VALID/"
                         "explicit pairs only)")
    if isinstance(pad, int):
        return [(pad, pad)] * nd
    out = []
    for p in pad:
        out.append((p, p) if isinstance(p, int) else tuple(p))
    return out


def layer_input_matrix(module: nn.Module, x: jax.Array) -> jax.Array:
    """The matrix ``X [tokens, d_in]`` with ``layer(x) == X @ kernel.reshape(d_in, -1) (+ bias)`` (up to the
    output's reshape), for Dense / DenseGeneral(axis=-1) / Conv (NHWC, batched, no feature groups)."""
    if isinstance(module, nn.Conv):
        if module.feature_group_count != 1:
            raise ValueError(f"capture: Conv {module_path(module)!r} has feature_group_count="
                             f"{module.feature_group_count}; only dense convolutions are linear in im2col patches")
        ks = tuple(module.kernel_size) if not isinstance(module.kernel_size, int) else (module.kernel_size,)
        nd = len(ks)
        if x.ndim != nd + 2:
            raise ValueError(f"capture: Conv {module_path(module)!r} input of shape {x.shape} is not batched NHWC")

        def tup(v, default=1):
            if v is None:
                return (default,) * nd
            return (v,) * nd if isinstance(v, int) else tuple(v)

        spatial = "HWD"[:nd] if nd <= 3 else None
        dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
        patches = jax.lax.conv_general_dilated_patches(
            x, ks, tup(module.strides), _conv_padding(module, nd), lhs_dilation=tup(module.input_dilation),
            rhs_dilation=tup(module.kernel_dilation), dimension_numbers=dn,
            precision=jax.lax.Precision.HIGHEST)
        c = x.shape[-1]
        # patches' feature axis is ordered (c_in, *kernel_spatial); reorder to (*kernel_spatial, c_in).
        lead = patches.shape[:-1]
        patches = patches.reshape(*lead, c, *ks)
        perm = tuple(range(len(lead))) + tuple(len(lead) + 1 + i for i in range(nd)) + (len(lead),)
        patches = patches.transpose(perm)
        return patches.reshape(-1, int(np.prod(ks)) * c)
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis
        if axis not in (-1, (-1,)):
            raise ValueError(f"capture: DenseGeneral {module_path(module)!r} with axis={axis} is not supported")
    return x.reshape(-1, x.shape[-1])


def _resolve_stats(stats: Sequence[str]) -> tuple[str, ...]:
    stats = tuple(stats)
    bad = [s for s in stats if s not in STAT_NAMES]
    if bad:
        raise ValueError(f"capture: unknown statistic {bad[0]!r}; choose from {STAT_NAMES}")
    return stats


def _run_capturing(apply_fn, params, batch, select: Callable[[str, nn.Module], bool], on_call):
    """Run ``apply_fn`` with an interceptor calling ``on_call(path, module, x, y)`` for each selected linear call."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, LINEAR_TYPES):
            return next_fun(*args, **kwargs)
        path = module_path(mod)
        if not select(path, mod):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        y = next_fun(*args, **kwargs)
        on_call(path, mod, x, y)
        return y

    with nn.intercept_methods(interceptor):
        return apply_fn(params, batch)


def _stats_of_matrix(X: jax.Array, stats: tuple[str, ...]) -> LayerStats:
    X = X.astype(jnp.float32)
    gram = jnp.dot(X.T, X, precision=jax.lax.Precision.HIGHEST) if "gram" in stats else None
    a = jnp.abs(X)
    return LayerStats(
        gram=gram,
        count=jnp.asarray(X.shape[0], jnp.float32),
        sum=X.sum(0) if "sum" in stats else None,
        abs_sum=a.sum(0) if "abs_sum" in stats else None,
        abs_max=a.max(0) if "abs_max" in stats else None,
    )


def _combine(a: LayerStats, b: LayerStats) -> LayerStats:
    def add(u, v):
        return None if u is None else u + v

    return LayerStats(add(a.gram, b.gram), a.count + b.count, add(a.sum, b.sum), add(a.abs_sum, b.abs_sum),
                      None if a.abs_max is None else jnp.maximum(a.abs_max, b.abs_max))


def _batch_stats(apply_fn, params, batch, inc, exc, stats) -> dict[str, LayerStats]:
    out: dict[str, LayerStats] = {}

    def on_call(path, mod, x, y):
        s = _stats_of_matrix(layer_input_matrix(mod, x), stats)
        out[path] = _combine(out[path], s) if path in out else s

    _run_capturing(apply_fn, params, batch, lambda p, m: _selected(p, inc, exc), on_call)
    return out


def _zeros_like_stats(s: LayerStats) -> LayerStats:
    z = lambda a: None if a is None else jnp.zeros(a.shape, jnp.float32)  # noqa: E731
    return LayerStats(z(s.gram), jnp.zeros((), jnp.float32), z(s.sum), z(s.abs_sum), z(s.abs_max))


def _shard_batch(batch, mesh: Mesh | None):
    if mesh is None:
        return batch
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(DATA, *([None] * (a.ndim - 1))))),
        batch)


def make_accumulate_step(apply_fn: Callable, *, include=None, exclude=None, stats: Sequence[str] = ("gram",),
                         mesh: Mesh | None = None):
    """Return ``(init, step)``, both jitted: ``init(params, batch)`` gives zero statistics with the right shapes
    (one entry per selected linear layer the model calls), ``step(acc, params, batch)`` adds one batch.

    With ``mesh``, the batch's leading axis is sharded over ``"data"``; each device reduces its shard and XLA
    all-reduces the (replicated) statistics, so the result equals the single-device one up to float summation order.
    """
    stats = _resolve_stats(stats)
    inc, exc = _compile(include), _compile(exclude)
    rep = NamedSharding(mesh, P()) if mesh is not None else None

    def batch_stats(params, batch):
        return _batch_stats(apply_fn, params, _shard_batch(batch, mesh), inc, exc, stats)

    def init(params, batch):
        shapes = jax.eval_shape(batch_stats, params, batch)
        if not shapes:
            raise ValueError("capture: no Dense/DenseGeneral/Conv layer matched include/exclude")
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def step(acc, params, batch):
        new = batch_stats(params, batch)
        return {k: _combine(acc[k], new[k]) for k in acc}

    if mesh is None:
        return jax.jit(init), jax.jit(step, donate_argnums=(0,))
    return jax.jit(init, out_shardings=rep), jax.jit(step, donate_argnums=(0,), out_shardings=rep)


def collect_stats(apply_fn: Callable, params: PyTree, batches: Iterable, *, include=None, exclude=None,
                  stats: Sequence[str] = ("gram",), mesh: Mesh | None = None,
                  progress: bool | None = None) -> dict[str, LayerStats]:
    """Per-layer input statistics over all ``batches`` (an iterable of whatever ``apply_fn`` takes as input).

    ``include`` / ``exclude``: regexes (``re.search``) on the layer's module path. ``stats``: any of
    ``("gram", "count", "sum", "abs_sum", "abs_max")`` (``count`` is always kept). Returns
    ``{module_path: LayerStats}``; activations are reduced batch by batch, never stored.
    """
    init, step = make_accumulate_step(apply_fn, include=include, exclude=exclude, stats=stats, mesh=mesh)
    acc = None
    n = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in progress_bar(batches, progress, desc="capture", total=total):
        if mesh is not None:
            batch = jax.device_put(batch, jax.tree.map(
                lambda a: NamedSharding(mesh, P(DATA, *([None] * (np.ndim(a) - 1)))), batch))
        if acc is None:
            acc = init(params, batch)
        acc = step(acc, params, batch)
        n += 1
    if acc is None:
        raise ValueError("capture: `batches` is empty")
    return acc


def _capture_raw(apply_fn, params, batch, layer: str, which: str) -> list[jax.Array]:
    got: list[jax.Array] = []

    def on_call(path, mod, x, y):
        got.append(x if which == "input" else y)

    _run_capturing(apply_fn, params, batch, lambda p, m: p == layer, on_call)
    if not got:
        raise ValueError(f"capture: layer {layer!r} was not called; layers: "
                         f"{layer_order(apply_fn, params, batch)}")
    return got


def capture_inputs(apply_fn: Callable, params: PyTree, batch: Any, layer: str) -> list[jax.Array]:
    """The raw inputs (original shapes) of the linear layer at module path ``layer``, one array per call of the
    layer in the forward pass. Traceable: call it inside ``jax.jit`` for speed (e.g. sequential GPTQ)."""
    return _capture_raw(apply_fn, params, batch, layer, "input")


def capture_outputs(apply_fn: Callable, params: PyTree, batch: Any, layer: str) -> list[jax.Array]:
    """The raw outputs of the linear layer at module path ``layer`` (e.g. hidden units for activation matching)."""
    return _capture_raw(apply_fn, params, batch, layer, "output")


def layer_order(apply_fn: Callable, params: PyTree, batch: Any, *, include=None, exclude=None) -> list[str]:
    """Module paths of the selected linear layers in the order the forward pass first calls them (abstract
    evaluation, no FLOPs)."""
    inc, exc = _compile(include), _compile(exclude)
    order: list[str] = []

    def on_call(path, mod, x, y):
        if path not in order:
            order.append(path)

    def run(p, b):
        _run_capturing(apply_fn, p, b, lambda q, m: _selected(q, inc, exc), on_call)
        return 0

    jax.eval_shape(run, params, batch)
    return order
