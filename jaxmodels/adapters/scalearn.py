"""ScaLearn: task transfer by learning to scale the outputs of frozen source-task adapters.

Frohmann et al., "ScaLearn: Simple and Highly Parameter-Efficient Task Transfer by Learning to Scale" (2023).
Stage 1 trains one adapter per source task; stage 2 freezes them and learns only scaling parameters ``ω`` that
combine their outputs for the target task, at every adapted layer ``l``::

    h_l(x) = W_l x + Σ_k ω_{l,k} ⊙ a_{l,k}(x)                                   (ScaLearn: ω_{l,k} ∈ R^{d_out})
    ScaLearnUniform:   ω_{l,k} ∈ R        (one scalar per layer and source)
    ScaLearn++:        ω_{l,k} = ω_k ∈ R^{d}   (one vector per source, shared by every layer)
    ScaLearnUniform++: ω_{l,k} = ω_k ∈ R   (K transfer parameters in all: "8 parameters for 8 source tasks")

:func:`scalearn_combine` is the rule on any stacked adapter outputs ``[K, ..., d]`` (e.g. bottleneck adapters, the
paper's setting). For LoRA source adapters (:mod:`jaxmodels.adapters.lora`) ``a_{l,k}(x) = s_k x A_k B_k`` is
linear, so the scaled sum is a weight delta and merges into the base::

    W'_l = W_l + Σ_k s_k (A_{l,k} B_{l,k}) diag(ω_{l,k})        (kernel layout [d_in, d_out]: ω scales columns)

(:func:`scalearn_merge`). Initialisation: ``ω = init`` (default ``1/K``, the average of the sources). The
reference scripts name their configurations ``scalearn_2_avg_d03`` etc.; the exact initial value and the dropout
those names encode could not be sourced here, so ``init`` is a parameter.

API::

    omega = init_scalearn(sources, "scalearn" | "uniform" | "shared" | "uniform_shared")   # the trainable tree
    params_t = scalearn_merge(params, sources, configs, omega)   # W + Σ_k s_k A_k B_k diag(ω_k)
    y = scalearn_combine(outputs, omega_layer)                     # Σ_k ω_k ⊙ a_k   (outputs [K, ..., d])
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.adapters._papers import check_finite, check_real
from jaxmodels.adapters.lora import LoraConfig, adapter_modules, lora_delta, scaling
from jaxmodels.tree import flatten, unflatten

PyTree = Any

__all__ = ["VARIANTS", "init_scalearn", "scalearn_scales", "scalearn_combine", "scalearn_merge",
           "scalearn_num_params"]

VARIANTS = ("scalearn", "uniform", "shared", "uniform_shared")
SHARED = "shared"  # the key of the one shared ω in the ++ variants


def _source_modules(sources: Sequence[PyTree]) -> dict[str, int]:
    if len(sources) < 1:
        raise ValueError("scalearn: need at least one source adapter")
    mods = [adapter_modules(s) for s in sources]
    names = set(mods[0])
    for i, m in enumerate(mods[1:], 1):
        if set(m) != names:
            diff = sorted(names ^ set(m))
            raise ValueError(f"scalearn: source 0 and source {i} adapt different modules (first differing: "
                             f"{diff[0]!r})")
    out = {}
    for name in sorted(names):
        shapes = [tuple(m[name]["lora_B"].shape) for m in mods]
        if len(set(s[-1] for s in shapes)) != 1:
            raise ValueError(f"scalearn: sources disagree on the output size of {name!r}: {shapes}")
        out[name] = shapes[0][-1]
    return out


def init_scalearn(sources: Sequence[PyTree], variant: str = "scalearn", init: float | None = None) -> dict:
    """The trainable scaling tree: ``{module: [K, d_out]}`` (scalearn), ``{module: [K]}`` (uniform),
    ``{"shared": [K, d]}`` (shared, every module's ``d_out`` equal) or ``{"shared": [K]}`` (uniform_shared)."""
    if variant not in VARIANTS:
        raise ValueError(f"scalearn: variant must be one of {VARIANTS}, got {variant!r}")
    mods = _source_modules(sources)
    K = len(sources)
    v = 1.0 / K if init is None else check_real(init, "init", "scalearn")
    if variant == "scalearn":
        return {m: jnp.full((K, d), v, jnp.float32) for m, d in mods.items()}
    if variant == "uniform":
        return {m: jnp.full((K,), v, jnp.float32) for m in mods}
    if variant == "uniform_shared":
        return {SHARED: jnp.full((K,), v, jnp.float32)}
    ds = set(mods.values())
    if len(ds) != 1:
        raise ValueError(f"scalearn: the shared (++) vector needs one output size across modules, got "
                         f"{dict(mods)}; use 'uniform_shared' or 'scalearn'")
    return {SHARED: jnp.full((K, ds.pop()), v, jnp.float32)}


def scalearn_scales(omega: dict, module: str, K: int, d_out: int) -> jax.Array:
    """``ω_{l,k}`` of ``module`` broadcast to ``[K, d_out]`` (whatever the variant)."""
    w = omega[module] if module in omega else omega.get(SHARED)
    if w is None:
        raise ValueError(f"scalearn: omega has no entry for {module!r} (and no shared entry)")
    w = jnp.asarray(w, jnp.float32)
    if w.shape not in ((K,), (K, d_out)):
        raise ValueError(f"scalearn: omega for {module!r} has shape {w.shape}, expected ({K},) or ({K}, {d_out})")
    return jnp.broadcast_to(w.reshape(K, -1), (K, d_out))


def scalearn_combine(outputs: jax.Array, omega: jax.Array) -> jax.Array:
    """``Σ_k ω_k ⊙ a_k`` for stacked adapter outputs ``[K, ..., d]`` and ``ω`` of shape ``[K]`` or ``[K, d]``."""
    K, d = outputs.shape[0], outputs.shape[-1]
    w = jnp.asarray(omega, jnp.float32).reshape(K, *([1] * (outputs.ndim - 2)), -1)
    if w.shape[-1] not in (1, d):
        raise ValueError(f"scalearn: omega {jnp.shape(omega)} does not fit outputs {outputs.shape}")
    return jnp.sum(w * outputs.astype(jnp.float32), 0).astype(outputs.dtype)


def scalearn_merge(params: PyTree, sources: Sequence[PyTree], configs: LoraConfig | Sequence[LoraConfig],
                   omega: dict) -> PyTree:
    """``W + Σ_k s_k (A_k B_k) diag(ω_k)`` for every module the (frozen) LoRA ``sources`` adapt; ``configs`` is
    one :class:`LoraConfig` for all sources or one per source (their scalings ``s_k``). Inputs unchanged."""
    mods = _source_modules(sources)
    K = len(sources)
    configs = [configs] * K if isinstance(configs, LoraConfig) else list(configs)
    if len(configs) != K:
        raise ValueError(f"scalearn: {len(configs)} configs for {K} sources")
    check_finite(params, "params", "scalearn")
    for i, s in enumerate(sources):
        check_finite(s, f"source {i}", "scalearn")
    check_finite(omega, "omega", "scalearn")
    flat = flatten(params)
    src = [adapter_modules(s) for s in sources]
    for m, d_out in mods.items():
        key = f"{m}/kernel" if f"{m}/kernel" in flat else f"{m}/embedding"
        if key not in flat:
            raise ValueError(f"scalearn: adapter module {m!r} is not in the params")
        w = flat[key]
        if w.shape[-1] != d_out:
            raise ValueError(f"scalearn: {m!r} has {w.shape[-1]} outputs, the sources {d_out}")
        om = scalearn_scales(omega, m, K, d_out)
        acc = jnp.asarray(w, jnp.float32)
        for k in range(K):
            a, b = src[k][m]["lora_A"], src[k][m]["lora_B"]
            acc = acc + scaling(configs[k], m, int(a.shape[-1])) * lora_delta(a, b) * om[k]
        flat[key] = acc.astype(w.dtype)
    return unflatten(flat, like=params)


def scalearn_num_params(omega: dict) -> int:
    """The number of trainable transfer parameters in ``omega`` (the tree of :func:`init_scalearn`): the total size of
    its leaves, e.g. ``K`` for ScaLearnUniform++ ("8 parameters for 8 source tasks")."""
    return int(sum(x.size for x in jax.tree.leaves(omega)))
