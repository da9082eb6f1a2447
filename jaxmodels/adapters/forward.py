"""The unmerged LoRA forward: a ``flax.linen.intercept_methods`` interceptor, no model code changed.

:func:`apply` puts the adapters next to the base kernels (:func:`jaxmodels.adapters.inject`) and runs
``model.apply`` under :func:`lora_interceptor`, which wraps every ``nn.Dense`` / ``nn.Conv`` / ``nn.Embed`` call
whose params hold ``lora_A`` / ``lora_B``:

    Dense / Conv:  y = base(x) + s · (drop(x) ⋆ A) B         (⋆: the base's matmul / conv geometry, r channels)
    DoRA (Dense, Conv):  y = base(x) + (m / n − 1) · (drop(x) ⋆ W) + (m / n) · s · (drop(x) ⋆ A) B,
                   n = stop_gradient(||W + s A B||_c)   (PEFT's DoraLinearLayer / _DoraConvNdLayer; base(x): with bias)
    Embed:         y = E[ids] + s · A[ids] B;   attend(h) = h Eᵀ + s · (h Bᵀ) Aᵀ   (a tied head sees E + s A B,
                   so the unmerged forward equals the merged one)
    DoRA (Embed):  y = (m / n) ⊙ (E[ids] + s · A[ids] B)  (PEFT's DoraEmbeddingLayer, n over the vocabulary);
                   attend(h) = h' Eᵀ + s · (h' Bᵀ) Aᵀ with h' = h ⊙ m / n

A tied head differs from PEFT's *unmerged* forward: PEFT adds an embedding adapter to the lookup only, so its tied
``lm_head`` sees the base table until ``merge_and_unload``; here both forwards are PEFT's merged model (measured on
GPT-2 in tests/jaxmodels/adapters/test_peft.py).

Why an interceptor rather than ``W_eff = W + s A B`` before ``model.apply``: the adapter branch costs
``tokens · r · (in + out)`` FLOPs and reads only A and B, while materialising ``W_eff`` re-reads and re-writes
every targeted weight on each step (memory-bound at small batch) and, under ``jax.grad``, keeps one extra full
weight per layer alive; the interceptor also gives dropout on the adapter input (PEFT's ``lora_dropout``), which a
params transform cannot express. Scanned layers work unchanged: the adapters sit in the ``params`` collection, so
``nn.scan`` slices them with the kernels.

Frozen quantized bases (QLoRA): a ``kernel`` that is not an array (e.g. ``quant``'s ``QuantizedArray``) is turned
into one by the ``materialize`` hook and the module is re-run on it (``module.clone(parent=None).apply``), so its
own dtype / precision logic is kept. Dropout runs when ``model.apply`` gets an rng named ``"lora_dropout"``
(:func:`apply`'s ``rng``); each module draws its own key with ``make_rng`` (scanned layers share one key per call).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.adapters.lora import LoraConfig, _merge_plan, column_norm, inject, lora_delta, scaling

__all__ = ["lora_interceptor", "apply", "DROPOUT_RNG"]

DROPOUT_RNG = "lora_dropout"


def _is_array(x) -> bool:
    return isinstance(x, jax.Array) or hasattr(x, "__array__") and hasattr(x, "shape") and hasattr(x, "dtype")


def _module_name(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _dropout(module: nn.Module, x, rate: float):
    if rate == 0.0 or not module.has_rng(DROPOUT_RNG):
        return x
    keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _rerun(module: nn.Module, params: dict, method: str, *args, **kwargs):
    """Run ``module`` (a fresh unbound clone) on explicit params, e.g. a dequantized kernel."""
    clone = module.clone(parent=None)
    return clone.apply({"params": params}, *args, method=getattr(type(clone), method), **kwargs)


def lora_interceptor(config: LoraConfig, materialize: Callable | None = None):
    """The interceptor function for ``nn.intercept_methods`` (see the module docstring)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, (nn.Dense, nn.Conv, nn.Embed)) or context.method_name not in ("__call__", "attend"):
            return next_fun(*args, **kwargs)
        if isinstance(module, nn.Embed):
            return _embed(module, context.method_name, next_fun, args, kwargs, config)
        if context.method_name != "__call__" or not module.has_variable("params", "kernel"):
            return next_fun(*args, **kwargs)
        p = module.variables["params"]
        kernel = p["kernel"]
        quantized = not _is_array(kernel)
        if "lora_A" not in p and not quantized:
            return next_fun(*args, **kwargs)
        base_params = {k: v for k, v in p.items() if not k.startswith("lora_")}
        if quantized:
            if materialize is None:
                raise TypeError(f"{_module_name(module)}: kernel is a {type(kernel).__name__}; pass materialize=")
            kernel = materialize(kernel)
            base_params["kernel"] = kernel
            y = _rerun(module, base_params, "__call__", *args, **kwargs)
        else:
            y = next_fun(*args, **kwargs)
        if "lora_A" not in p:
            return y
        x = args[0] if args else kwargs["inputs"]
        a, b = p["lora_A"], p["lora_B"]
        s = scaling(config, _module_name(module), int(a.shape[-1]))
        xd = _dropout(module, x, float(config.dropout))
        if isinstance(module, nn.Conv):
            if module.feature_group_count != 1:
                raise ValueError(f"{_module_name(module)}: LoRA on grouped convs is not supported")
            xa = module.clone(parent=None, features=a.shape[-1], use_bias=False).apply(
                {"params": {"kernel": a}}, xd.astype(a.dtype))
        else:
            xa = jnp.dot(xd.astype(a.dtype), a, precision=module.precision)  # the base layer's matmul precision
        lora = jnp.dot(xa, b, precision=getattr(module, "precision", None))
        if "lora_magnitude" not in p:
            return y + (s * lora).astype(y.dtype)
        # DoRA (Dense and Conv): m / ||W + s A B||_c, the norm detached.
        ratio = _dora_ratio(kernel, a, b, s, p["lora_magnitude"])
        if xd is x:  # no dropout: x ⋆ W is the base output without its bias
            base = y.astype(jnp.float32)
            if "bias" in p:
                base = base - jnp.asarray(p["bias"], jnp.float32)
        elif isinstance(module, nn.Conv):  # the dropped-out input through the base conv, no bias
            base = module.clone(parent=None, use_bias=False, dtype=jnp.float32).apply(
                {"params": {"kernel": jnp.asarray(kernel, jnp.float32)}}, xd.astype(jnp.float32))
        else:
            base = jnp.dot(xd.astype(jnp.float32), jnp.asarray(kernel, jnp.float32), precision=module.precision)
        out = y.astype(jnp.float32) + (ratio - 1.0) * base + ratio * s * lora.astype(jnp.float32)
        return out.astype(y.dtype)

    return interceptor


def _dora_ratio(w, a, b, s: float, magnitude) -> jax.Array:
    """DoRA's per-column factor ``m / stop_gradient(||W + s A B||_c)`` in float32 (PEFT detaches the norm)."""
    v = jnp.asarray(w, jnp.float32) + s * jax.lax.stop_gradient(lora_delta(a, b))
    return jnp.asarray(magnitude, jnp.float32) / jax.lax.stop_gradient(column_norm(v))


def _embed(module, method, next_fun, args, kwargs, config):
    if not module.has_variable("params", "embedding"):
        return next_fun(*args, **kwargs)
    p = module.variables["params"]
    if "lora_A" not in p:
        return next_fun(*args, **kwargs)
    a, b = p["lora_A"], p["lora_B"]
    s = scaling(config, _module_name(module), int(a.shape[-1]))
    x = args[0] if args else kwargs.get("inputs", kwargs.get("query"))
    ratio = _dora_ratio(p["embedding"], a, b, s, p["lora_magnitude"]) if "lora_magnitude" in p else None
    if method == "__call__":
        y = next_fun(*args, **kwargs)
        lora = jnp.dot(jnp.take(a, x, axis=0), b)
        if ratio is None:
            return y + (s * lora).astype(y.dtype)
        # DoRA (PEFT's DoraEmbeddingLayer): (m / n) ⊙ (E[ids] + s A[ids] B), one factor per embedding dimension
        return (ratio * (y.astype(jnp.float32) + s * lora.astype(jnp.float32))).astype(y.dtype)
    # attend: h E_effᵀ with E_eff = (E + s A B) ⊙ r  (r = 1 for LoRA, m / n for DoRA) = h' Eᵀ + s (h' Bᵀ) Aᵀ,
    # h' = h ⊙ r: the tied head sees the merged table
    if ratio is not None:
        x = (x.astype(jnp.float32) * ratio).astype(x.dtype)
        args, kwargs = ((x, *args[1:]), kwargs) if args else ((), {**kwargs, "query": x})
    y = next_fun(*args, **kwargs)
    lora = jnp.dot(jnp.dot(x.astype(b.dtype), b.T), a.T)
    return y + (s * lora).astype(y.dtype)


def apply(model: nn.Module, params: Any, adapters: Any, config: LoraConfig, *args, rng: jax.Array | None = None,
          materialize: Callable | None = None, variables: dict | None = None, **kwargs):
    """``model.apply({"params": params + adapters, **variables}, *args, **kwargs)`` with the LoRA forward
    (unmerged). ``rng``: key for adapter dropout (training); ``None`` = no dropout. ``materialize``: hook turning
    a frozen non-array kernel (QLoRA) into an array. Other ``model.apply`` keywords (``method``, ``mutable``,
    ``rngs``) pass through."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    rngs = dict(kwargs.pop("rngs", None) or {})
    if rng is not None:
        rngs[DROPOUT_RNG] = rng
    _merge_plan(params, adapters, config)  # shapes / module names / finiteness checked before any work
    full = {"params": inject(params, adapters), **(variables or {})}
    with nn.intercept_methods(lora_interceptor(config, materialize)):
        return model.apply(full, *args, rngs=rngs or None, **kwargs)
