"""Per-layer clipping for differential privacy, with optional Gaussian noise, as an Optax transform.

Each leaf of the update tree is a *layer* l (a kernel and its bias are two layers, as in Optax and the reference
code). A total L2 bound C is split into per-layer bounds C_l with Σ_l C_l² = C², so the clipped update still has
global norm ≤ C (the DP sensitivity is unchanged)::

    allocation="uniform":    C_l = C / √L                       (L leaves)
    allocation="dimension":  C_l = C · √(n_l / N)               (n_l entries in leaf l, N = Σ_l n_l)

and every layer is clipped on its own (``mode="clip"``; McMahan, Ramage, Talwar, Zhang, "Learning Differentially
Private Recurrent Language Models", ICLR 2018, Algorithm 1 ``PerLayerClip``; ``optax.per_example_layer_norm_clip``
with ``uniform=True/False``)::

    ĝ_l = g_l · min(1, C_l / ‖g_l‖₂)                            (‖g_l‖ = 0: ĝ_l = 0)

``mode="normalize"`` is the rule of Pelikan et al.'s reference code ("Federated Learning with Differential Privacy
for End-to-End Speech Recognition", 2023, revised as "Enabling Differentially Private Federated Learning for Speech
Recognition: Benchmarks, Adaptive Optimizers and Gradient Clipping"; github.com/apple/ml-pfl4asr,
``pfl4asr/utils/pfunctions.py``: ``clip_layer_grads`` = uniform, ``clip_layer_grads_params`` = dimension): when
the *global* norm reaches C every layer is rescaled to norm exactly C_l (small layers are scaled up, a layer-wise
normalization), otherwise the update passes unchanged::

    ĝ_l = g_l                            if ‖g‖₂ < C
    ĝ_l = g_l / (‖g_l‖₂ + 1e-10) · C_l   otherwise

(In the reference the global-norm test makes the per-layer bound hold only when ‖g‖ ≥ C; ‖ĝ‖ ≤ C always.)

With ``noise_multiplier`` σ > 0 the transform adds N(0, σ²C²) to every entry: of the single clipped update, or,
with ``per_example=True`` (updates carry a leading batch axis B of per-example / per-client contributions), of the
sum of the B clipped contributions, divided by B afterwards, exactly as ``optax.contrib.
differentially_private_aggregate`` (DP-SGD, Abadi et al. 2016) but with per-layer instead of flat clipping::

    per_example:  u = (Σ_b clip(g_b) + N(0, σ²C² I)) / B

The noise key lives in a :class:`PerLayerClipState` (Optax style: ``new_key, *leaf_keys = split(key, L + 1)``, the
key schedule of ``differentially_private_aggregate``, so with one leaf and ``per_example=True`` the two transforms
return the same updates, the same noise included, up to float summation order). No privacy accounting is done
here: the (ε, δ) of a run follows from σ, the sampling rate and the number of steps with an accountant such as
Google's ``dp_accounting`` (RDP / PLD) or Opacus's.
Flat (global-norm) clipping is ``optax.clip_by_global_norm`` / ``differentially_private_aggregate``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

__all__ = ["PerLayerClipState", "ALLOCATIONS", "CLIP_MODES", "layer_clip_norms", "clip_layers", "per_layer_clip"]

#: Names of the splits of the total bound C over layers (see the module docstring).
ALLOCATIONS = ("uniform", "dimension")
#: Names of the per-layer rules (see the module docstring).
CLIP_MODES = ("clip", "normalize")


class PerLayerClipState(NamedTuple):
    """State of :func:`per_layer_clip`: the PRNG key the next noise draw splits from."""

    rng_key: jax.Array


def _check_bound(clip_norm: Any) -> None:
    if isinstance(clip_norm, (bool, str)):
        raise TypeError(f"clip_norm must be a positive number, got {clip_norm!r}")
    try:
        c = float(clip_norm)
    except (TypeError, ValueError):
        raise TypeError(f"clip_norm must be a positive number, got {clip_norm!r}") from None
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm!r}")


def _check_names(allocation: str, mode: str) -> None:
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if mode not in CLIP_MODES:
        raise ValueError(f"mode must be one of {CLIP_MODES}, got {mode!r}")


def layer_clip_norms(tree: PyTree, clip_norm: float, allocation: str = "uniform", batch_dims: int = 0) -> PyTree:
    """The per-layer bounds C_l (Python floats, one per leaf of ``tree``) for a total bound ``clip_norm``:
    ``C/√L`` (``"uniform"``) or ``C·√(n_l/N)`` (``"dimension"``; n_l counts a leaf's entries after dropping its
    ``batch_dims`` leading axes). Σ_l C_l² = C²."""
    _check_bound(clip_norm)
    _check_names(allocation, "clip")
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        raise ValueError("layer_clip_norms: the tree has no leaves")
    if allocation == "uniform":
        bounds = [float(clip_norm) / math.sqrt(len(leaves))] * len(leaves)
    else:
        sizes = [int(np.prod(np.shape(x)[batch_dims:])) for x in leaves]
        total = sum(sizes)
        if total == 0:
            raise ValueError("layer_clip_norms: every leaf is empty")
        bounds = [float(clip_norm) * math.sqrt(n / total) for n in sizes]
    return jax.tree.unflatten(treedef, bounds)


def _sq_norm(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.sum(x * x)


def clip_layers(updates: PyTree, clip_norm: float, *, allocation: str = "uniform", mode: str = "clip") -> PyTree:
    """Clip one update tree layer by layer to the bounds of :func:`layer_clip_norms` (see the module docstring for
    ``mode``). Norms in float32; every leaf comes back in its own dtype. Pure and jittable; ``jax.vmap`` it over a
    leading axis to clip many updates (clients, examples) at once."""
    _check_bound(clip_norm)
    _check_names(allocation, mode)
    bounds = layer_clip_norms(updates, clip_norm, allocation)
    leaves, treedef = jax.tree.flatten(updates)
    cl = jax.tree.leaves(bounds)
    sq = [_sq_norm(g) for g in leaves]
    if mode == "clip":
        out = []
        for g, s, c in zip(leaves, sq, cl):
            n = jnp.sqrt(s)
            scale = jnp.where(n > c, c / jnp.where(n > 0, n, 1.0), 1.0)
            out.append((g.astype(jnp.float32) * scale).astype(g.dtype))
    else:
        total = jnp.sqrt(sum(sq))
        out = [jnp.where(total < clip_norm, g.astype(jnp.float32),
                         g.astype(jnp.float32) / (jnp.sqrt(s) + 1e-10) * c).astype(g.dtype)
               for g, s, c in zip(leaves, sq, cl)]
    return jax.tree.unflatten(treedef, out)


def per_layer_clip(
    clip_norm: float,
    *,
    allocation: str = "uniform",
    mode: str = "clip",
    noise_multiplier: float = 0.0,
    key: jax.Array | int | None = None,
    per_example: bool = False,
) -> optax.GradientTransformation:
    """Per-layer clipping (and, with ``noise_multiplier`` > 0, the Gaussian mechanism) as an Optax transform; see
    the module docstring for the equations.

    Args:
      clip_norm: the total L2 bound C (> 0); per-layer bounds come from ``allocation``.
      allocation: ``"uniform"`` (C/√L) or ``"dimension"`` (C·√(n_l/N)).
      mode: ``"clip"`` (each layer to its own bound) or ``"normalize"`` (ml-pfl4asr's rule).
      noise_multiplier: σ ≥ 0; the noise std is σ·C on the (summed) clipped update. σ > 0 needs ``key``.
      key: a ``jax.random.key`` / legacy ``PRNGKey`` or an int seed, the start of the noise key schedule.
      per_example: the updates carry a leading batch axis (per-example gradients or per-client deltas): clip each
        entry, sum, add noise, divide by the batch size. Must come first in a chain, like
        ``optax.contrib.differentially_private_aggregate``.

    The state is a :class:`PerLayerClipState`; the transform needs no ``params``.
    """
    _check_bound(clip_norm)
    _check_names(allocation, mode)
    if isinstance(noise_multiplier, bool):
        raise TypeError(f"noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    try:
        sigma = float(noise_multiplier)
    except (TypeError, ValueError):
        raise TypeError(f"noise_multiplier must be a number >= 0, got {noise_multiplier!r}") from None
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if sigma > 0 and key is None:
        raise ValueError("per_layer_clip: noise_multiplier > 0 needs a `key` (jax.random.key or an int seed)")
    if key is None:
        key = jax.random.key(0)  # never used: no noise is drawn
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        key = jax.random.key(int(key))
    elif not (isinstance(key, jax.Array) and ((jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ())
                                              or (key.dtype == jnp.uint32 and key.shape == (2,)))):
        raise TypeError(f"per_layer_clip: `key` must be a jax.random.key, a PRNGKey or an int, got {key!r}")
    std = sigma * float(clip_norm)

    def init_fn(params):
        del params
        return PerLayerClipState(rng_key=key)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        if not leaves:
            return updates, state
        if per_example:
            sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
            if len(sizes) != 1 or None in sizes:
                raise ValueError("per_layer_clip(per_example=True): every leaf needs the same leading batch axis, "
                                 f"got shapes {[np.shape(x) for x in leaves]}")
            bsize = sizes.pop()
            clip1 = lambda t: clip_layers(t, clip_norm, allocation=allocation, mode=mode)  # noqa: E731
            clipped = jax.vmap(clip1)(jax.tree.unflatten(treedef, leaves))
            summed = [jnp.sum(x.astype(jnp.float32), axis=0) for x in jax.tree.leaves(clipped)]
        else:
            bsize = 1
            clipped = clip_layers(updates, clip_norm, allocation=allocation, mode=mode)
            summed = [x.astype(jnp.float32) for x in jax.tree.leaves(clipped)]
        if std == 0.0:
            out = [(s / bsize).astype(g.dtype) for s, g in zip(summed, leaves)]
            return jax.tree.unflatten(treedef, out), state
        new_key, *rngs = jax.random.split(state.rng_key, len(leaves) + 1)
        out = [((s + std * jax.random.normal(r, s.shape, jnp.float32)) / bsize).astype(g.dtype)
               for s, r, g in zip(summed, rngs, leaves)]
        return jax.tree.unflatten(treedef, out), PerLayerClipState(rng_key=new_key)

    return optax.GradientTransformation(init_fn, update_fn)
