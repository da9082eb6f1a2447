"""LIFT: Low-rank Informed sparse Fine-Tuning, updating only the Principal Weights, with optimizer state for them only.

Liu et al., "LIFT the Veil for the Truth: Principal Weights Emerge after Rank Reduction for Reasoning-Focused
Supervised Fine-Tuning" (2025), as its reference code (``zihanghliu/LIFT``, ``SparseAdamW.update_masks``)
computes it. For every selected weight matrix ``W [m, n]`` (a kernel viewed as ``[d_in, d_out]``)::

    W_r  = U[:, :r] diag(S[:r]) V[:, :r]ᵀ                  (rank-r SVD approximation, r = ``filter_rank``)
    M    = top-k(|W_r|)                                    (exactly k entries: :func:`jaxmodels.selection.top_k_mask`)
    k    = min((m + n) · rank, m · n)                      (the code's rule: a LoRA of rank ``rank``'s budget)
           or round(density · m · n)                       (the paper's "top 5%": density = 0.05)
    u    = scatter_M(inner(g[M]))                          (zero update outside M)

The inner transform (e.g. ``optax.adamw``) runs on the gathered ``[k]`` vectors only, so its state holds ``k``
entries per matrix, plus ``k`` int32 indices: the memory of a rank-``rank`` LoRA's state. Every ``interval``
steps (the code's ``update_proj_gap``; None = never) the masks are recomputed from the updated weights
``W + u``; the state of an entry that stays in the mask is kept, a newly selected entry starts from zero moments,
the step count is kept (as the code does). Leaves not selected get the ``dense`` transform (None: frozen, zero
update), e.g. a classification head trained densely.

The mask score is pluggable for the paper's baselines: :func:`principal_scores` (LIFT), :func:`magnitude_scores`
(top-k of ``|W|``), :func:`random_scores`. The reference code's inner optimizer is Hugging Face's AdamW (``eps``
added to ``sqrt(v)`` before bias correction); any optax transform can be used here.

API::

    tx = lift(optax.adam(1e-3), LiftConfig(filter_rank=8, rank=4, include=r"kernel$"), dense=optax.adam(1e-3))
    state = tx.init(params); updates, state = tx.update(grads, state, params)   # params are required
    masks = lift_masks(params, state)                                           # {path: bool mask}
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jaxmodels.adapters._papers import as_matrix, check_finite, check_positive_int, check_real, kernel_paths
from jaxmodels.selection import top_k_mask
from jaxmodels.tree import flatten, unflatten

PyTree = Any

__all__ = ["LiftConfig", "LiftState", "principal_scores", "magnitude_scores", "random_scores", "principal_mask",
           "scale_by_lift", "lift", "lift_masks", "lift_k"]


def principal_scores(w: jax.Array, filter_rank: int) -> jax.Array:
    """``|W_r|``: magnitudes of the rank-``filter_rank`` SVD reconstruction of the 2-D ``w`` (float32)."""
    w = w.astype(jnp.float32)
    U, S, Vt = jnp.linalg.svd(w, full_matrices=False)
    r = min(filter_rank, S.shape[0])
    return jnp.abs((U[:, :r] * S[:r]) @ Vt[:r])


def magnitude_scores(w: jax.Array, filter_rank: int = 0) -> jax.Array:
    """``|W|`` (the magnitude-mask baseline)."""
    return jnp.abs(w.astype(jnp.float32))


def random_scores(seed: int = 0) -> Callable:
    """A random mask (the random-mask baseline): uniform scores from a fixed key per matrix shape."""
    def scores(w, filter_rank=0):
        return jax.random.uniform(jax.random.PRNGKey(seed), w.shape)
    return scores


@dataclasses.dataclass(frozen=True)
class LiftConfig:
    """``filter_rank``: ``r`` of the SVD filter. At most one of ``rank`` (k = LoRA-rank budget, the code's rule)
    or ``density`` (k = density · m · n; neither: the paper's 5%). ``interval``: recompute the masks every that many
    steps (None: fixed masks). ``include`` / ``exclude``: path regexes of the sparse-tuned matrices (ndim >= 2)."""

    filter_rank: int = 8
    rank: int | None = None
    density: float | None = None
    interval: int | None = None
    include: str | None = r"kernel$"
    exclude: str | None = None
    score: Callable = principal_scores

    def __post_init__(self):
        check_positive_int(self.filter_rank, "filter_rank", "lift")
        if self.rank is not None and self.density is not None:
            raise ValueError("lift: give at most one of `rank` (LoRA-equivalent budget) or `density`")
        if self.rank is not None:
            check_positive_int(self.rank, "rank", "lift")
        elif self.density is not None:
            check_real(self.density, "density", "lift", lo=0.0, hi=1.0, lo_open=True)
        if self.interval is not None:
            check_positive_int(self.interval, "interval", "lift")


def lift_k(shape, config: LiftConfig) -> int:
    """Entries kept in a matrix of ``shape`` (viewed as ``[prod(shape[:-1]), shape[-1]]``)."""
    m, n = math.prod(shape[:-1]), int(shape[-1])
    if config.rank is not None:
        return min((m + n) * config.rank, m * n)
    density = 0.05 if config.density is None else config.density
    return max(1, min(m * n, int(round(density * m * n))))


def principal_mask(w: jax.Array, config: LiftConfig) -> jax.Array:
    """The boolean mask (``w``'s shape) of the top-k scores (exact k; ties by lowest flat index)."""
    s = config.score(as_matrix(w), config.filter_rank)
    return top_k_mask(s, lift_k(w.shape, config)).reshape(w.shape)


class LiftState(NamedTuple):
    """State of :func:`lift`: ``count`` (int32 step counter), ``indices`` (``{path: int32[k]}``, the sorted flat indices
    of each selected matrix's Principal Weights mask ``M``), ``inner`` (the inner transform's state over the gathered
    ``{path: [k]}`` vectors) and ``dense`` (the ``dense`` transform's state over the other leaves, or
    ``optax.EmptyState``)."""

    count: chex.Array  # int32 step counter
    indices: Any  # {path: int32[k]} sorted flat indices of the masked entries
    inner: Any  # inner state over {path: [k]}
    dense: Any  # dense transform's state over the other leaves (or optax.EmptyState)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _mask_indices(w, score, filter_rank, k):
    mask = top_k_mask(score(as_matrix(w), filter_rank), k)
    return jnp.nonzero(mask.reshape(-1), size=k)[0].astype(jnp.int32)  # ascending flat indices


def _indices_jit(w, config, k):
    return _mask_indices(w, config.score, config.filter_rank, k)


def _indices(w, config, k):
    if isinstance(w, jax.core.Tracer):  # inside the jitted update (mask refresh)
        return _indices_jit(w, config, k)
    # concrete (init): the small SVD on one device, an SVD partitioned over a mesh compiles far slower
    dev = next(iter(w.devices())) if isinstance(w, jax.Array) else None
    idx = _indices_jit(jax.device_put(w, dev) if dev is not None else w, config, k)
    sharding = w.sharding if isinstance(w, jax.Array) and len(w.devices()) > 1 else None
    if sharding is not None:
        idx = jax.device_put(idx, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())) \
            if isinstance(sharding, jax.sharding.NamedSharding) else idx
    return idx


def _remap(tree, keys, old_idx, new_idx, sizes):
    """Move per-entry state from the old mask to the new one: kept entries keep their value, new ones are 0."""
    def is_sel(x):
        return isinstance(x, dict) and set(x.keys()) == keys

    def remap(d):
        out = {}
        for p, v in d.items():
            if getattr(v, "ndim", 0) != 1 or v.shape[0] != old_idx[p].shape[0]:
                out[p] = v
                continue
            dense = jnp.zeros((sizes[p],), v.dtype).at[old_idx[p]].set(v)
            out[p] = dense[new_idx[p]]
        return out

    return jax.tree.map(lambda x: remap(x) if is_sel(x) else x, tree, is_leaf=is_sel)


def scale_by_lift(inner: optax.GradientTransformation, config: LiftConfig,
                  dense: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """Wrap ``inner`` so it only sees (and keeps state for) the principal entries of the selected matrices; the
    other leaves go through ``dense`` (None: zero update). See the module docstring."""
    if not isinstance(config, LiftConfig):
        raise TypeError(f"lift: config must be a LiftConfig, got {type(config).__name__}")

    def split(params):
        paths = kernel_paths(params, config.include, config.exclude, "lift")
        flat = flatten(params)
        return paths, flat, [p for p in flat if p not in paths]

    def init(params):
        check_finite(params, "params", "lift")
        paths, flat, rest = split(params)
        idx = {p: _indices(flat[p], config, lift_k(flat[p].shape, config)) for p in paths}
        sel = {p: flat[p].reshape(-1)[idx[p]] for p in paths}
        d_state = dense.init({p: flat[p] for p in rest}) if dense is not None else optax.EmptyState()
        return LiftState(jnp.zeros((), jnp.int32), idx, inner.init(sel), d_state)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("lift: this transform needs the current params: call update(updates, state, params)")
        paths, flat, rest = split(params)
        g = flatten(updates)
        missing = set(state.indices) ^ set(paths)
        if missing:
            raise ValueError(f"lift: the selected matrices changed since init: {sorted(missing)}")
        idx = state.indices
        g_sel = {p: g[p].reshape(-1)[idx[p]] for p in paths}
        p_sel = {p: flat[p].reshape(-1)[idx[p]] for p in paths}
        u_sel, inner_state = inner.update(g_sel, state.inner, p_sel)
        out = {p: jnp.zeros(flat[p].size, g[p].dtype).at[idx[p]].set(u_sel[p].astype(g[p].dtype))
               .reshape(flat[p].shape) for p in paths}
        if dense is not None:
            u_rest, d_state = dense.update({p: g[p] for p in rest}, state.dense, {p: flat[p] for p in rest})
            out.update(u_rest)
        else:
            d_state = state.dense
            out.update({p: jnp.zeros_like(g[p]) for p in rest})
        count = optax.safe_increment(state.count)
        if config.interval is not None:
            def refresh(args):
                idx, inner_state = args
                new_w = {p: flat[p].astype(jnp.float32) + out[p].astype(jnp.float32) for p in paths}
                new_idx = {p: _indices(new_w[p], config, idx[p].shape[0]) for p in paths}
                sizes = {p: flat[p].size for p in paths}
                return new_idx, _remap(inner_state, set(paths), idx, new_idx, sizes)

            idx, inner_state = jax.lax.cond(count % config.interval == 0, refresh, lambda a: a,
                                            (idx, inner_state))
        return unflatten(out, like=updates), LiftState(count, idx, inner_state, d_state)

    return optax.GradientTransformation(init, update)


def lift(inner: optax.GradientTransformation, config: LiftConfig,
         dense: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """Alias of :func:`scale_by_lift` (the inner transform carries the learning rate, e.g. ``optax.adamw``)."""
    return scale_by_lift(inner, config, dense)


def lift_masks(params: PyTree, state: LiftState) -> dict[str, jax.Array]:
    """The current boolean masks ``{path: mask}`` (the params' shapes) held by a :class:`LiftState`."""
    flat = flatten(params)
    return {p: jnp.zeros(flat[p].size, bool).at[i].set(True).reshape(flat[p].shape)
            for p, i in state.indices.items()}
