"""α-BN: You, Li & Zhao, "Test-time Batch Statistics Calibration for Covariate Shift" (2021, arXiv:2110.04065).

At test time every BatchNorm layer normalizes with a mix of its source (running) statistics and the statistics of
the current test batch::

    mu      = alpha * mu_src      + (1 - alpha) * mu_batch
    sigma^2 = alpha * sigma^2_src + (1 - alpha) * sigma^2_batch
    y = scale * (x - mu) / sqrt(sigma^2 + eps) + bias

``alpha = 1`` is ordinary eval mode (source statistics only), ``alpha = 0`` is test-time normalization (Schneider
et al. 2020: the train-mode batch statistics, no running-average update). The batch statistics of each layer are
those of ITS input in this very forward pass, i.e. computed after the earlier layers have already been normalized
with their mixed statistics, as the layer-replacing reference implementation does (each ``AlphaBatchNorm`` module
computes its batch statistics on the input it receives: ``AlphaBatchNorm`` of github.com/bethgelab/robustness,
``robusta/batchnorm/bn.py``, as copied into later test-time-adaptation code bases).

Conventions, stated because the sources differ: here ``alpha`` weighs the SOURCE statistics (the form above; the
paper's own text could not be checked here, so its symbol may be the other weight), while the robusta code names the
batch weight ``alpha``: its ``alpha`` is our ``1 - alpha``. The batch variance is the biased one (the mean of
squared deviations, what Flax's train-mode BatchNorm normalizes with, so ``alpha = 0`` equals train-mode
normalization); robusta's comes from a momentum-1 ``nn.BatchNorm2d`` running variance, which PyTorch stores unbiased
(a factor ``n / (n - 1)`` on the batch term). The paper's Core loss (pairwise class-correlation optimization on top of
α-BN) is not implemented.

:func:`alpha_bn_apply` runs any linen model holding ``nn.BatchNorm`` layers this way, without changing model code
(a ``flax.linen.intercept_methods`` interceptor on every ``nn.BatchNorm`` call); :func:`mix_batch_stats` is the
mixing rule on two ``batch_stats`` trees.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.tree import is_concrete

PyTree = Any

__all__ = ["alpha_bn_apply", "mix_batch_stats"]


def _check_alpha(alpha) -> None:
    if not is_concrete(alpha):
        if jnp.ndim(alpha) != 0:
            raise ValueError(f"alpha_bn: alpha must be a scalar, got shape {jnp.shape(alpha)}")
        return
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha_bn: alpha must be a real scalar in [0, 1], got {alpha!r}") from None
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha_bn: alpha must be in [0, 1], got {alpha!r}")


def mix_batch_stats(source: PyTree, batch: PyTree, alpha) -> PyTree:
    """``alpha * source + (1 - alpha) * batch`` leaf by leaf (float32, returned in each source leaf's dtype), for two
    ``batch_stats`` trees of the same structure (``{..: {"mean", "var"}}``), e.g. the running statistics and the
    statistics one train-mode pass over a test batch gives with momentum 0. (Mixing whole trees this way takes every
    layer's batch statistics under SOURCE-normalized earlier layers; :func:`alpha_bn_apply` does the sequential
    version the paper uses.)"""
    _check_alpha(alpha)
    if jax.tree.structure(source) != jax.tree.structure(batch):
        raise ValueError("mix_batch_stats: source and batch trees have different structures")
    for s, b in zip(jax.tree.leaves(source), jax.tree.leaves(batch)):
        if jnp.shape(s) != jnp.shape(b):
            raise ValueError(f"mix_batch_stats: leaf shapes differ: {jnp.shape(s)} vs {jnp.shape(b)}")
    a = jnp.asarray(alpha, jnp.float32)
    return jax.tree.map(lambda s, b: (a * s.astype(jnp.float32) + (1 - a) * b.astype(jnp.float32)).astype(s.dtype),
                        source, batch)


def _batch_moments(x: jax.Array, axes: tuple[int, ...], mask) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over ``axes`` in float32 (two-pass), optionally over ``mask``-ed positions."""
    xf = x.astype(jnp.float32)
    where = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    mu = xf.mean(axes, where=where)
    dev = xf - jnp.expand_dims(mu, axes)
    var = jnp.square(dev).mean(axes, where=where)
    return mu, var


def _interceptor(alpha, include):
    pat = None if include is None else re.compile(include)
    source: dict[str, dict[str, jax.Array]] = {}  # a BatchNorm called twice mixes its SOURCE statistics again

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, nn.BatchNorm):
            return next_fun(*args, **kwargs)
        path = "/".join(str(p) for p in mod.path)
        if pat is not None and not pat.search(path):
            return next_fun(*args, **kwargs)
        if mod.axis_name is not None:
            raise ValueError(f"alpha_bn: BatchNorm {path!r} has axis_name={mod.axis_name!r} (pmap-style statistics); "
                             "use jit with a sharded batch instead, whose statistics are global")
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("x")
        kwargs.pop("use_running_average", None)
        mask = kwargs.get("mask")
        feature_axes = tuple(a % x.ndim for a in ((mod.axis,) if isinstance(mod.axis, int) else mod.axis))
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        if not mod.has_variable("batch_stats", "mean"):
            raise ValueError(f"alpha_bn: BatchNorm {path!r} has no running statistics in variables['batch_stats']")
        mu_b, var_b = _batch_moments(x, reduction_axes, mask)
        feat_shape = tuple(x.shape[a] for a in feature_axes)
        mu_b, var_b = mu_b.reshape(feat_shape), var_b.reshape(feat_shape)
        a = jnp.asarray(alpha, jnp.float32)
        src_stats = source.setdefault(path, {n: mod.get_variable("batch_stats", n) for n in ("mean", "var")})
        for name, b in (("mean", mu_b), ("var", var_b)):
            src = src_stats[name]
            mod.put_variable("batch_stats", name, (a * src.astype(jnp.float32) + (1 - a) * b).astype(src.dtype))
        if mod.use_running_average is None:
            kwargs["use_running_average"] = True
        elif not mod.use_running_average:
            raise ValueError(f"alpha_bn: BatchNorm {path!r} was built with use_running_average=False (train mode); "
                             "call the model in eval mode (e.g. train=False)")
        return next_fun(x, **kwargs)

    return intercept


def alpha_bn_apply(apply_fn: Callable, variables: PyTree, x: Any, alpha, *args, include: str | None = None,
                   **kwargs) -> Any:
    """``apply_fn(variables, x, *args, **kwargs)`` with every ``nn.BatchNorm`` normalizing by α-BN's mixed statistics
    (module docstring): ``mu = alpha * mu_src + (1 - alpha) * mu_batch``, ``sigma^2`` likewise, where the batch
    statistics of each layer are taken over the batch (all non-feature axes of its input) in this forward pass.

    ``apply_fn`` is ``model.apply`` (or anything with its signature: it must accept ``mutable=``); pass the model's
    own eval-mode arguments (e.g. ``train=False``): the intercepted layers ignore ``use_running_average`` and normalize
    with the mixed statistics. ``include``: an optional regex on the BatchNorm module path (e.g. ``"block_[0-2]"``);
    the others run unchanged. Returns the model output; ``variables`` is not modified and no running statistics are
    updated. Works under ``jax.jit`` (``alpha`` may be traced) and with a batch sharded over devices (the statistics are
    over the global batch, as train-mode BatchNorm's).
    """
    _check_alpha(alpha)
    if not callable(apply_fn):
        raise TypeError(f"alpha_bn_apply: apply_fn must be callable, got {type(apply_fn).__name__}")
    if not hasattr(variables, "get") or "batch_stats" not in variables:
        raise ValueError("alpha_bn_apply: variables must hold a 'batch_stats' collection (a model with nn.BatchNorm)")
    if "mutable" in kwargs:
        raise ValueError("alpha_bn_apply: do not pass `mutable`; no running statistics are updated")
    with nn.intercept_methods(_interceptor(alpha, include)):
        out, _ = apply_fn(variables, x, *args, mutable=["batch_stats"], **kwargs)
    return out
