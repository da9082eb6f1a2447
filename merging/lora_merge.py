"""Merging LoRA adapters into one adapter, as PEFT's ``LoraModel.add_weighted_adapter`` (peft 0.21) does.

Adapters ``i`` with factors ``A_i [in, r_i]``, ``B_i [r_i, out]`` (weightlab layout, :mod:`jaxmodels.adapters`),
scalings ``s_i`` and weights ``w_i``; the result has scaling 1 (PEFT: ``lora_alpha = r = new rank``):

- ``cat``: ``A = [w_1 s_1 A_1, ..., w_n s_n A_n]`` (along the rank), ``B = [B_1; ...; B_n]``, so ``A B = sum_i
  w_i s_i A_i B_i`` exactly; rank ``sum_i r_i``.
- factor-wise (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``; equal ranks): with
  ``a_i = sign(w_i s_i) sqrt|w_i s_i|`` and ``b_i = sqrt|w_i s_i|``, ``A = merge({A_i}, a)``, ``B = merge({B_i}, b)``
  where ``merge`` is the method applied to the stacked factors (not the product: PEFT's approximation).
- SVD (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): ``Δ = merge({s_i
  A_i B_i}, w)`` then the rank-``svd_rank`` truncated SVD of ``Δᵀ = U S Vᵀ`` (PEFT's ``[out, in]`` layout):
  ``B = (U_r S_r)ᵀ``, ``A = V_r``; ``svd_clamp`` clips both to the ``svd_clamp`` quantile of their entries.

The merge rules (``merge({x_i}, c)``, PEFT's ``merge_utils``; pruning by :mod:`merging.sparsify`)::

    linear:           sum_i c_i x_i
    magnitude_prune:  sum_i c_i top_k(x_i)                           (top_k: the ``density`` fraction of largest |x|)
    dare_linear:      sum_i c_i (m_i ⊙ x_i) / density,  m_i ~ Bernoulli(density)
    ties / dare_ties: p_i = top_k(x_i) (or the DARE drop); σ = sign(sum_i p_i) (0 -> +1; "frequency": sum of signs);
                      sum_i c_i p_i [sign p_i = σ] / max(1, #{i: sign p_i = σ})
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.adapters import LoraConfig, adapter_modules, scaling
from jaxmodels.tree import unflatten
from merging._common import leaf_key
from merging.sparsify import bernoulli, magnitude

__all__ = ["add_weighted_adapter", "COMBINATIONS"]

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat",) + FACTOR_WISE + SVD


def _prune(method: str, x: jax.Array, density: float, key) -> jax.Array:
    if method.startswith("dare"):
        return bernoulli(x, density, key, rescale_norm="inverse_p")
    if method in ("ties", "magnitude_prune"):
        if density <= 0.0:
            return jnp.zeros_like(x)
        return magnitude(x, density)
    return x


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _combine(method: str, xs: Sequence[jax.Array], c, density, sign_method, key) -> jax.Array:
    """One compiled program per (method, shapes): eagerly, the top-k selection compiles op by op."""
    keys = jax.random.split(key, len(xs)) if key is not None else [None] * len(xs)
    p = jnp.stack([_prune(method, jnp.asarray(x, jnp.float32), density, k) for x, k in zip(xs, keys)])
    w = jnp.stack([jnp.asarray(ci, jnp.float32) for ci in c]).reshape((-1,) + (1,) * (p.ndim - 1))
    if method in ("ties", "dare_ties"):
        sign = jnp.sign(p)
        mag = p.sum(0) if sign_method == "total" else sign.sum(0)
        mask = sign == jnp.where(mag >= 0, 1.0, -1.0)
        return (p * w * mask).sum(0) / jnp.maximum(mask.sum(0), 1.0)
    return (p * w).sum(0)


def add_weighted_adapter(adapters: Sequence[Any], configs: Sequence[LoraConfig], weights: Sequence[float],
                         combination_type: str = "svd", *, svd_rank: int | None = None, svd_clamp: float | None = None,
                         density: float | None = None, majority_sign_method: str = "total",
                         key: jax.Array | None = None) -> tuple[Any, LoraConfig]:
    """Merge LoRA adapters (module docstring) -> ``(adapters, config)`` with ``config.rank == config.alpha`` (scale
    1). ``density`` is required by the pruning methods; ``key`` by the DARE ones (unless ``density == 1``)."""
    base = combination_type.removesuffix("_svd") if combination_type != "svd" else "linear"
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    n = len(adapters)
    if n < 1 or len(configs) != n or len(weights) != n:
        raise ValueError(f"add_weighted_adapter: {n} adapters, {len(configs)} configs, {len(weights)} weights")
    if not all(np.isfinite(float(w)) for w in weights):
        raise ValueError(f"add_weighted_adapter: weights must be finite, got {list(weights)}")
    if base not in ("linear", "cat"):
        if density is None or not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"{combination_type} needs density in [0, 1], got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if base.startswith("dare") and float(density) < 1.0 and key is None:
        raise ValueError(f"{combination_type} at density < 1 needs key= (the random drop)")
    if any(c.use_dora for c in configs):
        raise ValueError("add_weighted_adapter: DoRA adapters cannot be merged (PEFT refuses them too)")
    mods = [adapter_modules(a) for a in adapters]
    ranks = [{m: int(v["lora_A"].shape[-1]) for m, v in md.items()} for md in mods]
    all_ranks = sorted({r for rk in ranks for r in rk.values()})
    if combination_type in FACTOR_WISE and len(all_ranks) != 1:
        raise ValueError(f"{combination_type} needs adapters of one rank, got ranks {all_ranks}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive int, got {svd_rank!r}")
    if combination_type == "cat":
        new_rank = sum(max(rk.values()) for rk in ranks)
    elif combination_type in FACTOR_WISE:
        new_rank = all_ranks[0]
    else:
        new_rank = svd_rank or max(all_ranks)
    names = sorted(set().union(*mods))
    out = {}
    for j, m in enumerate(names):
        present = [(i, mods[i][m]) for i in range(n) if m in mods[i]]
        s = [float(weights[i]) * scaling(configs[i], m, ranks[i][m]) for i, _ in present]
        a_list = [jnp.asarray(v["lora_A"], jnp.float32) for _, v in present]
        b_list = [jnp.asarray(v["lora_B"], jnp.float32) for _, v in present]
        if any(b.ndim != 2 for b in b_list):
            raise ValueError(f"add_weighted_adapter: {m!r} is stacked; unstack the layers first")
        k = leaf_key(key, m) if key is not None else None
        if combination_type == "cat":
            a = jnp.concatenate([x * c for x, c in zip(a_list, s)], axis=-1)
            b = jnp.concatenate(b_list, axis=0)
            pad = new_rank - a.shape[-1]  # modules that not every adapter targets: zero-padded like PEFT
            a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
            b = jnp.pad(b, [(0, pad), (0, 0)])
        elif combination_type in FACTOR_WISE:
            ca = [float(np.sign(c) or 1.0) * float(np.sqrt(abs(c))) for c in s]
            cb = [float(np.sqrt(abs(c))) for c in s]
            ka, kb = jax.random.split(k) if k is not None else (None, None)
            a = _combine(base, a_list, ca, density, majority_sign_method, ka)
            b = _combine(base, b_list, cb, density, majority_sign_method, kb)
        else:
            deltas = [jnp.tensordot(x, y, axes=1, precision=jax.lax.Precision.HIGHEST) for x, y in zip(a_list, b_list)]
            c = [float(weights[i]) for i, _ in present]
            scales = [scaling(configs[i], m, ranks[i][m]) for i, _ in present]
            delta = _combine(base, [d * sc for d, sc in zip(deltas, scales)], c, density, majority_sign_method, k)
            lead = delta.shape[:-1]
            dt = delta.reshape(-1, delta.shape[-1]).T  # PEFT's [out, in] (conv: [out, kh*kw*in])
            u, sv, vh = jnp.linalg.svd(dt, full_matrices=False)
            r = min(new_rank, sv.shape[0])
            bt, at = u[:, :r] * sv[:r], vh[:r]
            if svd_clamp is not None:
                hi = jnp.quantile(jnp.concatenate([bt.reshape(-1), at.reshape(-1)]), svd_clamp)
                bt, at = jnp.clip(bt, -hi, hi), jnp.clip(at, -hi, hi)
            a = at.T.reshape(lead + (r,))
            b = bt.T
            if r < new_rank:
                a = jnp.pad(a, [(0, 0)] * len(lead) + [(0, new_rank - r)])
                b = jnp.pad(b, [(0, new_rank - r), (0, 0)])
        dtype = present[0][1]["lora_A"].dtype
        out[f"{m}/lora_A"], out[f"{m}/lora_B"] = a.astype(dtype), b.astype(dtype)
    cfg = LoraConfig(rank=new_rank, alpha=float(new_rank), target=configs[0].target, exclude=configs[0].exclude,
                     dropout=configs[0].dropout, stacked=configs[0].stacked)
    return unflatten(out), cfg
