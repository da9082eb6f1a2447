"""Layer-wise progressive feature weighting: how equally each layer of a (linear) encoder + projection head weights
the input features, and the spectral contrastive loss the theory trains with.

Xue, Gan, Ni, Joshi & Mirzasoleiman, "Investigating the Benefits of Projection Head for Representation Learning"
(ICLR 2024). For a deep linear network ``z = x W_1 W_2 .. W_L`` (Flax layout, ``W_l [d_{l-1}, d_l]``) trained from
small initialization with a contrastive loss, the implicit bias keeps the layers balanced (``W_l W_lᵀ ≈
W_{l+1}ᵀ W_{l+1}``), so a feature ``v_i`` that the output weights by ``σ_i`` is weighted by ``σ_i^{l/L}`` at
layer ``l``: features become increasingly unequal with depth, and the pre-projection layers are more normalized
and less specialized. With ``P_l = W_1 .. W_l`` and the features ``v_i`` the input-side singular vectors of the
end-to-end map ``P_L = V Σ Uᵀ`` (or any given directions)::

    w_{l,i}     = ‖ v_iᵀ P_l ‖₂                          (the weight of feature i in layer l's representation)
    exponent_l  = slope of log w_{l,i} against log w_{L,i} over the features (least squares with intercept;
                  l / L for a balanced network, 1 at the output)
    unevenness_l = max_i w_{l,i} / min_i w_{l,i}          (1: all features weighted equally)

The features are the top ``k`` singular directions (default: all with ``σ_i > rtol·σ_1``). The training loss of the
theory is HaoChen et al.'s spectral contrastive loss on the two views' embeddings ``z, z⁺`` (``[B, d]``)::

    L = −2/B Σ_i z_iᵀ z_i⁺ + 1/(B(B−1)) Σ_{i≠j} (z_iᵀ z_j⁺)²

The paper's non-linear results (features absent from higher layers) and its fixed re-weighting head are not
implemented; ``representation_feature_weights`` gives the same weights for any layer's representation ``H_l`` of
inputs ``X`` by the least-squares linear map ``X → H_l``, so nonlinear encoders can be measured the same way.

API::

    fw = feature_weights([W1, W2])                      # FeatureWeighting(weights [L, k], exponents [L], ...)
    loss = spectral_contrastive_loss(z1, z2)
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.analysis.spectral import _check_float_array

__all__ = ["FeatureWeighting", "feature_weights", "representation_feature_weights", "spectral_contrastive_loss"]


class FeatureWeighting(NamedTuple):
    """Per-layer feature weights ``weights [L, k]`` (layer ``l`` = after ``W_1..W_l``), the feature ``directions
    [d_in, k]``, the fitted ``exponents [L]`` against the last layer and ``unevenness [L]`` (max / min weight)."""

    weights: jax.Array
    directions: jax.Array
    exponents: jax.Array
    unevenness: jax.Array


def _summary(weights, directions):
    logw = jnp.log(jnp.maximum(weights, jnp.finfo(jnp.float32).tiny))
    ref = logw[-1] - jnp.mean(logw[-1])
    cen = logw - jnp.mean(logw, axis=1, keepdims=True)
    exps = cen @ ref / jnp.maximum(ref @ ref, jnp.finfo(jnp.float32).tiny)
    uneven = jnp.max(weights, axis=1) / jnp.maximum(jnp.min(weights, axis=1), jnp.finfo(jnp.float32).tiny)
    return FeatureWeighting(weights, directions, exps, uneven)


def _directions(end_to_end, k, rtol):
    u, s, _ = jnp.linalg.svd(end_to_end, full_matrices=False)
    if k is None:
        if isinstance(s, jax.core.Tracer):
            raise ValueError("under jit pass k (the number of features) explicitly")
        k = int(jnp.sum(s > rtol * s[0]))
    if not 1 <= int(k) <= s.shape[0]:
        raise ValueError(f"k must be in [1, {s.shape[0]}], got {k}")
    return u[:, :int(k)]


def feature_weights(kernels: Sequence[jax.Array], directions: jax.Array | None = None, *, k: int | None = None,
                    rtol: float = 1e-3) -> FeatureWeighting:
    """Feature weights of every layer of the linear chain ``x W_1 .. W_L`` (``kernels`` in Flax layout
    ``[in, out]``; module docstring). ``directions [d_in, k]`` are the features (default: the top ``k`` input-side
    singular vectors of ``W_1 .. W_L``; ``k=None``: those with ``σ > rtol·σ_1``, not under jit).

    >>> fw = feature_weights([p["encoder"]["kernel"], p["head"]["kernel"]])
    >>> fw.exponents                                     # ~[0.5, 1.0] for a balanced two-layer linear network
    """
    if isinstance(kernels, (str, bytes)) or not isinstance(kernels, Sequence) or len(kernels) == 0:
        raise ValueError("kernels must be a non-empty sequence of 2-D [in, out] matrices")
    for i, w in enumerate(kernels):
        _check_float_array(w, f"kernels[{i}]", 2, 2)
        if i and w.shape[0] != kernels[i - 1].shape[1]:
            raise ValueError(f"kernels[{i}] has {w.shape[0]} inputs but kernels[{i - 1}] has {kernels[i - 1].shape[1]}"
                             " outputs")
    if not 0.0 <= float(rtol) < 1.0:
        raise ValueError(f"rtol must be in [0, 1), got {rtol}")
    prods, p = [], None
    for w in kernels:
        w = jnp.asarray(w, jnp.float32)
        p = w if p is None else p @ w
        prods.append(p)
    if directions is None:
        directions = _directions(prods[-1], k, rtol)
    else:
        _check_float_array(directions, "directions", 2, 2)
        if directions.shape[0] != kernels[0].shape[0]:
            raise ValueError(f"directions must be [{kernels[0].shape[0]}, k], got {directions.shape}")
        directions = jnp.asarray(directions, jnp.float32)
    weights = jnp.stack([jnp.linalg.norm(directions.T @ q, axis=1) for q in prods])
    return _summary(weights, directions)


def representation_feature_weights(x: jax.Array, representations: Sequence[jax.Array],
                                   directions: jax.Array | None = None, *, k: int | None = None,
                                   ridge: float = 1e-6, rtol: float = 1e-3) -> FeatureWeighting:
    """Feature weights of layer representations ``H_l [N, d_l]`` of inputs ``x [N, d_in]``: each layer's linear
    map ``A_l = argmin ‖x A − H_l‖² + ridge·N‖A‖²`` stands in for ``P_l`` in :func:`feature_weights` (the exact
    ``P_l`` for a linear encoder when ``x`` spans the input space).

    >>> fw = representation_feature_weights(x, [h_pre, z_post])
    """
    _check_float_array(x, "x", 2, 2)
    if isinstance(representations, (str, bytes)) or not isinstance(representations, Sequence) or \
            len(representations) == 0:
        raise ValueError("representations must be a non-empty sequence of [N, d_l] arrays")
    for i, h in enumerate(representations):
        _check_float_array(h, f"representations[{i}]", 2, 2)
        if h.shape[0] != x.shape[0]:
            raise ValueError(f"representations[{i}] has {h.shape[0]} rows, x has {x.shape[0]}")
    if not float(ridge) >= 0.0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    xf = jnp.asarray(x, jnp.float32)
    n, d = xf.shape
    gram = xf.T @ xf + float(ridge) * n * jnp.eye(d, dtype=jnp.float32)
    maps = [jnp.linalg.solve(gram, xf.T @ jnp.asarray(h, jnp.float32)) for h in representations]
    if directions is None:
        directions = _directions(maps[-1], k, rtol)
    weights = jnp.stack([jnp.linalg.norm(jnp.asarray(directions, jnp.float32).T @ a, axis=1) for a in maps])
    return _summary(weights, jnp.asarray(directions, jnp.float32))


def spectral_contrastive_loss(z1: jax.Array, z2: jax.Array) -> jax.Array:
    """HaoChen et al.'s spectral contrastive loss of paired embeddings ``z1, z2 [B, d]`` (row ``i`` of each: two
    augmentations of example ``i``): ``−2 mean_i z1_i·z2_i + mean_{i≠j} (z1_i·z2_j)²``.

    >>> loss = spectral_contrastive_loss(encode(aug1(x)), encode(aug2(x)))
    """
    _check_float_array(z1, "z1", 2, 2)
    if not hasattr(z2, "shape") or z2.shape != z1.shape:
        raise ValueError(f"z2 must have z1's shape {z1.shape}, got {getattr(z2, 'shape', type(z2))}")
    if z1.shape[0] < 2:
        raise ValueError("need a batch of at least 2 pairs")
    a, b = jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)
    bsz = a.shape[0]
    s = a @ b.T
    pos = jnp.trace(s) / bsz
    off = (jnp.sum(s ** 2) - jnp.sum(jnp.diag(s) ** 2)) / (bsz * (bsz - 1))
    return -2.0 * pos + off
