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
``e`` goes to merged expert ``group_of_expert[e]``.

Permutation alignment (the paper's step before merging, needed when experts were initialized independently): an
expert's hidden units can be permuted without changing its function, so before averaging, every non-dominant expert
``e`` is permuted to best match its group's dominant expert ``d`` by weight matching (Ainsworth et al. 2023,
Algorithm 1; :func:`merging.permutation.weight_matching`)::

    π_e = argmax_π Σ_ℓ ⟨W_ℓ^d, π(W_ℓ^e)⟩,      W_e ← π_e(W_e)

``align_spec`` (a :class:`~merging.permutation.PermutationSpec` over ONE expert's leaves, without the expert axis)
turns it on in :func:`mc_smoe_merge`; :func:`align_experts` and :func:`merge_expert_groups` are the two steps on
their own (e.g. to merge other groupings or weights the same way). Computation is in float32; merged leaves keep
the input dtype.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import compute_in_float32, flatten, unflatten
from merging import _common as C
from merging.permutation import PermutationSpec, apply_permutation, weight_matching

__all__ = ["MoEMerge", "expert_usage", "group_experts", "align_experts", "merge_expert_groups", "mc_smoe_merge"]


class MoEMerge(NamedTuple):
    """The result of :func:`mc_smoe_merge`: ``experts`` (the merged experts, leaves ``[num_groups, ...]``),
    ``group_of_expert`` (``[E]`` int32, the merged expert of each original expert, to remap the router),
    ``dominant`` (``[num_groups]`` int32, each group's dominant expert) and ``frequency`` (``[E]`` float32, the
    activation frequencies ``f_e``)."""

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
    return group, dominant.astype(jnp.int32), freq, _group_matrix(group, freq, num_groups)


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


def _check_experts(experts: Any, method: str, check_finite: bool = False) -> tuple[dict, int]:
    flat = flatten(experts)
    if not flat:
        raise ValueError(f"{method}: `experts` has no leaves")
    C.check_leaf_dtypes(None, [experts], method)
    if check_finite:
        C.check_all_finite([experts], ["experts"], method)
    sizes = {p: (x.shape[0] if jnp.ndim(x) else None) for p, x in flat.items()}
    n_experts = next(iter(sizes.values()))
    for p, s in sizes.items():
        if s is None or s != n_experts:
            raise ValueError(f"{method}: leaf {p!r} has leading (expert) axis {s}, expected {n_experts} "
                             "like the first leaf")
    return flat, n_experts


def _check_groups(group_of_expert: Any, n_experts: int, method: str) -> np.ndarray:
    g = np.asarray(group_of_expert)
    if g.shape != (n_experts,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"{method}: `group_of_expert` must be {n_experts} integers, got shape {g.shape} "
                         f"dtype {g.dtype}")
    if g.min() < 0 or set(np.unique(g)) != set(range(int(g.max()) + 1)):
        raise ValueError(f"{method}: groups must be numbered 0..G-1 with no empty group, got {g.tolist()}")
    return g


def _check_spec(spec: Any, one_expert: dict, method: str) -> None:
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"{method}: `align_spec` must be a merging.permutation.PermutationSpec, got "
                        f"{type(spec).__name__}")
    for path, axes in spec.axes_to_perm.items():
        if path not in one_expert:
            raise ValueError(f"{method}: align_spec names {path!r}, not a leaf of the experts "
                             f"(leaves: {sorted(one_expert)})")
        if len(axes) != np.ndim(one_expert[path]):
            raise ValueError(f"{method}: align_spec gives {len(axes)} axes for {path!r}, whose per-expert shape is "
                             f"{np.shape(one_expert[path])} (the spec describes one expert, without the expert axis)")


def align_experts(experts: Any, group_of_expert: Any, dominant: Any, align_spec: PermutationSpec, *,
                  max_iter: int = 100) -> Any:
    """Permute every non-dominant expert ``e`` onto its group's dominant expert ``dominant[group_of_expert[e]]``
    by weight matching (see module docstring). ``experts``: leaves ``[E, ...]``; ``align_spec``: permutations of
    ONE expert's leaves (paths as in ``experts``, axes without the expert axis). Each expert computes exactly the same
    function afterwards (only its hidden units are re-indexed); dominant experts are returned unchanged."""
    flat, n_experts = _check_experts(experts, "align_experts")
    groups = _check_groups(group_of_expert, n_experts, "align_experts")
    dom = np.asarray(dominant)
    if dom.shape != (int(groups.max()) + 1,) or not np.all((dom >= 0) & (dom < n_experts)) or \
            not np.array_equal(groups[dom], np.arange(len(dom))):
        raise ValueError(f"align_experts: `dominant` must hold, for each group g, an expert of group g; got "
                         f"{dom.tolist()} for groups {groups.tolist()}")
    if max_iter < 1:
        raise ValueError(f"align_experts: max_iter must be >= 1, got {max_iter}")

    def expert(e):
        return {p: x[e] for p, x in flat.items()}

    _check_spec(align_spec, expert(0), "align_experts")
    rows = []
    for e in range(n_experts):
        d = int(dom[groups[e]])
        if e == d:
            rows.append(expert(e))
            continue
        perm = weight_matching(unflatten(expert(d), like=experts), unflatten(expert(e), like=experts), align_spec,
                               max_iter=max_iter, progress=False)
        rows.append(flatten(apply_permutation(unflatten(expert(e), like=experts), align_spec, perm)))
    return unflatten({p: jnp.stack([r[p] for r in rows]) for p in flat}, like=experts)


def merge_expert_groups(experts: Any, group_of_expert: Any, weights: Any, *, check_finite: bool = True) -> Any:
    """``W̄_g = Σ_{e: g(e)=g} w_e W_e / Σ_{e: g(e)=g} w_e`` for each group ``g`` (uniform within a group whose
    weights sum to 0); ``weights``: ``[E]`` non-negative (MC-SMoE: the usage frequencies; all ones: the plain
    average). Returns leaves ``[G, ...]``, each in its own input dtype (computed in float32). NaN/Inf experts are
    rejected (``check_finite``; skipped for traced inputs)."""
    _, n_experts = _check_experts(experts, "merge_expert_groups", check_finite)
    groups = _check_groups(group_of_expert, n_experts, "merge_expert_groups")
    w = np.asarray(weights, np.float64)
    if w.shape != (n_experts,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"merge_expert_groups: `weights` must be {n_experts} finite non-negative numbers, got {w}")
    return _merge(experts, _group_matrix(jnp.asarray(groups, jnp.int32), jnp.asarray(w, jnp.float32),
                                         int(groups.max()) + 1))


@functools.partial(jax.jit, static_argnames=("num_groups",))
def _group_matrix(group, weights, num_groups):
    onehot = jax.nn.one_hot(group, num_groups, dtype=jnp.float32).T  # [G, E]
    total = onehot @ weights
    w = onehot * jnp.where(total[:, None] > 0, weights[None, :], 1.0)
    return w / w.sum(axis=1, keepdims=True)


def _merge(experts, w):
    @compute_in_float32(dtype_from=0)
    def run(experts):
        return jax.tree.map(lambda x: _merge_leaf(w, x), experts)

    return run(experts)


def mc_smoe_merge(experts: Any, router_logits: Any, num_groups: int, *, top_k: int = 1,
                  align_spec: PermutationSpec | None = None, check_finite: bool = True) -> MoEMerge:
    """Merge the ``E`` stacked experts of ``experts`` (any pytree, every leaf ``[E, ...]``) into ``num_groups`` by
    MC-SMoE (see module docstring); ``router_logits``: ``[tokens, E]`` collected on data, ``top_k``: the layer's
    routing top-k used to count usage; ``align_spec``: align each expert to its group's dominant expert first
    (weight matching over this per-expert :class:`~merging.permutation.PermutationSpec`). NaN/Inf experts are
    rejected (``check_finite``; skipped for traced inputs)."""
    flat, n_experts = _check_experts(experts, "mc_smoe_merge", check_finite)
    logits = _check_logits(router_logits, num_groups, top_k, n_experts)
    if align_spec is not None:
        _check_spec(align_spec, {p: x[0] for p, x in flat.items()}, "mc_smoe_merge")
    group, dominant, freq, w = _group(logits, num_groups=int(num_groups), top_k=int(top_k))
    if align_spec is not None:
        experts = align_experts(experts, group, dominant, align_spec)
    return MoEMerge(_merge(experts, w), group, dominant, freq)
