"""Neural collapse metrics NC1-NC4 of last-layer features, class means and the linear classifier.

Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal phase of deep learning training" (PNAS
2020); the measurements follow the paper's companion notebook (its ``analysis`` function: ``Sw_invSb``,
``norm_M_CoV`` / ``norm_W_CoV``, ``cos_M`` / ``cos_W``, ``W_M_dist``, ``NCC_mismatch``). With features
``h_i ∈ R^D`` (rows of ``features [N, D]``), labels ``y_i ∈ {0..C-1}``, class means ``μ_c``, the global mean
``μ_G = mean_c μ_c`` (the mean of the class means, as the notebook), centered means ``M = [μ_c - μ_G]_c (D x C)``
and the classifier ``W (C x D)`` (the Flax kernel ``[D, C]`` transposed) with bias ``b``::

    Σ_W = 1/N Σ_i (h_i - μ_{y_i})(h_i - μ_{y_i})ᵀ        Σ_B = 1/C Σ_c (μ_c - μ_G)(μ_c - μ_G)ᵀ = M Mᵀ / C
    NC1 = Tr(Σ_W Σ_B⁺) / C            (Σ_B⁺ from its top C-1 eigenpairs, as the notebook's svds(Sb, k=C-1);
                                       the notebook stores Tr(Σ_W Σ_B⁺), the paper's figure divides by C)
    NC2  equinorm     = std_c ‖μ_c - μ_G‖ / mean_c ‖μ_c - μ_G‖          (std with Bessel's correction, as torch)
         equiangular  = std_{c≠c'} cos(μ_c - μ_G, μ_c' - μ_G)           (the paper's Fig. 4)
         max-angle    = mean_{c≠c'} |cos(μ_c - μ_G, μ_c' - μ_G) + 1/(C-1)|   (the notebook's ``coherence``)
         etf_distance = ‖ MᵀM / ‖MᵀM‖_F - (I - 11ᵀ/C) / sqrt(C-1) ‖_F    (Zhu et al. 2021's NC2: distance of the
                        normalized Gram of the centered means from the simplex ETF's)
         (each also for the rows of W: ``*_classifier``)
    NC3 = ‖ Wᵀ/‖W‖_F - M/‖M‖_F ‖_F²   (self-duality; the notebook's ``W_M_dist``, squared)
    NC4 = 1/N #{i : argmax_c (W h_i + b)_c ≠ argmin_c ‖h_i - μ_c‖}   (disagreement with the nearest class center)

Collapse drives every metric to 0. ``Tr(Σ_W Σ_B⁺)`` is computed without forming ``D x D`` matrices: with
``MᵀM = V diag(s²) Vᵀ`` (``jnp.linalg.eigh``, ``C x C``) and ``Z = H - μ_y``,
``Tr(Σ_W Σ_B⁺) = C/N Σ_{k<C-1 largest} ‖Z M v_k‖² / s_k⁴``. Float32 throughout; the eigh of ``MᵀM`` squares the
condition number of the class means, fine for the well-separated means the metric is meant for (the NumPy
reference test agrees to ~1e-5 relative).

API::

    nc = neural_collapse_metrics(features, labels, num_classes, kernel=W_dense, bias=b)   # NeuralCollapse, jit-able
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.analysis.spectral import _check_float_array
from jaxmodels.tree import is_concrete

__all__ = ["NeuralCollapse", "neural_collapse_metrics"]


class NeuralCollapse(NamedTuple):
    """NC1-NC4 (module docstring). Classifier fields are NaN when no ``kernel`` is given."""

    nc1: jax.Array
    nc2_equinorm_means: jax.Array
    nc2_equinorm_classifier: jax.Array
    nc2_equiangular_means: jax.Array
    nc2_equiangular_classifier: jax.Array
    nc2_maxangle_means: jax.Array
    nc2_maxangle_classifier: jax.Array
    nc2_etf_distance_means: jax.Array
    nc2_etf_distance_classifier: jax.Array
    nc3_self_duality: jax.Array
    nc4_ncc_mismatch: jax.Array


def _std(x):
    return jnp.sqrt(jnp.sum((x - x.mean()) ** 2) / (x.shape[0] - 1))


def _geometry(v):
    """Equinorm, equiangular, max-angle and ETF distance of the columns of ``v`` (``D x C``)."""
    c = v.shape[1]
    norms = jnp.linalg.norm(v, axis=0)
    u = v / norms
    cos = u.T @ u
    rows, cols = np.nonzero(~np.eye(c, dtype=bool))  # static off-diagonal indices
    cos_off = cos[rows, cols]
    gram = v.T @ v
    etf = (jnp.eye(c) - jnp.ones((c, c)) / c) / jnp.sqrt(c - 1.0)
    return (_std(norms) / norms.mean(), _std(cos_off), jnp.mean(jnp.abs(cos_off + 1.0 / (c - 1))),
            jnp.linalg.norm(gram / jnp.linalg.norm(gram) - etf))


def neural_collapse_metrics(features: jax.Array, labels: jax.Array, num_classes: int, *,
                            kernel: jax.Array | None = None, bias: jax.Array | None = None) -> NeuralCollapse:
    """NC1-NC4 of ``features [N, D]`` with integer ``labels [N]`` in ``[0, num_classes)`` and the linear classifier
    ``kernel [D, num_classes]`` (Flax Dense layout) / ``bias [num_classes]``. Every class must occur. Jit-able
    (``num_classes`` static)."""
    _check_float_array(features, "features", 2, 2)
    c = int(num_classes)
    if c < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not hasattr(labels, "shape") or labels.shape != features.shape[:1]:
        raise ValueError(f"labels must have shape {features.shape[:1]}, got {getattr(labels, 'shape', None)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if is_concrete(labels):
        counts = np.bincount(np.asarray(labels).ravel(), minlength=c) if np.asarray(labels).min() >= 0 else None
        if counts is None or len(counts) > c:
            raise ValueError(f"labels must lie in [0, {c})")
        if (counts == 0).any():
            raise ValueError(f"every class must occur in labels; missing {np.flatnonzero(counts == 0)[:5].tolist()}")
    d = features.shape[1]
    if kernel is not None:
        _check_float_array(kernel, "kernel", 2, 2)
        if kernel.shape != (d, c):
            raise ValueError(f"kernel must have shape {(d, c)} (Flax Dense [features, classes]), got {kernel.shape}")
    if bias is not None:
        if kernel is None:
            raise ValueError("bias given without kernel")
        _check_float_array(bias, "bias", 1, 1)
        if bias.shape != (c,):
            raise ValueError(f"bias must have shape {(c,)}, got {bias.shape}")
    return _neural_collapse(features, labels, kernel, bias, num_classes=c)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _neural_collapse(features, labels, kernel, bias, *, num_classes):
    c = num_classes
    h = jnp.asarray(features).astype(jnp.float32)
    y = jnp.asarray(labels)
    n = h.shape[0]
    onehot = jax.nn.one_hot(y, c, dtype=jnp.float32)  # [N, C]
    counts = onehot.sum(0)
    means = (onehot.T @ h) / counts[:, None]  # [C, D]
    mu_g = means.mean(0)
    m = (means - mu_g).T  # [D, C]
    z = h - means[y]  # [N, D]

    s2, v = jnp.linalg.eigh(m.T @ m)  # ascending; the top C-1 span the centered means
    s2, v = s2[1:], v[:, 1:]
    zmv = z @ (m @ v)  # [N, C-1]
    nc1 = (c / n) * jnp.sum(jnp.sum(zmv**2, axis=0) / s2**2) / c

    eq_m, ang_m, max_m, etf_m = _geometry(m)
    nan = jnp.float32(jnp.nan)
    if kernel is None:
        eq_w = ang_w = max_w = etf_w = nc3 = nc4 = nan
    else:
        wt = jnp.asarray(kernel).astype(jnp.float32)  # = Wᵀ, [D, C]
        eq_w, ang_w, max_w, etf_w = _geometry(wt)
        nc3 = jnp.sum((wt / jnp.linalg.norm(wt) - m / jnp.linalg.norm(m)) ** 2)
        logits = h @ wt + (0.0 if bias is None else jnp.asarray(bias).astype(jnp.float32))
        dist = jnp.sum(h**2, 1)[:, None] - 2.0 * h @ means.T + jnp.sum(means**2, 1)[None, :]
        nc4 = 1.0 - jnp.mean((jnp.argmax(logits, -1) == jnp.argmin(dist, -1)).astype(jnp.float32))
    return NeuralCollapse(nc1, eq_m, eq_w, ang_m, ang_w, max_m, max_w, etf_m, etf_w, nc3, nc4)
