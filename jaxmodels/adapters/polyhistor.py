"""Polyhistor-Lite: decomposed hypernetworks generate per-task adapter weights; layer-wise scaling kernels fit
them to layers of different widths.

Liu et al., "Polyhistor: Parameter-Efficient Multi-Task Adaptation for Dense Vision Tasks" (NeurIPS 2022). For
task ``t`` and adapted layer ``l`` (Dense kernel ``[d_in, d_out]`` with ``d_in = a_l d_0``, ``d_out = b_l d_0``,
``d_0`` the template size)::

    D_{t,l} = H^D_task(e_t) H^D_layer(g_l)                   [d_0, r]   (the down-projection template kernel)
    U_{t,l} = (H^U_task(e_t) H^U_layer(g_l))ᵀ                [r, d_0]   (the up-projection template kernel)
    H_task(e) = Σ_i e_i P_task[i]  [d_0, p],  H_layer(g) = Σ_i g_i P_layer[i]  [p, r]     (linear hypernetworks)
    W^down_{t,l} = S^D_l ⊗ D_{t,l}    (S^D_l ∈ R^{a_l x 1})       [d_in, r]     (layer-wise scaling kernels,
    W^up_{t,l}   = S^U_l ⊗ U_{t,l}    (S^U_l ∈ R^{1 x b_l})       [r, d_out]     Kronecker products)
    W_{t,l} = W_l + W^down_{t,l} W^up_{t,l} / r

Trainable: task embeddings ``e_t``, layer embeddings ``g_l`` (dim ``k``), the four hypernetworks (``P``) and the
scaling kernels; the count does not grow with the layer widths (only ``a_l + b_l`` per layer) nor, beyond
``k`` per task, with the tasks. The hypernetwork is "decomposed" as the paper's: one pair of hypernetworks
maps the task embedding to a ``[d_0, p]`` factor and the layer embedding to a ``[p, r]`` factor, and their
product is the template. Deviation: the paper's adapters are bottleneck modules ``h + W^up σ(W^down h)``; here
the adapter is linear (a kernel delta, as LoRA), so a task's model merges into plain params
(:func:`polyhistor_merge`); the exact hypernetwork sizes and initialisation could not be sourced here. Init:
``e, g ~ N(0, 1)``, ``P^D ~ N(0, 1/k)``, ``P^U_task = 0`` (every task starts at the base model, as LoRA's B = 0),
``P^U_layer ~ N(0, 1/k)``, scaling kernels 1.

API::

    hp = init_polyhistor(key, params, PolyhistorConfig(n_tasks=3, template=32, rank=4, embed=4, hidden=2,
                                                       target=r"^Dense_[01]$"))
    params_t = polyhistor_merge(params, hp, task)          # W + W_down W_up / r for task `task` (jit-able)
    down, up = polyhistor_weights(hp, "Dense_0", task)     # the generated adapter of one layer
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxmodels.adapters._papers import check_finite, check_positive_int
from jaxmodels.tree import flatten, unflatten

PyTree = Any

__all__ = ["PolyhistorConfig", "init_polyhistor", "polyhistor_weights", "polyhistor_merge", "polyhistor_num_params"]


@dataclasses.dataclass(frozen=True)
class PolyhistorConfig:
    """``n_tasks``; ``template`` (``d_0``: every adapted width must be a multiple of it); ``rank`` (``r``);
    ``embed`` (``k``, the task / layer embedding size); ``hidden`` (``p``, the inner size of the decomposed
    template); ``target`` (module-path regex selecting 2-D Dense kernels)."""

    n_tasks: int = 1
    template: int = 32
    rank: int = 4
    embed: int = 4
    hidden: int = 2
    target: str = r".*"

    def __post_init__(self):
        for n in ("n_tasks", "template", "rank", "embed", "hidden"):
            check_positive_int(getattr(self, n), n, "polyhistor")
        try:
            re.compile(self.target)
        except re.error as e:
            raise ValueError(f"polyhistor: target {self.target!r} is not a valid regex: {e}") from None


def init_polyhistor(key: jax.Array, params: PyTree, config: PolyhistorConfig) -> dict:
    """``{"task_embed" [T, k], "layers": {module: {"embed" [k], "scale_down" [a_l], "scale_up" [b_l]}},
    "hyper": {"down_task" [k, d_0, p], "down_layer" [k, p, r], "up_task" [k, d_0, p], "up_layer" [k, p, r]}}``.

    >>> hp = init_polyhistor(key, params, PolyhistorConfig(n_tasks=3, target=r"^Dense_[01]$"))
    """
    c = config
    flat = flatten(params)
    mods = sorted(p[: -len("/kernel")] for p, v in flat.items()
                  if p.endswith("/kernel") and getattr(v, "ndim", 0) == 2 and re.search(c.target, p[: -len("/kernel")]))
    if not mods:
        raise ValueError(f"polyhistor: target={c.target!r} selects no 2-D Dense kernel")
    d0, k, p, r = c.template, c.embed, c.hidden, c.rank
    layers = {}
    keys = jax.random.split(key, len(mods) + 4)
    for i, m in enumerate(mods):
        d_in, d_out = flat[f"{m}/kernel"].shape
        if d_in % d0 or d_out % d0:
            raise ValueError(f"polyhistor: {m!r} kernel [{d_in}, {d_out}] is not a multiple of template={d0}")
        layers[m] = {"embed": jax.random.normal(keys[i], (k,), jnp.float32),
                     "scale_down": jnp.ones((d_in // d0,), jnp.float32),
                     "scale_up": jnp.ones((d_out // d0,), jnp.float32)}
    kt, kd, kl, ku = keys[len(mods):]
    s = 1.0 / math.sqrt(k)
    hyper = {"down_task": s * jax.random.normal(kd, (k, d0, p), jnp.float32),
             "down_layer": s * jax.random.normal(kl, (k, p, r), jnp.float32),
             "up_task": jnp.zeros((k, d0, p), jnp.float32),
             "up_layer": s * jax.random.normal(ku, (k, p, r), jnp.float32)}
    return {"task_embed": jax.random.normal(kt, (c.n_tasks, k), jnp.float32), "layers": layers, "hyper": hyper}


def polyhistor_weights(hp: dict, module: str, task) -> tuple[jax.Array, jax.Array]:
    """``(W_down [d_in, r], W_up [r, d_out])`` of ``module`` for task index ``task`` (int or traced).

    >>> down, up = polyhistor_weights(hp, "Dense_0", 1)
    """
    lay, h = hp["layers"][module], hp["hyper"]
    e, g = hp["task_embed"][task].astype(jnp.float32), lay["embed"].astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    D = jnp.einsum("k,kdp->dp", e, h["down_task"], precision=hi) @ jnp.einsum("k,kpr->pr", g, h["down_layer"],
                                                                               precision=hi)       # [d0, r]
    U = (jnp.einsum("k,kdp->dp", e, h["up_task"], precision=hi) @ jnp.einsum("k,kpr->pr", g, h["up_layer"],
                                                                             precision=hi)).T      # [r, d0]
    down = jnp.kron(lay["scale_down"].astype(jnp.float32)[:, None], D)                  # [a d0, r]
    up = jnp.kron(lay["scale_up"].astype(jnp.float32)[None, :], U)                      # [r, b d0]
    return down, up


def polyhistor_merge(params: PyTree, hp: dict, task) -> PyTree:
    """Params of task ``task``: ``W_l + W^down_{t,l} W^up_{t,l} / r`` for every adapted layer (inputs unchanged;
    jit-able, ``task`` may be traced, e.g. under ``vmap`` over tasks).

    >>> params_1 = polyhistor_merge(params, hp, 1)
    """
    flat = dict(flatten(params))
    for m in hp["layers"]:
        if f"{m}/kernel" not in flat:
            raise ValueError(f"polyhistor: module {m!r} has no kernel in the params")
    check_finite(params, "params", "polyhistor")
    check_finite(hp, "hp", "polyhistor")
    if not isinstance(task, jax.core.Tracer):
        T = hp["task_embed"].shape[0]
        if not 0 <= int(task) < T:
            raise ValueError(f"polyhistor: task {task} out of range [0, {T})")
    r = hp["hyper"]["down_layer"].shape[-1]
    for m in sorted(hp["layers"]):
        w = flat[f"{m}/kernel"]
        down, up = polyhistor_weights(hp, m, task)
        if down.shape[0] != w.shape[0] or up.shape[1] != w.shape[1]:
            raise ValueError(f"polyhistor: {m!r}: generated [{down.shape[0]}, {up.shape[1]}] does not fit kernel "
                             f"{tuple(w.shape)}")
        flat[f"{m}/kernel"] = (w.astype(jnp.float32) + down @ up / r).astype(w.dtype)
    return unflatten(flat, like=params)


def polyhistor_num_params(hp: dict) -> int:
    """Trainable parameters of ``hp`` (embeddings, hypernetworks, scaling kernels).

    >>> polyhistor_num_params(hp)
    """
    return int(sum(x.size for x in jax.tree.leaves(hp)))
