"""Training BatchNorm and only BatchNorm: masks that train a chosen subset of parameters, and the features BN turns off.

Frankle, Schwab & Morcos, "Training BatchNorm and Only BatchNorm: On the Expressive Power of Random Features in
CNNs" (ICLR 2021). Every weight stays at its random initialisation except the BatchNorm affine parameters
(``y = γ · (x − μ_B) / sqrt(σ²_B + ε) + β``), so one step of any optax rule ``u = tx(g)`` becomes::

    θ_{t+1} = θ_t + m ⊙ tx(m ⊙ g_t)          m = 1 on γ, β (optionally the output layer), 0 elsewhere

(:func:`train_only`: the gradient is masked before ``tx`` so no statistic of a frozen parameter is kept, and the
update after it so weight decay cannot move them). The paper's controls train the same *number* of parameters
chosen elsewhere: :func:`random_mask` draws ``n`` parameters uniformly without replacement over the selected
leaves ("random parameters"), or ``k`` per output channel of every selected kernel ("k random parameters per
channel"; ``k = 2`` matches γ, β). The paper finds BN-only training disables features by driving ``γ`` to zero;
:func:`disabled_features` counts the channels with ``|γ_c| < τ`` (the cut-off ``τ`` is the caller's: the exact value
the paper counts with could not be sourced here; 0.01 by default, an absolute cut-off).

BatchNorm parameters are found by path (``BN_PATTERN``): a ``scale`` / ``bias`` leaf whose module name contains
``bn`` or ``BatchNorm`` (``stem_bn``, ``block_3/bn1``, ``shortcut_bn``, linen's default ``BatchNorm_0``).

API::

    mask = bn_mask(params)                                   # Python bools per leaf (an optax.masked mask)
    tx = train_only(optax.adam(1e-2), mask)                  # frozen everywhere else
    ctrl = random_mask(params, count_trainable(params, mask), jax.random.PRNGKey(0))   # equal-size control
    d = disabled_features(params); d.fraction                # share of BN channels with |γ| < 0.01
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.tree import flatten, select, unflatten

PyTree = Any
BN_PATTERN = r"(?i)(^|/)[^/]*(bn|batchnorm)[^/]*/(scale|bias)$"
BN_SCALE_PATTERN = r"(?i)(^|/)[^/]*(bn|batchnorm)[^/]*/scale$"

__all__ = ["BN_PATTERN", "BN_SCALE_PATTERN", "DisabledFeatures", "bn_mask", "count_trainable", "random_mask",
           "train_only", "disabled_features"]


class DisabledFeatures(NamedTuple):
    """Channels whose BatchNorm ``|γ|`` is below the threshold: ``fraction`` (jnp scalar), ``count``, ``total``
    and ``per_layer`` ``{path: fraction}``."""

    fraction: jax.Array
    count: jax.Array
    total: int
    per_layer: dict


def bn_mask(params: PyTree, *, pattern: str = BN_PATTERN, also: str | Sequence[str] | None = None) -> PyTree:
    """A pytree of Python bools: True on the BatchNorm ``scale`` / ``bias`` leaves (``pattern``) and on the leaves
    matching the ``also`` regexes (e.g. ``r"^head/"``: the paper's "BatchNorm + output layer" variant).

    >>> tx = train_only(optax.adam(1e-2), bn_mask(params))
    """
    bn = flatten(select(params, pattern))
    extra = flatten(select(params, also)) if also is not None else {p: False for p in bn}
    flat = {p: bool(bn[p] or extra[p]) for p in bn}
    if not any(flat.values()):
        raise ValueError(f"bn_mask: no leaf matches {pattern!r}" + (f" or {also!r}" if also is not None else ""))
    return unflatten(flat, like=params)


def _leaf_mask(m, leaf) -> np.ndarray | jax.Array:
    if isinstance(m, (bool, np.bool_)):
        return np.full(np.shape(leaf), bool(m))
    if tuple(np.shape(m)) != tuple(np.shape(leaf)):
        raise ValueError(f"mask leaf of shape {np.shape(m)} does not match the parameter's {np.shape(leaf)}")
    return m


def _check_mask(params, mask):
    ps, ms = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(mask)
    if ps != ms:
        raise ValueError(f"mask structure does not match params: {ms} vs {ps}")


def count_trainable(params: PyTree, mask: PyTree) -> int:
    """Number of scalar parameters the mask trains (bool leaves count the whole leaf, array leaves their Trues).

    >>> count_trainable(params, bn_mask(params))    # 2 per BN channel
    """
    _check_mask(params, mask)
    total = 0
    for m, leaf in zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(params)):
        total += int(np.sum(np.asarray(_leaf_mask(m, leaf))))
    return total


def random_mask(params: PyTree, n: int | None, key: jax.Array, *, include: str | Sequence[str] | None = r"kernel$",
                exclude: str | Sequence[str] | None = None, per_channel: int | None = None) -> PyTree:
    """A pytree of boolean arrays (params' shapes) training randomly chosen parameters of the leaves selected by
    ``include`` / ``exclude`` (default: every ``kernel``): exactly ``n`` of them uniformly without replacement, or,
    with ``per_channel=k`` (``n`` must then be None), ``k`` per output channel (last axis) of every selected leaf.
    Unselected leaves are all False.

    >>> ctrl = random_mask(params, 688, jax.random.PRNGKey(0), exclude=r"^head/")
    >>> ctrl2 = random_mask(params, None, jax.random.PRNGKey(0), per_channel=2, exclude=r"^head/")
    """
    chosen = flatten(select(params, include, exclude))
    flat = flatten(params)
    paths = [p for p in flat if chosen[p] and np.size(flat[p]) > 0]
    if not paths:
        raise ValueError("random_mask: no leaf selected by include/exclude")
    shapes = tuple(tuple(int(d) for d in np.shape(flat[p])) for p in paths)
    if per_channel is not None:
        if n is not None:
            raise ValueError("random_mask: give n or per_channel, not both")
        k = int(per_channel)
        for p, shape in zip(paths, shapes):
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            if not 1 <= k <= fan_in:
                raise ValueError(f"random_mask: per_channel={k} must be in [1, {fan_in}] for {p} {shape}")
        drawn = _per_channel_masks(key, shapes, k)
    else:
        total = sum(int(np.prod(s)) for s in shapes)
        if n is None or not 1 <= int(n) <= total:
            raise ValueError(f"random_mask: n must be in [1, {total}] (the selected parameters), got {n}")
        drawn = _uniform_masks(key, shapes, int(n))
    out = {p: jnp.zeros(np.shape(v), bool) for p, v in flat.items()}
    out.update(dict(zip(paths, drawn)))
    return unflatten(out, like=params)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _per_channel_masks(key, shapes, k):
    out = []
    for kk, shape in zip(jax.random.split(key, len(shapes)), shapes):
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        u = jax.random.uniform(kk, (fan_in, shape[-1] if len(shape) > 1 else 1))
        out.append((jnp.argsort(jnp.argsort(u, axis=0), axis=0) < k).reshape(shape))
    return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def _uniform_masks(key, shapes, n):
    sizes = [int(np.prod(s)) for s in shapes]
    pick = jax.random.choice(key, sum(sizes), (n,), replace=False)
    hot = jnp.zeros(sum(sizes), bool).at[pick].set(True)
    offs = np.cumsum([0] + sizes)
    return [hot[a:b].reshape(s) for a, b, s in zip(offs[:-1], offs[1:], shapes)]


def train_only(tx: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformation:
    """``tx`` restricted to the parameters of ``mask`` (a tree of bools per leaf, or of boolean / 0-1 arrays of
    the parameters' shapes): gradients are zeroed before ``tx`` and updates after it, so every other parameter
    stays exactly where it is (module docstring).

    >>> tx = train_only(optax.adam(1e-2), bn_mask(params))
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise ValueError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}")

    def apply_mask(tree):
        _check_mask(tree, mask)
        return jax.tree_util.tree_map(
            lambda g, m: jnp.where(jnp.asarray(_leaf_mask(m, g)), g, jnp.zeros_like(g)), tree, mask)

    def init_fn(params):
        _check_mask(params, mask)
        return tx.init(params)

    def update_fn(updates, state, params=None):
        u, state = tx.update(apply_mask(updates), state, params)
        return apply_mask(u), state

    return optax.GradientTransformation(init_fn, update_fn)


def disabled_features(params: PyTree, *, threshold: float = 0.01, pattern: str = BN_SCALE_PATTERN) -> DisabledFeatures:
    """The BatchNorm channels whose ``|γ| < threshold`` (``γ``: the ``scale`` leaves matching ``pattern``).

    >>> disabled_features(trained_params, threshold=0.01).fraction
    """
    if not float(threshold) > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    chosen = flatten(select(params, pattern))
    scales = {p: v for p, v in flatten(params).items() if chosen[p]}
    if not scales:
        raise ValueError(f"disabled_features: no BatchNorm scale matches {pattern!r}")
    per, count, total = {}, jnp.zeros((), jnp.int32), 0
    for p, g in scales.items():
        off = jnp.abs(jnp.asarray(g, jnp.float32)) < threshold
        per[p] = jnp.mean(off.astype(jnp.float32))
        count = count + jnp.sum(off.astype(jnp.int32))
        total += int(np.size(g))
    return DisabledFeatures(count / total, count, total, per)
