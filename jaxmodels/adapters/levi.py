"""LEVI: a frozen pre-trained model's layer outputs ensembled layer-wise with a small model trained from scratch.

Roh et al., "LEVI: Generalizable Fine-tuning via Layer-wise Ensemble of Different Views" (ICML 2024). The
pre-trained model ``F`` stays frozen; a small task-specific model ``g`` is trained from scratch; ``K`` adapting
layers each read one intermediate output ``h_k(x)`` of ``F`` together with ``g(x)`` and predict; the predictions
are ensembled with learned layer weights::

    z_k = [stop_grad(h_k(x)) ; g(x)] W_k + b_k                         (adapting layer k, k = 1..K)
    z   = Σ_k π_k z_k,   π = softmax(β)                                (β = 0 at init: the plain average)
    L   = CE(z, y) + (1/K) Σ_k CE(z_k, y)                              (every view supervised, and the ensemble)

The paper describes adapting layers that concatenate intermediate outputs of both models and a loss shared over
the intermediate representations; the exact per-layer loss weighting and whether the ensemble weights are learned
or fixed could not be sourced here, so this module implements the rule above (learned ``β``, every view and the
ensemble supervised) and documents it. ``g`` is a ReLU MLP (``small_hidden`` widths); its last hidden output is
the small model's view, shared by every adapting layer.

API::

    levi = init_levi(key, pre_dims=[64, 64], in_dim=64, small_hidden=(32,), n_classes=10)
    out = levi_logits(levi, [h1, h2], x)            # LeviOutput(logits [B, C], per_layer [K, B, C])
    loss = levi_loss(levi, [h1, h2], x, y)          # differentiate w.r.t. levi only (h_k are constants)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxmodels.adapters._papers import check_finite, check_positive_int, uniform_arrays

PyTree = Any

__all__ = ["LeviOutput", "init_levi", "small_model", "levi_logits", "levi_loss", "levi_num_params"]


class LeviOutput(NamedTuple):
    """``logits [B, C]``: the ensemble; ``per_layer [K, B, C]``: each adapting layer's prediction; ``weights [K]``."""

    logits: jax.Array
    per_layer: jax.Array
    weights: jax.Array


def init_levi(key: jax.Array, pre_dims: Sequence[int], in_dim: int, small_hidden: Sequence[int],
              n_classes: int) -> dict:
    """``{"small": [{kernel, bias}] (ReLU MLP from in_dim), "adapt": [{kernel [d_k + d_g, C], bias}] * K,
    "beta": [K] zeros}`` (torch ``nn.Linear`` init ``U(±1/sqrt(fan_in))``).

    >>> levi = init_levi(jax.random.PRNGKey(0), [64, 64], 64, (32,), 10)
    """
    if len(pre_dims) < 1:
        raise ValueError("levi: need at least one pre-trained layer output")
    if len(small_hidden) < 1:
        raise ValueError("levi: the small model needs at least one hidden layer")
    pre = [check_positive_int(d, "pre_dims", "levi") for d in pre_dims]
    hid = [check_positive_int(d, "small_hidden", "levi") for d in small_hidden]
    d_in = check_positive_int(in_dim, "in_dim", "levi")
    C = check_positive_int(n_classes, "n_classes", "levi")
    specs, dims = [], [d_in, *hid]
    for a, b in zip(dims[:-1], dims[1:]):
        specs += [((a, b), 1 / math.sqrt(a)), ((b,), 1 / math.sqrt(a))]
    for d in pre:
        fan = d + hid[-1]
        specs += [((fan, C), 1 / math.sqrt(fan)), ((C,), 1 / math.sqrt(fan))]
    arr = uniform_arrays(key, specs)
    ns = len(hid)
    small = [{"kernel": arr[2 * i], "bias": arr[2 * i + 1]} for i in range(ns)]
    adapt = [{"kernel": arr[2 * (ns + k)], "bias": arr[2 * (ns + k) + 1]} for k in range(len(pre))]
    return {"small": small, "adapt": adapt, "beta": jnp.zeros((len(pre),), jnp.float32)}


def small_model(small: Sequence[dict], x: jax.Array) -> jax.Array:
    """The small model's view ``g(x)``: ReLU after every layer (``x`` flattened to ``[B, -1]``)."""
    h = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    for p in small:
        h = jax.nn.relu(h @ p["kernel"] + p["bias"])
    return h


def _check(levi, pre_features, x):
    K = len(levi["adapt"])
    if len(pre_features) != K:
        raise ValueError(f"levi: {len(pre_features)} pre-trained features for {K} adapting layers")
    d_g = levi["small"][-1]["kernel"].shape[1]
    B = x.shape[0]
    for k, (h, a) in enumerate(zip(pre_features, levi["adapt"])):
        if h.ndim != 2 or h.shape[0] != B or h.shape[1] + d_g != a["kernel"].shape[0]:
            raise ValueError(f"levi: pre-trained feature {k} has shape {h.shape}, adapting layer {k} expects "
                             f"[{B}, {a['kernel'].shape[0] - d_g}]")
    if math.prod(x.shape[1:]) != levi["small"][0]["kernel"].shape[0]:
        raise ValueError(f"levi: input {x.shape} does not fit the small model's input width "
                         f"{levi['small'][0]['kernel'].shape[0]}")
    check_finite(levi, "levi", "levi")
    check_finite(list(pre_features), "pre_features", "levi")
    check_finite(x, "x", "levi")


def levi_logits(levi: dict, pre_features: Sequence[jax.Array], x: jax.Array) -> LeviOutput:
    """The adapting layers' predictions on ``[stop_grad(h_k) ; g(x)]`` and their ``softmax(β)``-weighted ensemble.
    ``pre_features``: the frozen model's outputs ``h_k [B, d_k]`` (e.g. hidden activations). Jit-able.

    >>> out = levi_logits(levi, [h1, h2], x); pred = out.logits.argmax(-1)
    """
    pre_features = list(pre_features)
    _check(levi, pre_features, x)
    g = small_model(levi["small"], x)
    zs = []
    for h, a in zip(pre_features, levi["adapt"]):
        v = jnp.concatenate([jax.lax.stop_gradient(jnp.asarray(h, jnp.float32)), g], -1)
        zs.append(v @ a["kernel"] + a["bias"])
    z = jnp.stack(zs)
    w = jax.nn.softmax(levi["beta"].astype(jnp.float32))
    return LeviOutput(jnp.einsum("k,kbc->bc", w, z), z, w)


def levi_loss(levi: dict, pre_features: Sequence[jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """``CE(z, y) + (1/K) Σ_k CE(z_k, y)`` (integer labels ``y [B]``).

    >>> g = jax.grad(levi_loss)(levi, [h1, h2], x, y)
    """
    out = levi_logits(levi, pre_features, x)
    ce = optax.softmax_cross_entropy_with_integer_labels
    return ce(out.logits, y).mean() + jnp.mean(jax.vmap(lambda z: ce(z, y).mean())(out.per_layer))


def levi_num_params(levi: dict) -> int:
    """Trainable parameters: the small model, the adapting layers and ``β``."""
    return int(sum(x.size for x in jax.tree.leaves(levi)))
