"""Statistics of 2-D convolution filters: distribution shifts between filter sets and degeneration measures.

Gavrikov & Keuper, "CNN Filter DB: An Empirical Investigation of Trained Convolutional Filters" (CVPR 2022), with
the rules of the authors' code: the analysis notebook (github.com/paulgavrikov/CNN-Filter-DB, ``main.ipynb``) and
their quality library (github.com/paulgavrikov/torchconvquality, ``measure_conv_weight_quality``).

**Filters.** A conv kernel (Flax ``[kh, kw, C, M]``) holds ``n = C·M`` 2-D filters; :func:`kernel_filters` returns
them as rows ``F [n, kh·kw]`` in PyTorch's order (``weight[M, C, kh, kw].reshape(-1, kh·kw)``).

**Degeneration** (per layer; :func:`filter_quality`)::

    sparsity          = #{i : max_j |F_ij| < ε · max |F|} / n                         (ε = 0.01)
    λ                 = σ(F − mean_rows F)² / (n − 1),   p = λ / Σλ                   (PCA variance ratios)
    variance entropy  = H₁₀(p) = −Σ p log₁₀ p,  normalised: H₁₀(p) / h(n)
    h(n)              = 1.2618047 / (1 + exp(−0.88767525 (log₂ n − 2.30436435))) − 0.31050834
    orthogonality     = 1 − Σ_{a,b} |Ŵ Ŵᵀ − I|_ab / (M (M − 1)),   Ŵ = rows of kernel.reshape(M, C·kh·kw) / ‖·‖₂

``h(n)`` is the authors' fit of the entropy of random (untrained) filter sets of size ``n``: a normalised variance
entropy near or above 1 is a random-looking layer, near 0 a degenerate one (all filters alike). The "clean"
variant drops the sparse filters first. ``0 · log 0 = 0`` (scipy's convention; torchconvquality's loop would give
NaN there).

**Distribution shift** (:func:`filter_distribution_shift`, the notebook's KL matrices): filters are scaled by their
own peak ``F_i / max_j |F_ij|``, projected on a 9-component PCA basis fitted on the pooled filters (or a given
one), each coefficient ``c_k`` is histogrammed over one shared range in ``bins`` bins (70 in the paper; densities,
empty bins set to float32 eps, then normalised) and the drift is the variance-weighted symmetric KL::

    D(P, Q) = Σ_k w_k [ KL(P_k ‖ Q_k) + KL(Q_k ‖ P_k) ],     w_k = explained variance ratio of component k

API::

    q = filter_quality(params["stem_conv"]["kernel"])           # FilterQuality of jnp scalars, jit-able
    per_layer = layer_filter_quality(params)                     # {path: FilterQuality} for every 3x3 conv
    d = filter_distribution_shift(kernel_filters(k_a), kernel_filters(k_b)).drift
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.analysis.spectral import _check_float_array
from jaxmodels.tree import flatten, select

PyTree = Any
_EPS32 = float(np.finfo(np.float32).eps)

__all__ = [
    "FilterQuality",
    "FilterPCA",
    "FilterShift",
    "kernel_filters",
    "entropy_max_threshold",
    "filter_sparsity",
    "variance_entropy",
    "filter_orthogonality",
    "filter_quality",
    "layer_filter_quality",
    "scale_filters",
    "filter_pca",
    "coefficient_histograms",
    "symmetric_kl",
    "filter_distribution_shift",
]


class FilterQuality(NamedTuple):
    """Degeneration measures of one conv layer (jnp float32 scalars; ``n`` counts the 2-D filters)."""

    n: jax.Array
    sparsity: jax.Array
    variance_entropy: jax.Array
    variance_entropy_norm: jax.Array
    variance_entropy_clean: jax.Array
    variance_entropy_clean_norm: jax.Array
    orthogonality: jax.Array


class FilterPCA(NamedTuple):
    """A PCA basis of filters: ``mean [d]``, ``components [d, d]`` (rows, descending variance), ratios ``[d]``."""

    mean: jax.Array
    components: jax.Array
    explained_variance_ratio: jax.Array


class FilterShift(NamedTuple):
    """``drift`` D(P, Q), the per-component symmetric KL ``[d]`` and the PCA basis used."""

    drift: jax.Array
    per_component: jax.Array
    pca: FilterPCA


def _check_kernel(kernel):
    _check_float_array(kernel, "kernel", 4, 4)


def _check_filters(filters, name="filters", min_rows=2):
    _check_float_array(filters, name, 2, 2)
    if filters.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} filters (rows), got {filters.shape[0]}")


def kernel_filters(kernel: jax.Array) -> jax.Array:
    """The ``C·M`` 2-D filters of a Flax conv kernel ``[kh, kw, C, M]`` as rows ``[C·M, kh·kw]``, output-major
    (PyTorch's ``weight.reshape(-1, kh·kw)`` order).

    >>> kernel_filters(jnp.zeros((3, 3, 2, 4))).shape   # (8, 9)
    """
    _check_kernel(kernel)
    kh, kw, c, m = kernel.shape
    return jnp.transpose(kernel.astype(jnp.float32), (3, 2, 0, 1)).reshape(m * c, kh * kw)


def entropy_max_threshold(n) -> jax.Array:
    """The authors' logistic fit ``h(n)`` of the variance entropy (base 10) of ``n`` random 3x3 filters."""
    l, x0, k, b = 1.2618047, 2.30436435, 0.88767525, -0.31050834
    return l / (1.0 + jnp.exp(-k * (jnp.log2(jnp.asarray(n, jnp.float32)) - x0))) + b


def _sparse_rows(f, eps):
    t = jnp.max(jnp.abs(f)) * eps
    t = jnp.where(t == 0, 1.0, t)  # an all-zero layer: every filter sparse (torchconvquality's t = 1)
    return jnp.all(jnp.abs(f) < t, axis=1)


def filter_sparsity(filters: jax.Array, eps: float = 0.01) -> jax.Array:
    """Fraction of filters (rows) whose every weight is below ``eps · max |filters|`` in magnitude.

    >>> filter_sparsity(kernel_filters(kernel))
    """
    _check_filters(filters, min_rows=1)
    if not 0.0 <= float(eps) < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    return jnp.mean(_sparse_rows(filters.astype(jnp.float32), eps).astype(jnp.float32))


def _variance_entropy(f, keep):
    """(H₁₀(p), H₁₀(p) / h(n_keep)) of the PCA variance ratios of the rows with ``keep`` True."""
    w = keep.astype(jnp.float32)[:, None]
    n = jnp.sum(w)
    mean = jnp.sum(f * w, 0) / jnp.maximum(n, 1.0)
    s = jnp.linalg.svd((f - mean) * w, compute_uv=False)  # zero rows do not change the singular values
    var = s ** 2
    tot = jnp.sum(var)
    p = var / jnp.where(tot > 0, tot, 1.0)
    h = -jnp.sum(jnp.where(p > 0, p * jnp.log10(jnp.where(p > 0, p, 1.0)), 0.0))
    return h, h / entropy_max_threshold(jnp.maximum(n, 1.0))


def variance_entropy(filters: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(H₁₀(p), H₁₀(p) / h(n))``: the base-10 entropy of the PCA explained-variance ratios of the filters (rows)
    and its normalisation by the random-filter fit :func:`entropy_max_threshold`.

    >>> h, h_norm = variance_entropy(kernel_filters(kernel))
    """
    _check_filters(filters)
    f = filters.astype(jnp.float32)
    return _variance_entropy(f, jnp.ones(f.shape[0], bool))


def filter_orthogonality(kernel: jax.Array) -> jax.Array:
    """``1 − Σ|Ŵ Ŵᵀ − I| / (M (M − 1))`` with ``Ŵ`` the ``M`` output filters ``[M, C·kh·kw]`` normalised to unit
    norm (zero rows left as they are): 1 for mutually orthogonal filters, 0 for identical ones.

    >>> filter_orthogonality(kernel)
    """
    _check_kernel(kernel)
    m = kernel.shape[-1]
    if m < 2:
        raise ValueError(f"filter_orthogonality needs at least 2 output channels, got {m}")
    w = jnp.transpose(kernel.astype(jnp.float32), (3, 2, 0, 1)).reshape(m, -1)
    nrm = jnp.linalg.norm(w, axis=1, keepdims=True)
    w = w / jnp.where(nrm == 0, 1.0, nrm)
    g = jnp.dot(w, w.T, precision=jax.lax.Precision.HIGHEST)
    return 1.0 - jnp.sum(jnp.abs(g - jnp.eye(m))) / (m * (m - 1))


def filter_quality(kernel: jax.Array, sparsity_eps: float = 0.01) -> FilterQuality:
    """All degeneration measures of one conv layer (module docstring), as torchconvquality's
    ``measure_conv_weight_quality``. Jit-able (the "clean" subset is a mask, not a gather).

    >>> q = filter_quality(params["stem_conv"]["kernel"]); q.variance_entropy_norm
    """
    _check_kernel(kernel)
    if not 0.0 <= float(sparsity_eps) < 1.0:
        raise ValueError(f"sparsity_eps must be in [0, 1), got {sparsity_eps}")
    if kernel.shape[2] * kernel.shape[3] < 2:
        raise ValueError(f"filter_quality needs at least 2 filters (C·M), got {kernel.shape[2] * kernel.shape[3]}")
    return _filter_quality(kernel, float(sparsity_eps))


@functools.partial(jax.jit, static_argnums=(1,))
def _filter_quality(kernel, sparsity_eps):
    f = kernel_filters(kernel)
    sparse = _sparse_rows(f, sparsity_eps)
    ve, ve_n = _variance_entropy(f, jnp.ones(f.shape[0], bool))
    vc, vc_n = _variance_entropy(f, ~sparse)
    orth = filter_orthogonality(kernel) if kernel.shape[-1] >= 2 else jnp.asarray(jnp.nan, jnp.float32)
    return FilterQuality(jnp.asarray(f.shape[0], jnp.float32), jnp.mean(sparse.astype(jnp.float32)), ve, ve_n, vc,
                         vc_n, orth)


def layer_filter_quality(params: PyTree, *, include: str | Sequence[str] | None = None,
                         exclude: str | Sequence[str] | None = None, kernel_size: tuple[int, int] | None = (3, 3),
                         sparsity_eps: float = 0.01) -> dict[str, FilterQuality]:
    """``{path: FilterQuality}`` for every 4-D ``kernel`` leaf of spatial size ``kernel_size`` (None: any > 1x1)
    selected by ``include`` / ``exclude`` regexes, in tree order (the paper studies 3x3 layers only).

    >>> layer_filter_quality(params)["stem_conv/kernel"].sparsity
    """
    chosen = flatten(select(params, include, exclude))
    out = {}
    for path, leaf in flatten(params).items():
        if not chosen[path] or path.split("/")[-1] != "kernel" or getattr(leaf, "ndim", 0) != 4:
            continue
        ks = tuple(leaf.shape[:2])
        if (kernel_size is not None and ks != tuple(kernel_size)) or ks == (1, 1):
            continue
        out[path] = filter_quality(leaf, sparsity_eps)
    if not out:
        raise ValueError(f"layer_filter_quality: no conv kernel of size {kernel_size} matched")
    return out


# ------------------------------------------------------------------------------------------ distribution shifts


def scale_filters(filters: jax.Array) -> jax.Array:
    """Each filter divided by its own peak magnitude ``max_j |F_ij|`` (all-zero filters unchanged)."""
    _check_filters(filters, min_rows=1)
    return _scale(filters)


@jax.jit
def _scale(filters):
    f = filters.astype(jnp.float32)
    den = jnp.max(jnp.abs(f), axis=1, keepdims=True)
    return f / jnp.where(den == 0, 1.0, den)


def filter_pca(filters: jax.Array) -> FilterPCA:
    """The PCA of the filters (rows): mean, principal directions (rows, by descending variance; sign fixed so the
    largest-magnitude entry of each is positive) and explained-variance ratios.

    >>> pca = filter_pca(scale_filters(kernel_filters(kernel)))
    """
    _check_filters(filters)
    return _pca(filters)


@jax.jit
def _pca(filters):
    f = filters.astype(jnp.float32)
    mean = f.mean(0)
    _, s, vt = jnp.linalg.svd(f - mean, full_matrices=False)
    d = f.shape[1]
    if vt.shape[0] < d:  # fewer filters than dimensions: complete the basis (zero variance)
        q, _ = jnp.linalg.qr(jnp.concatenate([vt.T, jnp.eye(d)], 1))
        vt = q[:, :d].T
        s = jnp.concatenate([s, jnp.zeros(d - s.shape[0], s.dtype)])
    sign = jnp.sign(jnp.take_along_axis(vt, jnp.argmax(jnp.abs(vt), 1)[:, None], 1))
    vt = vt * jnp.where(sign == 0, 1.0, sign)
    var = s ** 2
    tot = jnp.sum(var)
    return FilterPCA(mean, vt, var / jnp.where(tot > 0, tot, 1.0))


def coefficient_histograms(coefs: jax.Array, value_range: tuple[float, float], bins: int = 70) -> jax.Array:
    """``[d, bins]`` probabilities of each coefficient column of ``coefs [N, d]`` over ``value_range`` (NumPy's
    histogram rule: right edge inclusive, values outside dropped): densities, empty bins set to float32 eps, each
    row normalised to sum 1 (the notebook's ``get_discrete_probability_distribution``)."""
    _check_float_array(coefs, "coefs", 2, 2)
    if int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    lo, hi = value_range
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    c = coefs.astype(jnp.float32)
    width = (hi - lo) / bins
    idx = jnp.floor((c - lo) / width).astype(jnp.int32)
    idx = jnp.where(c == hi, bins - 1, idx)
    inside = (c >= lo) & (c <= hi)
    onehot = jax.nn.one_hot(jnp.where(inside, idx, -1), bins, dtype=jnp.float32)  # [N, d, bins]; -1 -> zeros
    counts = onehot.sum(0)
    dens = counts / jnp.maximum(jnp.sum(counts, 1, keepdims=True), 1.0) / width
    dens = jnp.where(dens == 0, _EPS32, dens)
    return dens / jnp.sum(dens, 1, keepdims=True)


def symmetric_kl(p: jax.Array, q: jax.Array) -> jax.Array:
    """``KL(p‖q) + KL(q‖p)`` along the last axis of strictly positive probability arrays."""
    return jnp.sum(p * jnp.log(p / q), -1) + jnp.sum(q * jnp.log(q / p), -1)


def filter_distribution_shift(filters_a: jax.Array, filters_b: jax.Array, *, pca: FilterPCA | None = None,
                              bins: int = 70, value_range: tuple[float, float] | None = None) -> FilterShift:
    """The drift ``D(P, Q)`` between two filter sets ``[Na, d]``, ``[Nb, d]`` (module docstring): peak-scaled,
    projected on ``pca`` (default: fitted on both sets pooled), histogrammed over ``value_range`` (default: the
    min/max of all coefficients) and compared by the variance-weighted symmetric KL.

    >>> filter_distribution_shift(kernel_filters(k_init), kernel_filters(k_trained)).drift
    """
    _check_filters(filters_a, "filters_a", 1)
    _check_filters(filters_b, "filters_b", 1)
    if filters_a.shape[1] != filters_b.shape[1]:
        raise ValueError(f"filter sizes differ: {filters_a.shape[1]} vs {filters_b.shape[1]}")
    if value_range is not None and not float(value_range[0]) < float(value_range[1]):
        raise ValueError(f"value_range must be (lo, hi) with lo < hi, got {value_range}")
    if int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if pca is not None and pca.components.shape[1] != filters_a.shape[1]:
        raise ValueError(f"pca has {pca.components.shape[1]}-D components, filters are {filters_a.shape[1]}-D")
    vr = None if value_range is None else (float(value_range[0]), float(value_range[1]))
    return _shift(filters_a, filters_b, pca, int(bins), vr)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _shift(filters_a, filters_b, pca, bins, value_range):
    a, b = _scale(filters_a), _scale(filters_b)
    if pca is None:
        pca = _pca(jnp.concatenate([a, b]))
    ca = jnp.dot(a - pca.mean, pca.components.T, precision=jax.lax.Precision.HIGHEST)
    cb = jnp.dot(b - pca.mean, pca.components.T, precision=jax.lax.Precision.HIGHEST)
    if value_range is None:
        value_range = (jnp.minimum(ca.min(), cb.min()), jnp.maximum(ca.max(), cb.max()))
    pa = coefficient_histograms(ca, value_range, bins)
    pb = coefficient_histograms(cb, value_range, bins)
    per = symmetric_kl(pa, pb)
    return FilterShift(jnp.sum(pca.explained_variance_ratio * per), per, pca)
