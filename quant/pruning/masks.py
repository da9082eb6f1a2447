"""Pruning masks: exact-count selection (unstructured per layer / per output row, N:M along the input dimension),
mask pytrees, and the optax wrapper that keeps pruned weights at zero through training.

Selection. Every rule here keeps the largest scores (``|W|`` for magnitude, ``|W_ij|·‖X_j‖₂`` for Wanda,
``W²/[H⁻¹]_jj`` for SparseGPT) and prunes EXACTLY ``⌊n·s⌋`` of the ``n`` entries of each comparison group
(the references' ``int(n * sparsity)``, Wanda ``prune_wanda``): the whole layer, each output row, or, for the
semi-structured N:M pattern, each run of ``m`` consecutive input features of one output row, of which ``n`` are
pruned (the references' ``prune_n:prune_m``; 2:4 and 4:8 prune half of every group, the pattern sparse tensor
cores run). Groups are taken in the references' ``W[out, in]`` layout (a Flax kernel ``[in, out]`` transposed), and
among tied scores the LOWEST index of that row-major order is pruned first (the order of a stable ascending sort,
Wanda's ``torch.sort(W_metric, dim=-1, stable=True)``): the kept entries are ``jaxmodels.selection.top_k_mask(score,
n − ⌊n·s⌋, ties="last")``, exact and sharding-safe::

    keep = top_k_mask(score_g, |g| − ⌊|g|·s⌋, ties="last")   for every group g        (unstructured)
    keep = rank_g >= n,  rank_j = #{k ∈ g : s_k < s_j or (s_k = s_j and k < j)}   for every m-run g (N:M)

(the rank by pairwise comparison is the same stable order, O(m²) for groups of at most 64 entries: it compiles ~3x
cheaper and runs ~10x faster than ``lax.top_k`` on 2:4 runs; longer rows use ``top_k_mask`` per row, and a
whole-layer group ``top_k_mask`` with ``lax.top_k`` up to 2^15 entries, the radix select above). Each selection is
one compiled program per (grouped shape, kept count) — :data:`select_groups`, shared by every layer shape and method
with the same groups — between the method's score (per layer shape) and the masking (:func:`select_keep`).

Masks. A mask pytree has the structure of ``params``: a bool array (True = kept) at every pruned kernel and
``None`` at every other leaf. :func:`apply_masks` zeroes the pruned entries, :func:`mask_sparsity` counts them,
:func:`masked` wraps an optax transformation so that the pruned weights stay zero through training (their updates
are replaced by ``−w``, so ``w + u = 0`` even if they were not zero, and their gradients are zeroed before the inner
transformation, so its moments for them stay zero).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.selection import top_k_mask
from jaxmodels.tree import flatten, unflatten

__all__ = ["parse_nm", "check_sparsity", "num_pruned", "prune_mask", "apply_masks", "mask_sparsity", "masked",
           "MaskedState", "masks_from_layers", "pruning_report", "check_layer_shapes", "pattern_name", "layer_record",
           "keep_mask_oi", "select_keep", "select_groups", "nm_keep"]

PyTree = Any
GROUPS = ("layer", "row")


# ------------------------------------------------------------------------------------------------ config checks

def check_sparsity(sparsity) -> float:
    """``sparsity`` as a float, rejected unless it is a number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.integer, np.floating)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def parse_nm(nm) -> tuple[int, int] | None:
    """``None`` (unstructured), ``"n:m"`` or ``(n, m)``: ``n`` of every ``m`` consecutive input weights of an
    output row are pruned; needs ``1 <= n < m``."""
    if nm is None:
        return None
    if isinstance(nm, str):
        parts = nm.split(":")
        if len(parts) != 2:
            raise ValueError(f"nm must be 'n:m' (e.g. '2:4'), got {nm!r}")
        try:
            nm = (int(parts[0]), int(parts[1]))
        except ValueError:
            raise ValueError(f"nm must be 'n:m' with integers n and m, got {nm!r}") from None
    if (not isinstance(nm, (tuple, list)) or len(nm) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in nm)):
        raise ValueError(f"nm must be None, 'n:m' or a pair of integers (n, m), got {nm!r}")
    n, m = int(nm[0]), int(nm[1])
    if not 1 <= n < m:
        raise ValueError(f"nm = {n}:{m}: need 1 <= n < m (n of every m consecutive input weights are pruned)")
    return n, m


def pattern_name(nm) -> str:
    """``"unstructured"`` or ``"n:m"``."""
    p = parse_nm(nm)
    return "unstructured" if p is None else f"{p[0]}:{p[1]}"


def num_pruned(n: int, sparsity: float) -> int:
    """The references' count of pruned entries among ``n``: ``int(n * sparsity)`` (⌊n·s⌋)."""
    return int(int(n) * float(sparsity))


def check_layer_shapes(shapes: dict[str, tuple], nm, extra_multiple: int | None = None, where: str = "pruning"):
    """Every target kernel must be 2-D ``[in, out]``; with N:M its ``in`` must be a multiple of ``m`` (checked for
    every layer before any work)."""
    p = parse_nm(nm)
    if not shapes:
        raise ValueError(f"{where}: no 2-D kernel to prune")
    for path, shp in shapes.items():
        if len(shp) != 2:
            raise ValueError(f"{where}: {path} has shape {tuple(shp)}; only 2-D kernels [in, out] are pruned")
        if p is not None and shp[0] % p[1]:
            raise ValueError(f"{where}: {path} has {shp[0]} input features, not a multiple of m={p[1]} "
                             f"(N:M groups run along the input dimension)")


# ------------------------------------------------------------------------------------------------ selection

def _keep_rows(s: jax.Array, keep: int) -> jax.Array:
    """Exactly ``keep`` True per row of ``s[rows, n]`` (largest scores; ties: the lowest index is pruned)."""
    return jax.vmap(lambda r: top_k_mask(r, keep, ties="last"))(s)


def _selection_shape(R: int, C: int, sparsity: float, nm, group: str) -> tuple[tuple[int, ...], int]:
    """How ``score[out=R, in=C]`` is grouped: ``(shape of the score array the selection sees, kept per row of
    it)``; a 1-D shape is one group (the whole layer)."""
    p = parse_nm(nm)
    if p is not None:
        n, m = p
        return (R * (C // m), m), m - n
    if group == "row":
        return (R, C), C - num_pruned(C, sparsity)
    if group == "layer":
        return (R * C,), R * C - num_pruned(R * C, sparsity)
    raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


NM_PAIRWISE_MAX_M = 64


def nm_keep(score: jax.Array, n: int) -> jax.Array:
    """Kept mask of ``score[..., m]``: the ``n`` smallest of every row of ``m`` pruned, ties lowest index first.
    For ``m <= 64`` by the pairwise rank ``r_j = #{k : s_k < s_j or (s_k = s_j and k < j)}`` (keep ``r_j >= n``:
    exactly the order of a stable ascending sort, O(m²) compares, ~3x cheaper to compile and ~10x faster than
    ``lax.top_k`` on 2:4 runs; ``n`` may be traced); above, :func:`jaxmodels.selection.top_k_mask` per run."""
    m = score.shape[-1]
    static = isinstance(n, (int, np.integer))
    if static and n == 0:
        return jnp.ones(score.shape, bool)
    if m > NM_PAIRWISE_MAX_M:
        if not static:
            raise ValueError(f"nm_keep: rows of {m} > {NM_PAIRWISE_MAX_M} entries need a static n")
        return _keep_rows(score.reshape(-1, m), m - n).reshape(score.shape)
    i = jnp.arange(m)
    a, b = score[..., None, :], score[..., :, None]  # [..., j, k]: s_k vs s_j
    before = (a < b) | ((a == b) & (i[None, :] < i[:, None]))
    return jnp.sum(before, axis=-1) >= n


# one group of up to 2^15 entries: lax.top_k (compiles ~5x cheaper than the radix select, runs in ~20 ms on a CPU);
# above, jaxmodels.selection's radix select (its own default switches at 2^14)
RADIX_MIN_N = 1 << 15


def _select(score: jax.Array, keep: int) -> jax.Array:
    """Kept mask (flattened row-major) of a grouped score: 1-D = one group, 2-D = one group per row (exactly
    ``keep`` kept per group)."""
    if score.ndim == 1:
        return top_k_mask(score, keep, ties="last", radix=score.shape[0] > RADIX_MIN_N)
    return nm_keep(score, score.shape[-1] - keep).reshape(-1)


# one compiled selection per (grouped shape, kept count), shared by every method and layer shape that needs it
select_groups = jax.jit(_select, static_argnums=1)


def keep_mask_oi(score: jax.Array, sparsity: float, nm=None, group: str = "layer") -> jax.Array:
    """The kept-entries mask of ``score[out, in]`` (the references' layout; see the module docstring)."""
    R, C = score.shape
    shape, keep = _selection_shape(R, C, sparsity, nm, group)
    return _select(jnp.asarray(score, jnp.float32).reshape(shape), keep).reshape(R, C)


def select_keep(score_fn, w, *args, sparsity: float, nm, group: str):
    """``(w with the pruned entries zeroed, kept mask [in, out])`` for kernel ``w`` and ``score_fn(w, *args) ->
    score[out, in]``, in three compiled steps: the grouped score (per layer shape), the selection
    (:data:`select_groups`, per grouped shape: shared by the layers and methods with the same group sizes) and the
    mask applied in the kernel layout."""
    C, R = w.shape
    shape, keep = _selection_shape(R, C, sparsity, nm, group)
    s = _grouped_score(score_fn, w, args, shape)
    return _apply_grouped(w, select_groups(s, keep))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _grouped_score(score_fn, w, args, shape):
    return jnp.asarray(score_fn(w, *args), jnp.float32).reshape(shape)


@jax.jit
def _apply_grouped(w, keep):
    keep = keep.reshape(w.shape[1], w.shape[0]).T
    return jnp.where(keep, w, jnp.zeros((), w.dtype)), keep


def prune_mask(score: jax.Array, sparsity: float = 0.5, nm=None, group: str = "layer") -> jax.Array:
    """Kept-entries mask (bool, True = kept) of a non-negative ``score`` in the Flax kernel layout ``[in, out]``:
    ``⌊n·s⌋`` pruned per ``group`` (``"layer"``: the whole matrix, ``"row"``: each output = each kernel column), or
    ``n`` of every ``m`` consecutive inputs per output with ``nm=(n, m)`` / ``"n:m"`` (``group`` then unused).
    Ties: the lowest index in ``W[out, in]`` row-major order is pruned first. Jit-able (``sparsity``, ``nm``,
    ``group`` static)."""
    check_sparsity(sparsity)
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    check_layer_shapes({"score": tuple(np.shape(score))}, nm, where="prune_mask")
    return keep_mask_oi(jnp.asarray(score).T, sparsity, nm, group).T


# ------------------------------------------------------------------------------------------------ mask pytrees

def _is_none(x) -> bool:
    return x is None


def _check_masks(masks: PyTree, tree: PyTree, where: str) -> None:
    fm = flatten(masks) if masks is not None else {}
    ft = flatten(tree)
    for path, m in fm.items():
        if path not in ft:
            raise ValueError(f"{where}: mask path {path!r} is not a leaf of the params")
        if tuple(np.shape(m)) != tuple(np.shape(ft[path])):
            raise ValueError(f"{where}: mask {path!r} has shape {tuple(np.shape(m))}, the leaf "
                             f"{tuple(np.shape(ft[path]))}")
        if np.dtype(getattr(m, "dtype", np.asarray(m).dtype)) != np.bool_:
            raise ValueError(f"{where}: mask {path!r} must be a bool array, got {getattr(m, 'dtype', type(m))}")
    try:  # the structures must agree too (None at the unpruned leaves)
        jax.tree_util.tree_map(lambda m, t: None, masks, tree, is_leaf=_is_none)
    except ValueError as e:
        raise ValueError(f"{where}: the mask tree does not have the params' structure ({e})") from None


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``params`` with every pruned entry (``mask == False``) set to 0; leaves whose mask is ``None`` unchanged.
    ``params`` is not modified."""
    _check_masks(masks, params, "apply_masks")
    return jax.tree_util.tree_map(lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)),
                                  masks, params, is_leaf=_is_none)


def mask_sparsity(masks: PyTree) -> float:
    """Fraction of pruned entries over all mask arrays (``None`` leaves are not counted)."""
    leaves = jax.tree_util.tree_leaves(masks)
    total = sum(int(np.size(m)) for m in leaves)
    if total == 0:
        raise ValueError("mask_sparsity: the mask tree has no mask arrays")
    return 1.0 - sum(int(np.count_nonzero(np.asarray(m))) for m in leaves) / total


def masks_from_layers(params: PyTree, layers: dict) -> PyTree:
    """The mask pytree of ``params``' structure from a report's ``{kernel_path: record}`` (each with ``mask``)."""
    flat = flatten(params)
    missing = [p for p in layers if p not in flat]
    if missing:
        raise ValueError(f"masks_from_layers: {missing[0]!r} is not a leaf of the params")
    return unflatten({p: (layers[p]["mask"] if p in layers else None) for p in flat}, like=params)


def pruning_report(method: str, config, layers: dict, params: PyTree, **extra) -> dict:
    """``{"method", "config", "layers": {kernel_path: record}, "masks": mask pytree, "sparsity": overall}``; every
    record has ``weight`` (the pruned kernel the returned params hold), ``mask`` (bool ``[in, out]``, True = kept),
    ``n_pruned``, ``sparsity`` (pruned fraction of that layer), ``pattern`` and, with calibration data, ``error``."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else config
    n = sum(int(np.size(r["mask"])) for r in layers.values())
    pruned = sum(int(r["n_pruned"]) for r in layers.values())
    return {"method": method, "config": cfg, "layers": layers, "masks": masks_from_layers(params, layers),
            "sparsity": pruned / max(n, 1), **extra}


def layer_record(w_hat, keep, nm, **extra) -> dict:
    """The per-layer record: ``weight``, ``mask``, ``n_pruned``, ``sparsity`` (pruned fraction), ``pattern`` and
    ``extra`` (the count is taken on the host: no per-shape compiled reduction)."""
    n_pruned = int(np.size(keep)) - int(np.count_nonzero(np.asarray(keep)))
    return {"weight": w_hat, "mask": keep, "n_pruned": n_pruned, "sparsity": n_pruned / max(int(np.size(keep)), 1),
            "pattern": pattern_name(nm), **extra}


# ------------------------------------------------------------------------------------------------ optax wrapper

class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner transformation's state."""

    inner: Any


def masked(tx: optax.GradientTransformation, masks: PyTree) -> optax.GradientTransformation:
    """Keep a pruned model sparse through training: ``tx`` sees gradients with the pruned entries zeroed
    (``g ⊙ M``), and its updates are replaced at the pruned entries by ``−w`` (``u' = M ⊙ u − (1 − M) ⊙ w``, or
    ``M ⊙ u`` when ``update`` gets no params), so every pruned weight is 0 after each step. ``masks``: a mask pytree
    (bool arrays at the pruned leaves, ``None`` elsewhere; e.g. a pruning report's ``"masks"``). Unlike
    ``optax.masked`` (which selects whole leaves), this masks entries inside leaves."""

    def _zero(tree):
        return jax.tree_util.tree_map(lambda m, g: g if m is None or g is None else jnp.where(m, g, 0).astype(g.dtype),
                                      masks, tree, is_leaf=_is_none)

    def init(params):
        _check_masks(masks, params, "masked")
        return MaskedState(tx.init(params))

    def update(updates, state, params=None):
        u, inner = tx.update(_zero(updates), state.inner, params)
        if params is None:
            return _zero(u), MaskedState(inner)
        u = jax.tree_util.tree_map(
            lambda m, a, p: a if m is None else jnp.where(m, a, -p.astype(a.dtype)).astype(a.dtype),
            masks, u, params, is_leaf=_is_none)
        return u, MaskedState(inner)

    return optax.GradientTransformation(init, update)
