"""DP-FedAvg with flat or per-layer clipping of the client updates (user-level differential privacy).

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models" (ICLR 2018),
Algorithm 1 (DP-FedAvg), and Pelikan et al., "Federated Learning with Differential Privacy for End-to-End
Speech Recognition" (2023; revised as "Enabling Differentially Private Federated Learning for Speech Recognition:
Benchmarks, Adaptive Optimizers and Gradient Clipping"; reference code github.com/apple/ml-pfl4asr,
``experiments/train_pfl.py`` + ``pfl4asr/pfl/server.py``), who clip per layer. For the server model θ_t
and clients θ_i (weights w_i ≥ 0)::

    Δ_i = θ_i − θ_t
    Δ̂_i = clip(Δ_i)        flat:      Δ_i · min(1, C / ‖Δ_i‖₂)                          (McMahan's FlatClip)
                            per layer: each leaf l to its own bound C_l, Σ_l C_l² = C²    (PerLayerClip)
    Δ̄   = Σ_i w_i Δ̂_i / D                    D = Σ_i w_i, or the fixed ``denominator`` (McMahan's f̃_f = qW)
    Δ̃   = Δ̄ + N(0, s² I),   s = z · C · w_max / D            w_max = ``max_weight``, or max_i w_i if None
    θ_{t+1} = θ_t + η Δ̃                       (η = ``server_learning_rate``, 1 = plain DP-FedAvg)

Replacing one client's data moves Σ_i w_i Δ̂_i by at most w_max · C, so s is the Gaussian mechanism's std for
noise multiplier z; with uniform weights it is N(0, z²C²/n²) on the mean of n clients. The per-layer
bounds and rules are those of :mod:`jaxmodels.optim.dp_clip` (``allocation="uniform"``: C_l = C/√L, or
``"dimension"``: C_l = C√(n_l/N), both in ml-pfl4asr as ``use_uniform_per_layer_clip``; ``mode="clip"``:
McMahan's per-layer clip, ``mode="normalize"``: ml-pfl4asr's ``clip_layer_grads``, every layer rescaled to C_l once
‖Δ_i‖ ≥ C). ml-pfl4asr adds its noise (``dp_sigma = clipping * sigma_average`` in its config) to the averaged
deltas, as here.

Pelikan et al.'s second ingredient, layer-wise normalization, is the *server optimizer* (LAMB in their configs):
feed the noisy pseudo-gradient ``θ_t − dp_fedavg(θ_t, clients, ...)`` (η = 1) to :func:`jaxmodels.optim.lamb` (or
any Optax optimizer) instead of stepping with η. Noise is drawn per leaf from ``merging._common.leaf_key(key,
path)`` (reproducible whether the tree is merged whole or leaf by leaf).

Privacy accounting (ε, δ from z, the client sampling rate q and the number of rounds) is not done here: plug z, q
and the rounds into an accountant such as Google's ``dp_accounting`` (RDP or PLD accountant). For the guarantee the
noise scale must not depend on the data: bound the weights (McMahan: w_i = min(n_i / ŵ, 1), ``max_weight=1``) and
fix D (``denominator=q·W``); the defaults (D = Σ_i w_i, w_max = the round's largest weight) are the usual practical
estimator. With the default D a round where every weight is 0 returns ``global_params`` unchanged; with a fixed D
and ``max_weight`` such a round still releases θ_t plus the noise, as the mechanism requires.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.optim.dp_clip import ALLOCATIONS, CLIP_MODES, clip_layers
from jaxmodels.tree import flatten, is_concrete, unflatten
from merging import _common as C
from merging.federated.clients import validate_rule_inputs

PyTree = Any

__all__ = ["dp_fedavg", "clip_client_deltas"]

METHOD = "dp_fedavg"
_HI = jax.lax.Precision.HIGHEST


def _positive(value: Any, name: str, allow_zero: bool = False) -> float:
    v = C.concrete_scalar(value, name, METHOD)
    if v is None:
        raise TypeError(f"{METHOD}: `{name}` must be a concrete number (it sets the clipping/noise statically)")
    C.check_finite_param(v, name, METHOD)
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{METHOD}: `{name}` must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    return v


def _clip_one(delta: dict, clip: float, per_layer: bool, allocation: str, mode: str) -> dict:
    if per_layer:
        return clip_layers(delta, clip, allocation=allocation, mode=mode)
    out, _ = optax.clip_by_global_norm(clip).update(delta, optax.EmptyState())
    return out


@functools.partial(jax.jit, static_argnames=("clip", "per_layer", "allocation", "mode"))
def _clipped_deltas(g: dict, c: dict, *, clip, per_layer, allocation, mode) -> dict:
    deltas = {p: c[p].astype(jnp.float32) - g[p].astype(jnp.float32)[None] for p in g}
    return jax.vmap(lambda d: _clip_one(d, clip, per_layer, allocation, mode))(deltas)


@functools.partial(jax.jit, static_argnames=("clip", "per_layer", "allocation", "mode", "noisy"))
def _dp_fedavg(g: dict, c: dict, w: jax.Array, keys: dict, z: jax.Array, denom: jax.Array, wmax: jax.Array,
               lr: jax.Array, *, clip, per_layer, allocation, mode, noisy) -> dict:
    clipped = _clipped_deltas(g, c, clip=clip, per_layer=per_layer, allocation=allocation, mode=mode)
    denom = jnp.where(jnp.isnan(denom), jnp.sum(w), denom)
    wmax = jnp.where(jnp.isnan(wmax), jnp.max(w), wmax)
    safe = jnp.where(denom > 0, denom, 1.0)
    std = z * clip * wmax / safe
    out = {}
    for p, x in g.items():
        mean = jnp.tensordot(w, clipped[p], axes=1, precision=_HI) / safe  # no TF32 on GPUs
        if noisy:
            mean = mean + std * jax.random.normal(keys[p], mean.shape, jnp.float32)
        new = x.astype(jnp.float32) + lr * mean
        out[p] = jnp.where(denom > 0, new, x.astype(jnp.float32)).astype(x.dtype)
    return out


def clip_client_deltas(global_params: PyTree, client_params: PyTree, *, clip: float, per_layer: bool = True,
                       allocation: str = "uniform", mode: str = "clip") -> PyTree:
    """The clipped client updates Δ̂_i of :func:`dp_fedavg` as a client-stacked float32 tree (leaf ``[C, ...]``):
    what each client would send. The tree and hyper-parameter checks of :func:`dp_fedavg` (no finiteness check)."""
    _check_rule(clip, per_layer, allocation, mode)
    validate_rule_inputs(global_params, client_params, None, METHOD, check_finite=False)
    g, c = flatten(global_params), flatten(client_params)
    out = _clipped_deltas(g, c, clip=float(clip), per_layer=bool(per_layer), allocation=allocation, mode=mode)
    return unflatten(out, like=global_params)


def _check_rule(clip, per_layer, allocation, mode) -> None:
    _positive(clip, "clip")
    if not isinstance(per_layer, (bool, np.bool_)):
        raise TypeError(f"{METHOD}: `per_layer` must be a bool, got {per_layer!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"{METHOD}: `allocation` must be one of {ALLOCATIONS}, got {allocation!r}")
    if mode not in CLIP_MODES:
        raise ValueError(f"{METHOD}: `mode` must be one of {CLIP_MODES}, got {mode!r}")
    if not per_layer and mode != "clip":
        raise ValueError(f"{METHOD}: mode={mode!r} is a per-layer rule; flat clipping (per_layer=False) has none")


def dp_fedavg(global_params: PyTree, client_params: PyTree, *, weights: Any = None, clip: float,
              noise_multiplier: float, key: jax.Array | None = None, per_layer: bool = True,
              allocation: str = "uniform", mode: str = "clip", denominator: float | None = None,
              max_weight: float | None = None, server_learning_rate: float = 1.0,
              check_finite: bool = True) -> PyTree:
    """One DP-FedAvg server step (see the module docstring for the equations).

    Args:
      global_params: the server model θ_t (a plain tree).
      client_params: the clients' models after local training, client-stacked (leaf ``[C, ...]``).
      weights: ``[C]`` non-negative aggregation weights (0 = did not participate; None = uniform).
      clip: the total L2 bound C on each client's update (> 0).
      noise_multiplier: z ≥ 0; the noise std on the averaged update is z · C · w_max / D.
      key: a ``jax.random.key`` for the noise; required when ``noise_multiplier`` > 0.
      per_layer: clip every leaf to its own bound (True, Pelikan et al.) or the whole update (False, FlatClip).
      allocation / mode: the per-layer bounds and rule of :mod:`jaxmodels.optim.dp_clip`.
      denominator: a fixed D > 0 (McMahan's f̃_f: q·W, the expected total weight); None = Σ_i w_i.
      max_weight: a fixed bound w_max > 0 on every weight (checked when concrete) for the noise scale; None = the
        round's max_i w_i.
      server_learning_rate: η > 0 in θ_{t+1} = θ_t + η Δ̃.
      check_finite: reject NaN/Inf in the inputs before any work (skipped for tracers under ``jit``).

    Returns the new server model, every leaf in its own dtype (computed in float32). Jittable with ``key`` traced;
    ``clip`` and the names are static; ``noise_multiplier``, ``denominator``, ``max_weight`` and η may be traced.
    """
    _check_rule(clip, per_layer, allocation, mode)
    z = C.concrete_scalar(noise_multiplier, "noise_multiplier", METHOD)
    if z is not None:
        C.check_finite_param(z, "noise_multiplier", METHOD)
        if z < 0:
            raise ValueError(f"{METHOD}: `noise_multiplier` must be >= 0, got {z}")
    noisy = z is None or z > 0
    if noisy and key is None:
        raise ValueError(f"{METHOD}: noise_multiplier > 0 needs an explicit `key` (jax.random.key)")
    if noisy and not (isinstance(key, jax.Array) and ((jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                                       and key.shape == ())
                                                      or (key.dtype == jnp.uint32 and key.shape == (2,)))):
        raise TypeError(f"{METHOD}: `key` must be a jax.random.key (or a legacy PRNGKey), got {key!r}")
    if denominator is not None:
        d = C.concrete_scalar(denominator, "denominator", METHOD)
        if d is not None:
            _positive(d, "denominator")
    wm = None if max_weight is None else C.concrete_scalar(max_weight, "max_weight", METHOD)
    if wm is not None:
        _positive(wm, "max_weight")
    lr = C.concrete_scalar(server_learning_rate, "server_learning_rate", METHOD)
    if lr is not None:
        _positive(lr, "server_learning_rate")
    _, w = validate_rule_inputs(global_params, client_params, weights, METHOD, check_finite=check_finite)
    if wm is not None and is_concrete(w):
        top = float(np.max(np.asarray(jax.device_get(w))))
        if top > wm:
            raise ValueError(f"{METHOD}: a weight ({top}) exceeds max_weight={wm}: the noise would not cover it")
    g, c = flatten(global_params), flatten(client_params)
    keys = {p: C.leaf_key(key, p) for p in g} if noisy else {}
    denom = jnp.asarray(math.nan if denominator is None else denominator, jnp.float32)
    wmax = jnp.asarray(math.nan if max_weight is None else max_weight, jnp.float32)
    out = _dp_fedavg(g, c, w, keys, jnp.asarray(0.0 if z == 0 else noise_multiplier, jnp.float32), denom, wmax,
                     jnp.asarray(server_learning_rate, jnp.float32), clip=float(clip), per_layer=bool(per_layer),
                     allocation=allocation, mode=mode, noisy=noisy)
    return unflatten(out, like=global_params)

