"""Polytropon and Multi-Head Routing (MHR): an inventory of LoRA skills mixed per task by a learned router.

Ponti et al., "Combining Parameter-efficient Modules for Task-level Generalisation" (Polytropon, 2023) and
Caccia et al., "Multi-Head Adapter Routing for Cross-Task Generalization" (MHR, 2023), as PEFT's ``poly`` tuner
(a port of ``microsoft/mttl``) computes them. Per adapted layer: ``S`` skills, ``h`` heads (``n_splits``; Poly is
``h = 1``), ``A ∈ R^{h × S × d_in/h × r}``, ``B ∈ R^{h × S × r × d_out/h}`` and router logits
``Z ∈ R^{T × h·S}`` (one row per task). For task ``t`` and head ``q``::

    w_{t,q,s} = σ(Z_{t,q,s}) / (Σ_s' σ(Z_{t,q,s'}) + 1e-12)        (training: a relaxed-Bernoulli sample,
                                                                    temperature 1, instead of σ; eval: σ)
    A_t[q] = Σ_s w_{t,q,s} A[q, s],     B_t[q] = Σ_s w_{t,q,s} B[q, s]
    A_t = concat_q A_t[q]  ([d_in, r]),  B_t = concat over output blocks of B_t[q]  ([r, d_out])
    W_t = W + A_t B_t / r

so head ``q`` mixes its own block of input rows of ``A`` and its own block of output columns of ``B``. Init as
PEFT: ``A`` kaiming-uniform per (head, skill), ``B = 0``, ``Z ~ U(-1e-3, 1e-3)``.

Few-shot adaptation to a new task (MHR's findings): **MHR-z** trains only the new task's router row (the
inventory frozen; :func:`add_task`); **MHR-μ** discards routing and fine-tunes the average adapter
``A_μ[q] = mean_s A[q, s]``, ``B_μ[q] = mean_s B[q, s]`` (:func:`mhr_mu`: a plain weightlab LoRA).

API::

    mhr = init_mhr(key, params, MhrConfig(n_tasks=4, n_skills=4, n_splits=8, rank=2, target=r"Dense_[01]$"))
    params_t = mhr_merge(params, mhr, task, key=None)      # W + A_t B_t / r (key: sampled routing, training)
    mhr = add_task(key, mhr)                                # one more router row (MHR-z trains only Z[-1])
    lora, cfg = mhr_mu(mhr)                                 # MHR-μ as LoRA adapters + LoraConfig
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxmodels.adapters._papers import check_finite, check_positive_int, uniform_arrays
from jaxmodels.adapters.lora import LoraConfig
from jaxmodels.tree import flatten, unflatten

PyTree = Any

__all__ = ["MhrConfig", "init_mhr", "routing_weights", "task_lora", "mhr_merge", "add_task", "mhr_mu",
           "mhr_num_params"]

EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class MhrConfig:
    """PEFT's ``PolyConfig`` under weightlab's names: ``rank`` (r), ``n_tasks``, ``n_skills``, ``n_splits``
    (heads; 1 = Polytropon), ``target`` (module-path regex, as :class:`LoraConfig`)."""

    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    rank: int = 2
    target: str = r".*"

    def __post_init__(self):
        for n in ("n_tasks", "n_skills", "n_splits", "rank"):
            check_positive_int(getattr(self, n), n, "mhr")


def init_mhr(key: jax.Array, params: PyTree, config: MhrConfig) -> dict:
    """``{module: {"A": [h, S, d_in/h, r], "B": [h, S, r, d_out/h], "logits": [T, h·S]}}`` for every Dense kernel
    (2-D) whose module path matches ``config.target``."""
    flat = flatten(params)
    h, S, r = config.n_splits, config.n_skills, config.rank
    mods = sorted(p[: -len("/kernel")] for p, v in flat.items()
                  if p.endswith("/kernel") and getattr(v, "ndim", 0) == 2 and re.search(config.target, p[:-7]))
    if not mods:
        raise ValueError(f"mhr: target={config.target!r} selects no Dense kernel")
    specs, dims = [], {}
    for m in mods:
        d_in, d_out = flat[f"{m}/kernel"].shape
        if d_in % h or d_out % h:
            raise ValueError(f"mhr: {m!r} kernel [{d_in}, {d_out}] is not divisible into n_splits={h} heads")
        dims[m] = (d_in, d_out)
        # kaiming_uniform(a=sqrt(5)) of each [r, d_in/h] block: bound 1/sqrt(d_in/h); router U(-1e-3, 1e-3)
        specs += [((h, S, d_in // h, r), 1.0 / math.sqrt(d_in // h)), ((config.n_tasks, h * S), 1e-3)]
    arrays = uniform_arrays(key, specs)
    out = {}
    for i, m in enumerate(mods):
        d_in, d_out = dims[m]
        out[m] = {"A": arrays[2 * i], "B": jnp.zeros((h, S, r, d_out // h), jnp.float32), "logits": arrays[2 * i + 1]}
    return out


def routing_weights(logits: jax.Array, n_splits: int, key: jax.Array | None = None) -> jax.Array:
    """``w [h, S]`` from one task's logits row ``[h·S]``: σ (or a relaxed-Bernoulli sample when ``key`` is given),
    normalised over the skills of each head."""
    z = logits.reshape(n_splits, -1).astype(jnp.float32)
    if key is None:
        p = jax.nn.sigmoid(z)
    else:  # RelaxedBernoulli(temperature=1, logits=z).rsample(): sigmoid((z + logit(u)) / 1)
        u = jax.random.uniform(key, z.shape, jnp.float32, 1e-6, 1.0 - 1e-6)
        p = jax.nn.sigmoid(z + jnp.log(u) - jnp.log1p(-u))
    return p / (jnp.sum(p, -1, keepdims=True) + EPS)


def task_lora(entry: dict, task, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(A_t [d_in, r], B_t [r, d_out])`` of one module for task index ``task`` (int or traced scalar)."""
    A, B = entry["A"], entry["B"]
    h, S, di, r = A.shape
    w = routing_weights(entry["logits"][task], h, key)
    At = jnp.einsum("qs,qsdr->qdr", w, A.astype(jnp.float32)).reshape(h * di, r)
    Bt = jnp.einsum("qs,qsrd->qrd", w, B.astype(jnp.float32))  # [h, r, d_out/h]
    Bt = jnp.transpose(Bt, (1, 0, 2)).reshape(r, -1)
    return At, Bt


def _check(params, mhr, method):
    flat = flatten(params)
    for m, e in mhr.items():
        if f"{m}/kernel" not in flat:
            raise ValueError(f"{method}: module {m!r} has no kernel in the params")
        d_in, d_out = flat[f"{m}/kernel"].shape
        h, S, di, r = e["A"].shape
        if e["B"].shape != (h, S, r, d_out // h) or di * h != d_in or e["logits"].shape[-1] != h * S:
            raise ValueError(f"{method}: {m!r}: A {e['A'].shape}, B {e['B'].shape}, logits {e['logits'].shape} "
                             f"do not fit kernel [{d_in}, {d_out}]")
    check_finite(params, "params", method)
    check_finite(mhr, "mhr", method)
    return flat


def mhr_merge(params: PyTree, mhr: dict, task, key: jax.Array | None = None) -> PyTree:
    """Params of task ``task``: ``W + A_t B_t / r`` for every routed module (``key``: sampled routing, one
    independent sample per module). Jit-able (``task`` may be traced, e.g. under ``vmap`` over tasks)."""
    flat = dict(_check(params, mhr, "mhr_merge"))
    if not isinstance(task, jax.core.Tracer):
        T = {e["logits"].shape[0] for e in mhr.values()}.pop()
        if not 0 <= int(task) < T:
            raise ValueError(f"mhr_merge: task {task} out of range [0, {T})")
    for i, (m, e) in enumerate(sorted(mhr.items())):
        k = None if key is None else jax.random.fold_in(key, i)
        At, Bt = task_lora(e, task, k)
        w = flat[f"{m}/kernel"]
        flat[f"{m}/kernel"] = (w.astype(jnp.float32) + At @ Bt / At.shape[1]).astype(w.dtype)
    return unflatten(flat, like=params)


def add_task(key: jax.Array, mhr: dict) -> dict:
    """The inventory with one more router row per module (``U(-1e-3, 1e-3)``), for MHR-z few-shot adaptation:
    the new task is index ``T`` (the last row); train only ``logits[-1]``."""
    mods = sorted(mhr)
    rows = uniform_arrays(key, [((1, mhr[m]["logits"].shape[1]), 1e-3) for m in mods])
    return {m: {**mhr[m], "logits": jnp.concatenate([mhr[m]["logits"], row], 0)} for m, row in zip(mods, rows)}


def mhr_mu(mhr: dict) -> tuple[dict, LoraConfig]:
    """MHR-μ: the skill-averaged adapter as weightlab LoRA (``lora_A [d_in, r]``, ``lora_B [r, d_out]``) and a
    :class:`LoraConfig` with ``alpha = 1`` so its scale ``alpha / r = 1 / r`` equals the poly layer's."""
    flat, ranks = {}, set()
    for m, e in mhr.items():
        h, S, di, r = e["A"].shape
        flat[f"{m}/lora_A"] = jnp.mean(e["A"].astype(jnp.float32), 1).reshape(h * di, r)
        flat[f"{m}/lora_B"] = jnp.transpose(jnp.mean(e["B"].astype(jnp.float32), 1), (1, 0, 2)).reshape(r, -1)
        ranks.add(r)
    if len(ranks) != 1:
        raise ValueError(f"mhr_mu: modules have different ranks {sorted(ranks)}")
    target = "^(" + "|".join(re.escape(m) for m in sorted(mhr)) + ")$"
    return unflatten(flat), LoraConfig(rank=ranks.pop(), alpha=1.0, target=target)


def mhr_num_params(mhr: dict, part: str | None = None) -> int:
    """Parameters of the inventory (``part`` = "A", "B", "logits" or None for all)."""
    return int(sum(e[k].size for e in mhr.values() for k in e if part is None or k == part))
