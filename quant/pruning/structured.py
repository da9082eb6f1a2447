"""Structured (channel / filter) pruning: filter-norm importance, channel masking and removal (conv + BatchNorm + the
next layer's input channels) and performance-aware global channel pruning (PAGCP).

Channel groups. A :class:`ChannelGroup` names the leaves of a pytree (e.g. ``{"params", "batch_stats"}`` of a linen
CNN) that one set of ``C`` channels indexes: ``producers`` along their LAST axis (a conv kernel ``[kh, kw, in, C]``
or Dense ``[in, C]``, its bias, the following BatchNorm's scale / bias / mean / var) and ``consumers`` along axis
``-2`` (the next conv / Dense kernels' input channels). :func:`mask_channels` zeroes the pruned channels in all of
them (with BN scale and bias zero the channel's output is exactly 0, so the masked model computes what the model
with the channels removed computes); :func:`remove_channels` slices them out. Importance is the filter norm of the
first producer (Li et al., 2017, "Pruning Filters for Efficient ConvNets": ``s_c = Σ |W[..., c]|``, or the L2 norm)::

    s_c = ‖W[..., c]‖_p   (p = 1 or 2),    keep = the ⌈C − ⌊r·C⌋⌉ largest s_c (at least one channel kept)

FLOPs (:func:`count_flops`) are multiply-accumulates of the ACTIVE channels: ``Σ_l positions_l · kh·kw ·
#{nonzero input channels} · #{nonzero output filters}`` per kernel, so masked and removed models count the same.

k-level group sparsity (WGSEF): :mod:`quant.pruning.k_level`, on the same channel groups.

PAGCP (Ye et al., 2023, "Performance-aware Approximation of Global Channel Pruning for Multitask CNNs"; reference
HankYe/PAGCP ``prune/sensitivity.py``). Layers are sorted by the FLOPs that pruning 30% of their filters removes
(largest first), then pruned SEQUENTIALLY, each on top of the previous ones: for ratios ``r_1 < r_2 < ...`` the layer
is pruned (filter norms of the current, already pruned model) until some task loss exceeds ``(1 + δ_i)`` times the
current base loss; the last ratio below the threshold is kept, the base becomes the accepted loss and the threshold
shrinks, ``δ_{i+1} = λ δ_i``, with ``λ`` solving ``Π_{i<L} (1 + δ_0 λ^i) = 1 + total`` (the reference's
``ratio_compute``), so the final loss is at most ``(1 + total)`` times the unpruned loss. Unlike the reference a
layer that never crosses the threshold keeps the largest ratio, and its final top-k layer filter is not reproduced.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.progress import progress_bar
from jaxmodels.tree import flatten, is_concrete, unflatten

__all__ = ["ChannelGroup", "filter_norms", "keep_mask", "mask_channels", "mask_groups", "remove_channels",
           "count_flops", "resnet_channel_groups", "sequential_channel_groups", "uniform_prune",
           "PAGCPConfig", "PAGCPResult", "pagcp", "pagcp_decay"]

PyTree = Any


class ChannelGroup(NamedTuple):
    """One set of channels: ``producers`` indexed on their last axis (the first one is the kernel whose filter norms
    rank the channels), ``consumers`` on axis -2 (the next kernels' input channels); ``name`` for reports."""

    producers: tuple[str, ...]
    consumers: tuple[str, ...] = ()
    name: str = ""


def _check_groups(flat: dict, groups: Sequence[ChannelGroup], where: str) -> list[int]:
    if isinstance(groups, ChannelGroup) or not len(groups):
        raise ValueError(f"{where}: groups must be a non-empty sequence of ChannelGroup")
    sizes = []
    for g in groups:
        if not isinstance(g, ChannelGroup) or not g.producers:
            raise ValueError(f"{where}: every group must be a ChannelGroup with at least one producer, got {g!r}")
        for p in (*g.producers, *g.consumers):
            if p not in flat:
                raise ValueError(f"{where}: group {g.name or g.producers[0]!r} names {p!r}, not a leaf of the tree")
        c = flat[g.producers[0]].shape[-1]
        for p in g.producers:
            if flat[p].shape[-1] != c:
                raise ValueError(f"{where}: producer {p!r} has {flat[p].shape[-1]} channels on its last axis, "
                                 f"{g.producers[0]!r} has {c}")
        for p in g.consumers:
            if flat[p].ndim < 2 or flat[p].shape[-2] != c:
                raise ValueError(f"{where}: consumer {p!r} (shape {flat[p].shape}) needs {c} input channels on "
                                 "axis -2")
        sizes.append(c)
    return sizes


def filter_norms(tree: PyTree, group: ChannelGroup, ord: int = 1) -> jax.Array:
    """``s_c = ‖W[..., c]‖_ord`` of the group's first producer ``W`` (float32 ``[C]``).

    >>> s = filter_norms(variables, ChannelGroup(("params/conv0/kernel",)), ord=1)
    """
    if ord not in (1, 2):
        raise ValueError(f"filter_norms: ord must be 1 or 2, got {ord!r}")
    flat = flatten(tree)
    _check_groups(flat, [group], "filter_norms")
    w = jnp.asarray(flat[group.producers[0]], jnp.float32)
    w = w.reshape(-1, w.shape[-1])
    return jnp.abs(w).sum(0) if ord == 1 else jnp.sqrt((w * w).sum(0))


def keep_mask(scores, ratio: float) -> np.ndarray:
    """Bool ``[C]`` (NumPy; ``scores`` concrete): the ``C − ⌊ratio·C⌋`` largest scores kept (at least 1; ties: the
    lower index kept).

    >>> keep_mask(jnp.array([3., 1., 2., 0.]), 0.5)      # [True, False, True, False]
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"keep_mask: ratio must be a number in [0, 1), got {ratio!r}")
    if not is_concrete(scores):
        raise ValueError("keep_mask: scores must be concrete (the kept count is static)")
    scores = np.asarray(jax.device_get(scores), np.float32)
    if scores.ndim != 1 or not len(scores) or not np.isfinite(scores).all():
        raise ValueError(f"keep_mask: scores must be a finite non-empty vector, got shape {scores.shape}")
    c = scores.shape[0]
    n_keep = max(1, c - int(np.floor(ratio * c + 1e-9)))
    keep = np.zeros(c, bool)
    keep[np.argsort(-scores, kind="stable")[:n_keep]] = True
    return keep


def _mask_flat(flat: dict, group: ChannelGroup, keep) -> None:
    keep = jnp.asarray(keep, bool)
    for p in group.producers:
        flat[p] = jnp.where(keep, flat[p], jnp.zeros((), flat[p].dtype))
    for p in group.consumers:
        flat[p] = jnp.where(keep[:, None], flat[p], jnp.zeros((), flat[p].dtype))


def mask_channels(tree: PyTree, group: ChannelGroup, keep) -> PyTree:
    """Zero the channels ``~keep`` of every producer (last axis) and consumer (axis -2); other leaves untouched.

    >>> masked = mask_channels(variables, group, keep_mask(filter_norms(variables, group), 0.5))
    """
    return mask_groups(tree, [group], [keep])


def mask_groups(tree: PyTree, groups: Sequence[ChannelGroup], keeps: Sequence) -> PyTree:
    """:func:`mask_channels` for several groups at once (one ``keep [C]`` per group; jit-able, groups static).

    >>> masked = jax.jit(mask_groups, static_argnums=1)(variables, tuple(groups), keeps)
    """
    flat = dict(flatten(tree))
    sizes = _check_groups(flat, groups, "mask_groups")
    if len(keeps) != len(groups):
        raise ValueError(f"mask_groups: {len(keeps)} keep masks for {len(groups)} groups")
    for g, keep, c in zip(groups, keeps, sizes):
        if tuple(np.shape(keep)) != (c,):
            raise ValueError(f"mask_groups: keep has shape {tuple(np.shape(keep))}, the group has {c} channels")
        _mask_flat(flat, g, keep)
    return unflatten(flat, like=tree)


def remove_channels(tree: PyTree, group: ChannelGroup, keep) -> PyTree:
    """Slice the kept channels out of producers and consumers (``keep``: concrete bool mask or index list).

    >>> small = remove_channels(variables, group, np.array([0, 2, 5]))
    """
    flat = dict(flatten(tree))
    (c,) = _check_groups(flat, [group], "remove_channels")
    if not is_concrete(keep):
        raise ValueError("remove_channels: keep must be concrete (the result's shapes depend on it)")
    keep = np.asarray(keep)
    idx = np.flatnonzero(keep) if keep.dtype == bool else np.unique(keep.astype(np.int64))
    if (keep.dtype == bool and keep.shape != (c,)) or not len(idx) or idx.min() < 0 or idx.max() >= c:
        raise ValueError(f"remove_channels: keep must select at least one of the group's {c} channels")
    idx = jnp.asarray(idx, jnp.int32)
    for p in group.producers:
        flat[p] = jnp.take(flat[p], idx, axis=-1)
    for p in group.consumers:
        flat[p] = jnp.take(flat[p], idx, axis=-2)
    return unflatten(flat, like=tree)


def count_flops(tree: PyTree, positions: dict[str, int]) -> float:
    """Multiply-accumulates of the active channels: ``Σ positions[p] · kh·kw · #nonzero-in · #nonzero-out`` over
    the kernels named in ``positions`` (output spatial positions per kernel path; 1 for a Dense).

    >>> count_flops(variables, {"params/conv0/kernel": 64, "params/head/kernel": 1})
    """
    flat = flatten(tree)
    total = 0.0
    for p, pos in positions.items():
        if p not in flat or flat[p].ndim < 2:
            raise ValueError(f"count_flops: {p!r} is not a kernel (ndim >= 2) of the tree")
        w = np.asarray(flat[p], np.float32)
        w = w.reshape(-1, w.shape[-2], w.shape[-1])
        nz = np.abs(w).sum(0) > 0
        total += float(pos) * w.shape[0] * int(nz.any(1).sum()) * int(nz.any(0).sum())
    return total


def sequential_channel_groups(convs: Sequence[str], norms: Sequence[str | None], head: str,
                              params: str = "params", stats: str | None = "batch_stats") -> list[ChannelGroup]:
    """Groups of a plain conv -> BN chain (``DomainCNN(norm="bn")``: ``conv{k}``, ``bn{k}``, ``head``): the output
    channels of ``convs[i]`` (+ its bias, BN ``norms[i]``) are the input channels of ``convs[i+1]`` (or ``head``).

    >>> groups = sequential_channel_groups(["conv0", "conv1"], ["bn0", "bn1"], "head")
    """
    if len(convs) != len(norms) or not len(convs):
        raise ValueError("sequential_channel_groups: convs and norms must be non-empty and of equal length")
    out = []
    for i, (c, n) in enumerate(zip(convs, norms)):
        prod = [f"{params}/{c}/kernel"]
        if n is not None:
            prod += [f"{params}/{n}/scale", f"{params}/{n}/bias"]
            if stats is not None:
                prod += [f"{stats}/{n}/mean", f"{stats}/{n}/var"]
        nxt = convs[i + 1] if i + 1 < len(convs) else head
        out.append(ChannelGroup(tuple(prod), (f"{params}/{nxt}/kernel",), c))
    return out


def resnet_channel_groups(variables: PyTree) -> list[ChannelGroup]:
    """The block-internal channels of :class:`jaxmodels.models.ResNet` (``block_k/conv1`` -> ``bn1`` ->
    ``block_k/conv2``; block outputs are tied by the residual sums and are not pruned), for a tree
    ``{"params", "batch_stats"}``.

    >>> groups = resnet_channel_groups({"params": params, "batch_stats": stats})
    """
    flat = flatten(variables)
    blocks = sorted({p.split("/")[1] for p in flat if p.startswith("params/block_")}, key=lambda b: int(b[6:]))
    if not blocks:
        raise ValueError("resnet_channel_groups: no params/block_k in the tree (pass {'params', 'batch_stats'})")
    out = []
    for b in blocks:
        prod = [f"params/{b}/conv1/kernel", f"params/{b}/bn1/scale", f"params/{b}/bn1/bias"]
        prod += [p for p in (f"batch_stats/{b}/bn1/mean", f"batch_stats/{b}/bn1/var") if p in flat]
        out.append(ChannelGroup(tuple(prod), (f"params/{b}/conv2/kernel",), b))
    return out


def uniform_prune(tree: PyTree, groups: Sequence[ChannelGroup], ratio: float, ord: int = 1) -> PyTree:
    """Every group masked at the same ``ratio`` by the filter norms of the unpruned ``tree`` (the uniform per-layer
    baseline, one shot).

    >>> pruned = uniform_prune(variables, groups, 0.3)
    """
    _check_groups(flatten(tree), groups, "uniform_prune")
    keeps = [keep_mask(filter_norms(tree, g, ord), ratio) for g in groups]
    return _jit_mask(tuple(groups))(tree, keeps)


@functools.lru_cache(maxsize=64)
def _jit_mask(groups: tuple):
    return jax.jit(lambda t, keeps: mask_groups(t, groups, keeps))


# ------------------------------------------------------------------------------------------------ PAGCP

@dataclasses.dataclass(frozen=True)
class PAGCPConfig:
    """``ratios``: the increasing pruning ratios tried per layer; ``delta``: the first layer's allowed relative loss
    increase δ_0; ``total``: the allowed total relative increase (λ from ``Π(1 + δ_0 λ^i) = 1 + total``; ``decay=False``
    keeps δ_0 for every layer); ``probe``: the ratio whose FLOPs reduction orders the layers; ``ord``: filter norm."""

    ratios: tuple[float, ...] = tuple(np.round(np.linspace(0.1, 0.9, 9), 6))
    delta: float = 0.02
    total: float = 0.1
    decay: bool = True
    probe: float = 0.3
    ord: int = 1

    def validate(self) -> None:
        r = np.asarray(self.ratios, np.float32)
        if r.ndim != 1 or not len(r) or (r <= 0).any() or (r >= 1).any() or (np.diff(r) <= 0).any():
            raise ValueError(f"PAGCPConfig.ratios must be increasing numbers in (0, 1), got {self.ratios!r}")
        if not self.delta > 0 or not self.total > 0:
            raise ValueError(f"PAGCPConfig: delta and total must be > 0, got {self.delta!r}, {self.total!r}")
        if not 0 < self.probe < 1 or self.ord not in (1, 2):
            raise ValueError(f"PAGCPConfig: probe in (0, 1) and ord in (1, 2), got {self.probe!r}, {self.ord!r}")


class PAGCPResult(NamedTuple):
    """``tree`` (masked), ``ratios`` / ``keep`` per group name, the pruning ``order``, per-layer ``thresholds`` δ_i,
    ``losses`` (the task losses after each accepted layer), ``base_loss`` (unpruned), ``flops`` (before, after)."""

    tree: PyTree
    ratios: dict
    keep: dict
    order: tuple
    thresholds: tuple
    losses: tuple
    base_loss: np.ndarray
    flops: tuple


def pagcp_decay(delta: float, total: float, n_layers: int) -> float:
    """λ with ``Π_{i<n} (1 + δ λ^i) = 1 + total`` (bisection; the reference's ``ratio_compute``).

    >>> pagcp_decay(0.02, 0.1, 5)      # ≈ 0.99
    """
    f = lambda x: float(np.prod([1.0 + delta * x**i for i in range(n_layers)])) - (1.0 + total)
    lo, hi = 0.0, 1.0
    while f(hi) < 0:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def _losses(evaluate, tree) -> np.ndarray:
    v = np.atleast_1d(np.asarray(jax.device_get(evaluate(tree)), np.float32))
    if v.ndim != 1 or not np.isfinite(v).all() or (v <= 0).any():
        raise ValueError(f"pagcp: evaluate must return finite positive task losses (scalar or [tasks]), got {v}")
    return v


def pagcp(tree: PyTree, groups: Sequence[ChannelGroup], evaluate: Callable[[PyTree], Any],
          flops: Callable[[PyTree], float], config: PAGCPConfig = PAGCPConfig(), *,
          progress: bool | None = None) -> PAGCPResult:
    """Performance-aware sequential greedy channel pruning (see the module docstring). ``evaluate(tree)`` returns the
    task losses on calibration data (scalar or ``[tasks]``; jit it: it is called with masked trees of one shape);
    ``flops(tree)`` counts the cost (e.g. ``functools.partial(count_flops, positions=...)``). ``progress``: a bar
    over the layers (:func:`jaxmodels.progress.progress_bar`).

    >>> res = pagcp(variables, groups, lambda v: loss(v, x, y), functools.partial(count_flops, positions=pos))
    """
    config.validate()
    sizes = _check_groups(flatten(tree), groups, "pagcp")
    names = [g.name or g.producers[0] for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"pagcp: group names must be distinct, got {names}")
    groups = tuple(groups)
    mask = _jit_mask(groups)  # one compiled masking of all groups; evaluate sees trees of one shape
    norms = jax.jit(lambda t, keeps: [filter_norms(mask_groups(t, groups, keeps), g, config.ord) for g in groups])
    keeps = [np.ones(c, bool) for c in sizes]
    base = base0 = _losses(evaluate, tree)
    f0 = float(flops(tree))
    n0 = norms(tree, keeps)
    gain = []
    for i, g in enumerate(groups):
        probe = list(keeps)
        probe[i] = keep_mask(n0[i], config.probe)
        gain.append(f0 - float(flops(mask(tree, probe))))
    lam = pagcp_decay(config.delta, config.total, len(groups)) if config.decay else 1.0
    order = sorted(range(len(groups)), key=lambda i: gain[i], reverse=lam <= 1.0)
    delta, ratios, thresholds, losses = config.delta, {}, [], []
    for i in progress_bar(order, progress, desc="PAGCP layers"):
        score, accepted, last = norms(tree, keeps)[i], None, None
        for r in config.ratios:
            cand = list(keeps)
            cand[i] = keep_mask(score, float(r))
            loss = _losses(evaluate, mask(tree, cand))
            if loss.shape != base.shape:
                raise ValueError(f"pagcp: evaluate returned {loss.shape[0]} losses, first {base.shape[0]}")
            if (loss / base).max() > 1.0 + delta:
                break
            accepted, last = (float(r), cand), loss
        thresholds.append(delta)
        ratios[names[i]] = 0.0 if accepted is None else accepted[0]
        if accepted is not None:
            keeps = accepted[1]
            base, delta = np.maximum(base, last), delta * lam
            losses.append(last)
    out = mask(tree, keeps)
    return PAGCPResult(out, ratios, {n: keeps[i] for i, n in enumerate(names)}, tuple(names[i] for i in order),
                       tuple(thresholds), tuple(losses), base0, (f0, float(flops(out))))
