"""DAS: dynamic architecture skipping: skip the least significant layers, replaced by lightweight adapters.

Wu et al., "Parameter and Computation Efficient Transfer Learning for Vision-Language Pre-trained Models"
(NeurIPS 2023). DAS first measures how much each candidate module ``f_l`` (a transformer layer) matters to the
downstream task, then removes the ``k`` least significant ones and replaces each by an adapter, so both the
trainable parameters and the inference FLOPs drop::

    h_l = f_l(h_{l-1})                                   (kept layers, frozen)
    h_l = h_{l-1} + relu(h_{l-1} W_down + b_down) W_up + b_up      (skipped layers: the adapter only;
                                                          W_down [d, r], W_up [r, d], W_up = b = 0 at init)
    significance s_l = L(skip {l}) - L(full)             (the loss increase when f_l alone is replaced by identity)
    skip set = the k layers of smallest s_l

The paper estimates significance with reinforcement learning (sampled skip sets, rewards from the task loss, a
policy updated over training); this module uses the documented cheaper leave-one-out estimator above (one
forward pass over held-out data per candidate, no training), which ranks the layers by the same quantity the
reward measures for single-layer skips. Skipping runs through a ``flax.linen.intercept_methods`` interceptor,
so no model code changes: any module whose ``__call__(x, ...)`` maps hidden states ``[..., d] -> [..., d]``
(a ``ViTBlock``, ``BertLayer``, ``LlamaBlock`` without a cache, a square ``Dense``) can be skipped; its other
arguments are ignored.

API::

    ad = init_das(key, {"Dense_2": 128, "Dense_3": 128}, rank=8)     # adapters for the skipped layers
    y = das_apply(model, params, ad, x)                               # the skipped model's forward
    s = layer_significance(lambda ad: loss(das_apply(model, params, ad, x), y), {"Dense_1": 128, ...})
    skip = select_skips(s, k=2)                                       # the k least significant layers
    removed, added = das_savings(params, ad)                          # parameters (~FLOPs per token) saved
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.adapters._papers import check_finite, check_positive_int, uniform_arrays
from jaxmodels.tree import flatten

PyTree = Any

__all__ = ["init_das", "identity_adapters", "adapter_forward", "skip_interceptor", "das_apply",
           "layer_significance", "select_skips", "das_savings"]


def init_das(key: jax.Array, dims: Mapping[str, int], rank: int = 8) -> dict:
    """``{module: {"down" [d, r], "b_down" [r], "up" [r, d], "b_up" [d]}}`` for the layers to skip (``dims``:
    module path -> hidden size). ``down ~ U(±1/sqrt(d))`` (kaiming-uniform), the rest 0: a fresh adapter is the
    identity, so a skipped layer starts as removed.

    >>> ad = init_das(jax.random.PRNGKey(0), {"block_3": 192}, rank=8)
    """
    r = check_positive_int(rank, "rank", "das")
    if not dims:
        raise ValueError("das: no layer to skip")
    mods = sorted(dims)
    ds = [check_positive_int(dims[m], f"dims[{m!r}]", "das") for m in mods]
    downs = uniform_arrays(key, [((d, r), 1.0 / math.sqrt(d)) for d in ds])
    return {m: {"down": w, "b_down": jnp.zeros((r,), jnp.float32), "up": jnp.zeros((r, d), jnp.float32),
                "b_up": jnp.zeros((d,), jnp.float32)} for m, d, w in zip(mods, ds, downs)}


def identity_adapters(layers: Mapping[str, int] | list[str]) -> dict:
    """Skip ``layers`` with NO adapter (``f_l`` replaced by the identity): what :func:`layer_significance` measures.

    >>> y = das_apply(model, params, identity_adapters(["Dense_2"]), x)
    """
    return {m: {} for m in layers}


def adapter_forward(adapter: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """``x + relu(x W_down + b_down) W_up + b_up`` (``x`` itself for an empty adapter), computed in float32.

    >>> y = adapter_forward(ad["Dense_2"], h)
    """
    if not adapter:
        return x
    h = jnp.asarray(x, jnp.float32)
    z = jax.nn.relu(h @ adapter["down"].astype(jnp.float32) + adapter["b_down"].astype(jnp.float32))
    return (h + z @ adapter["up"].astype(jnp.float32) + adapter["b_up"].astype(jnp.float32)).astype(x.dtype)


def skip_interceptor(adapters: Mapping[str, Mapping[str, jax.Array]]) -> Callable:
    """A ``flax.linen.intercept_methods`` interceptor replacing ``__call__`` of every module whose path (``"/"``
    joined, e.g. ``"block_3"``) is a key of ``adapters`` by :func:`adapter_forward` of its first argument.

    >>> with nn.intercept_methods(skip_interceptor(ad)): y = model.apply({"params": params}, x)
    """
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not args:
            return next_fun(*args, **kwargs)
        name = "/".join(str(p) for p in context.module.path)
        if name not in adapters:
            return next_fun(*args, **kwargs)
        x = args[0]
        ad = adapters[name]
        if ad and ad["down"].shape[0] != x.shape[-1]:
            raise ValueError(f"das: adapter of {name!r} has d={ad['down'].shape[0]}, the layer input {x.shape}")
        return adapter_forward(ad, x)

    return interceptor


def _check(adapters):
    for m, ad in adapters.items():
        if not ad:
            continue
        if set(ad) != {"down", "b_down", "up", "b_up"}:
            raise ValueError(f"das: adapter {m!r} has leaves {sorted(ad)}; expected down, b_down, up, b_up")
        d, r = ad["down"].shape
        if ad["up"].shape != (r, d) or ad["b_down"].shape != (r,) or ad["b_up"].shape != (d,):
            raise ValueError(f"das: adapter {m!r}: down {ad['down'].shape}, up {ad['up'].shape} do not fit")
    check_finite(adapters, "adapters", "das")


def das_apply(model: nn.Module, params: PyTree, adapters: Mapping[str, Any], *args, **kwargs):
    """``model.apply({"params": params}, *args, **kwargs)`` with the ``adapters``' layers skipped (jit-able; the
    skipped layers' params are not read).

    >>> logits = das_apply(model, params, ad, x)
    """
    _check(adapters)
    missing = [m for m in adapters if not any(p == m or p.startswith(m + "/") for p in flatten(params))]
    if missing:
        raise ValueError(f"das: skipped layer(s) {missing} are not modules of the params")
    with nn.intercept_methods(skip_interceptor(adapters)):
        return model.apply({"params": params}, *args, **kwargs)


def layer_significance(loss_fn: Callable[[dict], jax.Array], layers: list[str] | Mapping[str, Any]
                       ) -> dict[str, float]:
    """``{l: L(skip {l}) - L(full)}`` with ``loss_fn(adapters)`` the held-out loss of the model run with those
    skips (e.g. ``lambda ad: xent(das_apply(model, params, ad, x), y)``); ``L(full) = loss_fn({})``.

    >>> s = layer_significance(lambda ad: xent(das_apply(model, params, ad, x), y), ["Dense_1", "Dense_2"])
    """
    layers = list(layers)
    if not layers:
        raise ValueError("das: no candidate layer")
    full = float(loss_fn({}))
    out = {m: float(loss_fn(identity_adapters([m]))) - full for m in layers}
    bad = [m for m, v in out.items() if not math.isfinite(v)]
    if bad or not math.isfinite(full):
        raise ValueError(f"das: non-finite loss when skipping {bad or 'nothing'}")
    return out


def select_skips(significance: Mapping[str, float], k: int) -> list[str]:
    """The ``k`` layers of smallest significance (ties: by name), sorted by name.

    >>> select_skips({"a": 0.3, "b": 0.01, "c": 0.1}, 2)     # ["b", "c"]
    """
    k = check_positive_int(k, "k", "das")
    if k > len(significance):
        raise ValueError(f"das: k={k} exceeds the {len(significance)} candidate layers")
    return sorted(sorted(significance, key=lambda m: (significance[m], m))[:k])


def das_savings(params: PyTree, adapters: Mapping[str, Mapping[str, jax.Array]]) -> tuple[int, int]:
    """``(removed, added)`` parameter counts: the skipped layers' params and the adapters' (for Dense / attention
    layers, per-token FLOPs scale with these counts).

    >>> removed, added = das_savings(params, ad)
    """
    flat = flatten(params)
    removed = sum(int(np.size(v)) for p, v in flat.items() for m in adapters if p.startswith(m + "/"))
    added = sum(int(np.size(v)) for ad in adapters.values() for v in ad.values())
    return removed, added
