"""MoS: Mixture of Shards, LoRA factors assembled from shards of global pools shared across layers.

Wang et al., "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards" (ICLR 2025).
Layers whose kernels have the same shape share one global pool of shards for ``A`` and one for ``B``; each layer
retrieves its ``r`` rank vectors from them with its own index matrix and concatenates shards into vectors. With
``l`` shards per vector (vector sharding), the pools ``P_A ∈ R^{n × d_in/l}``, ``P_B ∈ R^{n × d_out/l}``, a
layer's private shards ``Q_A ∈ R^{p × d_in/l}``, ``Q_B ∈ R^{p × d_out/l}`` (shard privatization) and its index
matrices ``I_A, I_B ∈ {0 .. n+p-1}^{r × l}``::

    A[:, i] = concat_j [P_A ; Q_A][I_A[i, j]]        (lora_A [d_in, r])
    B[i, :] = concat_j [P_B ; Q_B][I_B[i, j]]        (lora_B [r, d_out])
    W' = W + (alpha / r) A B                          (a weightlab LoRA: :func:`mos_lora` + ``adapters.merge``)

The four differentiation strategies, each switchable for the paper's ablation (all off = pure sharing: every
layer the same vectors):

* subset selection: each layer draws its own ``r·l`` distinct indices (off: every layer uses the same ones);
* pair dissociation: ``I_B`` is drawn independently of ``I_A`` (off: ``I_B = I_A``, A and B shards paired);
* vector sharding: ``l > 1`` shards per vector (``shards_per_vector``; 1 = whole vectors);
* shard privatization: ``p`` private shards per layer (``private``; 0 = none), whose indices come first.

Trainable parameters are the pools only (``n + L·p`` shards per factor and shape group); the indices are fixed
integers. Init: ``A`` shards ``U(-1/sqrt(d_in), 1/sqrt(d_in))`` (PEFT's LoRA A init), ``B`` shards zero, so
``W' = W`` at step 0. What could not be sourced: the abstract's "MoE-like routing mechanism" is implemented as
fixed index matrices drawn once per layer from ``seed`` (private shards first, then public ones without
replacement); a learned gate over shards, if the paper uses one, is not implemented.

API::

    cfg = MosConfig(rank=8, alpha=8.0, target=r"Dense_[01]$", pool_size=16, private=2, shards_per_vector=2)
    mos = init_mos(key, params, cfg)                 # {"pools": trainable, "index": fixed ints}
    lora, lcfg = mos_lora(mos, cfg)                  # plain LoRA adapters (jaxmodels.adapters.merge / apply)
    n = mos_num_params(mos)                           # trainable pool entries
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.adapters._papers import check_finite, check_positive_int, uniform_arrays
from jaxmodels.adapters.lora import LoraConfig
from jaxmodels.tree import flatten, unflatten

PyTree = Any

__all__ = ["MosConfig", "init_mos", "mos_lora", "mos_num_params"]


@dataclasses.dataclass(frozen=True)
class MosConfig:
    """``rank`` / ``alpha`` / ``target`` as :class:`LoraConfig`; ``pool_size`` (n, public shards per factor and
    shape group), ``private`` (p, per layer), ``shards_per_vector`` (l), the two index strategies, ``seed``."""

    rank: int = 8
    alpha: float = 8.0
    target: str = r".*"
    pool_size: int = 16
    private: int = 1
    shards_per_vector: int = 2
    subset_selection: bool = True
    pair_dissociation: bool = True
    seed: int = 0

    def __post_init__(self):
        check_positive_int(self.rank, "rank", "mos")
        check_positive_int(self.pool_size, "pool_size", "mos")
        check_positive_int(self.shards_per_vector, "shards_per_vector", "mos")
        if isinstance(self.private, bool) or int(self.private) != self.private or self.private < 0:
            raise ValueError(f"mos: `private` must be a non-negative integer, got {self.private!r}")
        need = self.rank * self.shards_per_vector
        if need > self.pool_size + self.private:
            raise ValueError(f"mos: a layer needs rank · shards_per_vector = {need} distinct shards but has only "
                             f"pool_size + private = {self.pool_size + self.private}")

    def lora_config(self, modules) -> LoraConfig:
        target = "^(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"
        return LoraConfig(rank=self.rank, alpha=self.alpha, target=target)


def _group(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def _indices(rng: np.random.Generator, cfg: MosConfig, shared_perm: np.ndarray | None) -> np.ndarray:
    """``[r, l]`` indices into ``[public ; private]``: the private shards first, then public ones, distinct."""
    r, l, n, p = cfg.rank, cfg.shards_per_vector, cfg.pool_size, cfg.private
    need = r * l
    priv = n + np.arange(min(p, need))
    pub = shared_perm if shared_perm is not None else rng.permutation(n)
    idx = np.concatenate([priv, pub[: need - priv.size]])
    return rng.permutation(idx).reshape(r, l) if shared_perm is None else idx.reshape(r, l)


def init_mos(key: jax.Array, params: PyTree, config: MosConfig) -> dict:
    """``{"pools": {group: {"shared": {"A": [n, d_in/l], "B": [n, d_out/l]}, "private": {module: {"A": [p, ..],
    "B": [p, ..]}}}}, "index": {group: {module: {"A": int32[r, l], "B": int32[r, l]}}}}`` for every 2-D kernel
    whose module path matches ``config.target``; a group (``"{d_in}x{d_out}"``) holds the kernels of one shape.
    Only ``mos["pools"]`` is trainable."""
    flat = flatten(params)
    mods = sorted(p[:-7] for p, v in flat.items()
                  if p.endswith("/kernel") and getattr(v, "ndim", 0) == 2 and re.search(config.target, p[:-7]))
    if not mods:
        raise ValueError(f"mos: target={config.target!r} selects no Dense kernel")
    check_finite(params, "params", "mos")
    l, n, p = config.shards_per_vector, config.pool_size, config.private
    rng = np.random.default_rng(config.seed)
    groups, specs, spec_of = {}, [], {}
    for m in mods:
        d_in, d_out = flat[f"{m}/kernel"].shape
        if d_in % l or d_out % l:
            raise ValueError(f"mos: {m!r} kernel [{d_in}, {d_out}] is not divisible into {l} shards per vector")
        g = _group((d_in, d_out))
        if g not in groups:
            groups[g] = (d_in, d_out)
            spec_of[g] = len(specs)
            specs.append(((n, d_in // l), 1.0 / math.sqrt(d_in)))
        if p:
            spec_of[m] = len(specs)
            specs.append(((p, d_in // l), 1.0 / math.sqrt(d_in)))
    arrays = uniform_arrays(key, specs)  # A shards; B shards are zero
    pools, index, shared = {}, {}, {}
    for m in mods:
        d_in, d_out = flat[f"{m}/kernel"].shape
        g = _group((d_in, d_out))
        if g not in pools:
            pools[g] = {"shared": {"A": arrays[spec_of[g]], "B": jnp.zeros((n, d_out // l), jnp.float32)},
                        "private": {}}
            index[g] = {}
            shared[g] = (rng.permutation(n), rng.permutation(n))
        if p:
            pools[g]["private"][m] = {"A": arrays[spec_of[m]], "B": jnp.zeros((p, d_out // l), jnp.float32)}
        ia = _indices(rng, config, None if config.subset_selection else shared[g][0])
        if config.pair_dissociation:
            ib = _indices(rng, config, None if config.subset_selection else shared[g][1])
        else:
            ib = ia
        index[g][m] = {"A": jnp.asarray(ia, jnp.int32), "B": jnp.asarray(ib, jnp.int32)}
    return {"pools": pools, "index": index}


def mos_lora(mos: dict, config: MosConfig) -> tuple[PyTree, LoraConfig]:
    """Assemble every layer's ``lora_A [d_in, r]`` / ``lora_B [r, d_out]`` from its shards (jit-able,
    differentiable w.r.t. ``mos["pools"]``) and the matching :class:`LoraConfig`."""
    pools, index = mos["pools"], mos["index"]
    flat = {}
    for g, layers in index.items():
        shared = pools[g]["shared"]
        for m, idx in layers.items():
            PA, PB = shared["A"], shared["B"]
            priv = pools[g]["private"].get(m)
            if priv is not None:
                PA = jnp.concatenate([PA, priv["A"]], 0)
                PB = jnp.concatenate([PB, priv["B"]], 0)
            r = idx["A"].shape[0]
            flat[f"{m}/lora_A"] = PA[idx["A"]].reshape(r, -1).T  # column i = concat_j P_A[I_A[i, j]]
            flat[f"{m}/lora_B"] = PB[idx["B"]].reshape(r, -1)  # row i = concat_j P_B[I_B[i, j]]
    return unflatten(flat), config.lora_config([m for layers in index.values() for m in layers])


def mos_num_params(mos: dict) -> int:
    """Trainable parameters: every shard of the pools (public and private); the indices are not trained."""
    return int(sum(x.size for x in jax.tree.leaves(mos["pools"])))
