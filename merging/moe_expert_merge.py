"""MC-SMoE expert merging (Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its
Routing Policy"): group the experts of a sparse mixture-of-experts layer by router-logit similarity and merge each
group by usage-frequency-weighted averaging.

Given router logits ``L ∈ R^{T×E}`` collected on data (T tokens, E experts) and expert weights stacked on a leading
expert axis (every leaf ``W`` has shape ``[E, ...]``)::

    usage:      f_e = (1/T) Σ_t 1[e ∈ top-k(L_t)]                           (activation frequency, top-k routing)
    dominant:   D = the ``num_groups`` experts with the largest f_e         (ties: lower index first)
    similarity: sim(e, d) = <L[:, e], L[:, d]> / (‖L[:, e]‖ ‖L[:, d]‖)      (cosine of router-logit columns)
    grouping:   g(d) = d for d ∈ D;  g(e) = argmax_{d ∈ D} sim(e, d) otherwise
    merge:      W̄_g = Σ_{e: g(e)=g} f_e W_e / Σ_{e: g(e)=g} f_e              (uniform if every f_e in the group is 0)

Groups are numbered by their dominant expert's index (ascending). The result holds the merged experts (leaves
``[num_groups, ...]``) and ``group_of_expert`` (``[E]`` int32), so a router can be remapped: token routed to expert
``e`` goes to merged expert ``group_of_expert[e]``. The paper's optional permutation alignment of experts before
merging (weight matching) is not part of this function: align with :mod:`merging.permutation` first if needed.
Computation is in float32; merged leaves keep the input dtype.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import compute_in_float32, flatten
from merging import _common as C

__all__ = ["MoEMerge", "expert_usage", "group_experts", "mc_smoe_merge"]


class MoEMerge(NamedTuple):
    experts: Any  # merged experts, leaves [num_groups, ...]
    group_of_expert: jax.Array  # [E] int32: merged expert index of each original expert
    dominant: jax.Array  # [num_groups] int32: the dominant (center) expert of each group
    frequency: jax.Array  # [E] float32: activation frequency f_e


@functools.partial(jax.jit, static_argnames=("top_k",))
def expert_usage(router_logits: jax.Array, top_k: int = 1) -> jax.Array:
    """``f_e``: fraction of tokens whose top-``top_k`` router logits include expert ``e``."""
    logits = router_logits.astype(jnp.float32)
    _, idx = jax.lax.top_k(logits, top_k)
    hits = jax.nn.one_hot(idx, logits.shape[-1], dtype=jnp.float32).sum(axis=-2)
    return hits.mean(axis=0)


@functools.partial(jax.jit, static_argnames=("num_groups", "top_k"))
def _group(router_logits, *, num_groups, top_k):
    logits = router_logits.astype(jnp.float32)
    e = logits.shape[-1]
    freq = expert_usage(logits, top_k)
    dominant = jnp.sort(jnp.argsort(-freq, stable=True)[:num_groups])
    cols = logits.T
    norm = jnp.sqrt(jnp.sum(cols * cols, axis=1))
    dot = jnp.einsum("et,dt->ed", cols, cols[dominant], precision=jax.lax.Precision.HIGHEST)
    sim = dot / jnp.maximum(norm[:, None] * norm[dominant][None, :], 1e-30)
    group = jnp.argmax(sim, axis=1).astype(jnp.int32)
    is_dom = jnp.zeros((e,), bool).at[dominant].set(True)
    own = jnp.zeros((e,), jnp.int32).at[dominant].set(jnp.arange(num_groups, dtype=jnp.int32))
    group = jnp.where(is_dom, own, group)
    onehot = jax.nn.one_hot(group, num_groups, dtype=jnp.float32).T  # [G, E]
    total = onehot @ freq
    w = onehot * jnp.where(total[:, None] > 0, freq[None, :], 1.0)
    w = w / w.sum(axis=1, keepdims=True)
    return group, dominant.astype(jnp.int32), freq, w


def group_experts(router_logits: Any, num_groups: int, *, top_k: int = 1):
    """``(group_of_expert [E], dominant [G], frequency [E], merge_weights [G, E])`` (see module docstring)."""
    logits = _check_logits(router_logits, num_groups, top_k, None)
    return _group(logits, num_groups=num_groups, top_k=top_k)


@jax.jit
def _merge_leaf(w, x):
    return jnp.tensordot(w, x.astype(jnp.float32), axes=(1, 0), precision=jax.lax.Precision.HIGHEST)


def _check_logits(router_logits, num_groups, top_k, n_experts):
    logits = jnp.asarray(router_logits)
    if logits.ndim != 2:
        raise ValueError(f"mc_smoe_merge: `router_logits` must be [tokens, experts], got shape {logits.shape}")
    t, e = logits.shape
    if n_experts is not None and e != n_experts:
        raise ValueError(f"mc_smoe_merge: router_logits has {e} experts, the expert leaves {n_experts}")
    if t < 1:
        raise ValueError("mc_smoe_merge: `router_logits` has no tokens")
    for name, v in (("num_groups", num_groups), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not (1 <= v <= e):
            raise ValueError(f"mc_smoe_merge: `{name}` must be an int in [1, {e}], got {v!r}")
    if not jnp.issubdtype(logits.dtype, jnp.floating) or not bool(jnp.all(jnp.isfinite(logits))):
        raise ValueError("mc_smoe_merge: `router_logits` must be finite floating values")
    return logits


def mc_smoe_merge(experts: Any, router_logits: Any, num_groups: int, *, top_k: int = 1) -> MoEMerge:
    """Merge the ``E`` stacked experts of ``experts`` (any pytree, every leaf ``[E, ...]``) into ``num_groups`` by
    MC-SMoE (see module docstring); ``router_logits``: ``[tokens, E]`` collected on data, ``top_k``: the layer's
    routing top-k used to count usage."""
    flat = flatten(experts)
    if not flat:
        raise ValueError("mc_smoe_merge: `experts` has no leaves")
    C.check_leaf_dtypes(None, [experts], "mc_smoe_merge")
    sizes = {p: (x.shape[0] if jnp.ndim(x) else None) for p, x in flat.items()}
    n_experts = next(iter(sizes.values()))
    for p, s in sizes.items():
        if s is None or s != n_experts:
            raise ValueError(f"mc_smoe_merge: leaf {p!r} has leading (expert) axis {s}, expected {n_experts} "
                             "like the first leaf")
    logits = _check_logits(router_logits, num_groups, top_k, n_experts)
    group, dominant, freq, w = _group(logits, num_groups=int(num_groups), top_k=int(top_k))

    @compute_in_float32(dtype_from=0)
    def run(experts):
        return jax.tree.map(lambda x: _merge_leaf(w, x), experts)

    return MoEMerge(run(experts), group, dominant, freq)
