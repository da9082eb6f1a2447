"""Heavy-tailed self-regularization (HT-SR) metrics of weight matrices, as weightwatcher computes them.

Martin & Mahoney, "Implicit Self-Regularization in Deep Neural Networks: Evidence from Random Matrix Theory and
Implications for Learning" (JMLR 2021) and "Predicting trends in the quality of state-of-the-art neural networks
without access to training or testing data" (Nature Communications 2021); the rules below are transcribed from the
reference implementation, the ``weightwatcher`` package 0.7.7 (``WeightWatcher.analyze`` with its defaults:
``combined_eigenvalues``, ``apply_normalize_Wmats``, ``apply_norm_metrics`` and ``WW_powerlaw.WWFit``), and are
checked against its output (``scripts/make_weightwatcher_reference.py``).

**ESD.** For a matrix ``W`` (``N x M``, ``N >= M`` after a transpose) the empirical spectral density is the ``M``
eigenvalues ``λ = eig(WᵀW)`` (weightwatcher's default: not divided by ``N``; ``normalize=True`` gives the eigenvalues
of ``WᵀW / N``). A conv kernel (Flax layout ``[kh, kw, c_in, c_out]``) is cut into its ``kh·kw`` slices
``W[i, j] (c_in x c_out)`` as weightwatcher does (``conv2D_Wmats``), each slice is scaled by ``sqrt(1/2)``
(``conv2d_norm``) and the ``kh·kw·min(c_in, c_out)`` eigenvalues are pooled into one ESD. Kernels of other rank
``>= 3`` are sliced over all leading axes the same way. Eigenvalues come from ``jnp.linalg.eigvalsh`` of the
smaller Gram matrix in float32 (negative round-off clipped to 0).

**Power-law fit** (``fit_power_law``, weightwatcher's ``WWFit``): the eigenvalues ``λ > thresh = 1e-5`` sorted
ascending, ``λ_(0) <= ... <= λ_(N-1)``. For every candidate ``xmin = λ_(i)``, ``i < N - 1``, with tail size
``n = N - i``::

    α_i = 1 + n / Σ_{j>=i} ln(λ_(j) / λ_(i))                               (continuous power-law MLE)
    D_i = max_{j>=i} | 1 - (λ_(j) / λ_(i))^(1-α_i) - (j - i) / n |          (KS distance; 1 if α_i <= 1)

and the fit keeps the ``i`` of minimum ``D_i`` (first on ties), ``σ = (α - 1) / sqrt(n)``. When ``N < 20``
weightwatcher switches to its small-N rule (``fit_powerlaw_smallN``), reproduced here: ``α_i = 1 + (n-1) / Σ ...``
(bias-corrected), candidates need ``n >= 8``, and ``i`` minimizes ``D_i - 0.868 / sqrt(n)``.

**Hill estimator** (``hill_alpha``): the fixed-``xmin`` fit TempBalance / FARMS use (their ``pl_fitting='median'``,
``xmin_pos=2``): ``i = floor(N / xmin_pos)``, ``α = 1 + n / Σ_{j>=i} ln(λ_(j)/λ_(i))`` with ``n = N - i``. This is
Hill's (1975) estimator ``1 + k / Σ_{l=1..k} ln(λ_(N-l) / λ_(N-k-1))`` on the ``k = n - 1`` order statistics above
``λ_(i)``, except that, as in the reference code, the numerator counts ``xmin`` too (``n = k + 1``).

**Norm metrics** (``apply_norm_metrics``; note weightwatcher's names: its "spectral norm" is ``λ_max = ‖W‖₂²`` and
its "norm" is ``Σλ = ‖W‖_F²``)::

    norm = Σ λ              log_norm = log10 norm
    spectral_norm = λ_max   log_spectral_norm = log10 λ_max
    alpha_weighted = α̂ = α · log10 λ_max
    stable_rank = Σ λ / λ_max = ‖W‖_F² / ‖W‖₂²       log_alpha_norm = log10 Σ λ^α

API::

    eigs = esd(kernel)                                # ascending eigenvalues
    fit = fit_power_law(eigs); fit.alpha              # or hill_alpha(eigs)
    m = matrix_metrics(kernel)                        # SpectralMetrics (all fields jnp scalars), jit-able
    per_layer = layer_metrics(params)                 # {"Dense_0/kernel": SpectralMetrics, ...}

Float32 tolerances: the eigenvalues of the Gram matrix carry an absolute error of order ``M · eps32 · λ_max``
(measured <= 3.3e-7 ``λ_max`` on the reference matrices), the fit sums ``n`` logarithms of ratios (error ~``n ·
eps32``), so α and the norm metrics match weightwatcher's float64 values to a few 1e-6 relative (measured
<= 2.3e-6) as long as the same ``xmin`` wins the KS minimum (the test checks that it does). An ESD with no
eigenvalue above ``thresh`` (an all-zero matrix) gives ``α = 1, D = 1`` where weightwatcher reports a failed fit.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import flatten, is_concrete

PyTree = Any

__all__ = ["EVALS_THRESH", "PowerLawFit", "SpectralMetrics", "esd", "fit_power_law", "hill_alpha", "esd_metrics",
           "matrix_metrics", "layer_metrics", "select_matrices"]

EVALS_THRESH = 1e-5  # weightwatcher's EVALS_THRESH: eigenvalues <= this are left out of the power-law fit
SMALL_N = 20  # weightwatcher's SMALL_N_CUTOFF: fewer eigenvalues than this use the small-N fit
_SMALL_N_KMIN = 8  # fit_powerlaw_smallN's k_min
_VMAP_MAX = 2048  # ESDs up to this size evaluate all candidate xmins at once (num_evals² floats)
_ROWS_PER_BATCH = 256  # larger ones in batches of this many candidates (memory: rows x num_evals floats)
_HOST_CHECK_MAX = 1 << 20  # inputs up to this many elements are checked for NaN/Inf on the host


class PowerLawFit(NamedTuple):
    """A power-law fit of the tail of an ESD: exponent ``alpha``, lower cut ``xmin`` (an eigenvalue), KS distance
    ``D``, ``sigma = (alpha - 1) / sqrt(n)``, ``num_pl_spikes`` (eigenvalues ``>= xmin``) and ``num_evals`` (the
    eigenvalues given, before the threshold). All float32 / int32 jnp scalars."""

    alpha: jax.Array
    xmin: jax.Array
    D: jax.Array
    sigma: jax.Array
    num_pl_spikes: jax.Array
    num_evals: jax.Array


class SpectralMetrics(NamedTuple):
    """weightwatcher's per-layer columns (see the module docstring for each formula)."""

    alpha: jax.Array
    alpha_weighted: jax.Array
    D: jax.Array
    xmin: jax.Array
    sigma: jax.Array
    num_pl_spikes: jax.Array
    num_evals: jax.Array
    norm: jax.Array
    log_norm: jax.Array
    spectral_norm: jax.Array
    log_spectral_norm: jax.Array
    stable_rank: jax.Array
    log_alpha_norm: jax.Array


# --------------------------------------------------------------------------------------------------- validation


def _check_float_array(x, name: str, min_ndim: int, max_ndim: int | None = None) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim < min_ndim or (max_ndim is not None and x.ndim > max_ndim):
        want = f"{min_ndim}-D" if max_ndim == min_ndim else f">= {min_ndim}-D"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    if 0 in x.shape:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if is_concrete(x):
        if x.size <= _HOST_CHECK_MAX or isinstance(x, np.ndarray):
            ok = np.isfinite(np.asarray(x, np.float32)).all()
        else:  # large device arrays: one reduction where they live (sharded arrays stay sharded)
            ok = bool(jnp.isfinite(x).all())
        if not ok:
            raise ValueError(f"{name} holds NaN or Inf")


def _check_eigs(eigs, name: str = "eigs") -> None:
    _check_float_array(eigs, name, 1, 1)
    if eigs.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 eigenvalues for a power-law fit, got {eigs.shape[0]}")


def _check_thresh(thresh) -> None:
    if thresh is not None and not (float(thresh) >= 0.0):
        raise ValueError(f"thresh must be >= 0 or None, got {thresh}")


# ------------------------------------------------------------------------------------------------------- the ESD


def _slices(w: jax.Array) -> jax.Array:
    """``[S, a, b]``: one slice for a matrix, ``prod(leading axes)`` slices for a conv kernel."""
    if w.ndim == 2:
        return w[None]
    return w.reshape((-1,) + w.shape[-2:])


def esd(w: jax.Array, *, normalize: bool = False, conv2d_norm: bool = True) -> jax.Array:
    """The empirical spectral density of ``w``: eigenvalues of ``WᵀW`` (ascending, float32), pooled over the slices
    of a conv kernel (each scaled by ``sqrt(1/2)`` if ``conv2d_norm``). ``normalize`` divides by ``N``, the larger
    matrix dimension (the eigenvalues of ``WᵀW / N``). A 2-D ``w`` gives ``min(w.shape)`` eigenvalues."""
    _check_float_array(w, "w", 2)
    return _esd(w, normalize=bool(normalize), conv2d_norm=bool(conv2d_norm))


@functools.partial(jax.jit, static_argnames=("normalize", "conv2d_norm"))
def _esd(w, *, normalize, conv2d_norm):
    s = _slices(jnp.asarray(w).astype(jnp.float32))
    a, b = s.shape[1:]
    ev = _gram_eigs(s)
    if w.ndim > 2 and conv2d_norm:
        ev = ev * 0.5
    if normalize:
        ev = ev / max(a, b)
    return jnp.sort(ev)


def _gram_eigs(s: jax.Array) -> jax.Array:
    """Squared singular values of each ``[S, a, b]`` slice, flattened: eigvalsh of the smaller Gram matrix (float32;
    negative round-off clipped to 0)."""
    a, b = s.shape[1:]
    if a >= b:
        gram = jnp.einsum("sab,sac->sbc", s, s, precision=jax.lax.Precision.HIGHEST)
    else:
        gram = jnp.einsum("sba,sca->sbc", s, s, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.linalg.eigvalsh(gram), 0.0).reshape(-1)


# ------------------------------------------------------------------------------------------------ power-law fits


def _tail_stats(lam, log_lam, i, alpha_fn):
    """For candidate index ``i`` (into the ascending ``lam``): tail size ``n``, ``s = Σ_{j>=i} ln(λ_j/λ_i)``,
    ``α = alpha_fn(n, s)`` and the KS distance ``D`` of the tail against the power law."""
    n_all = lam.shape[0]
    idx = jnp.arange(n_all)
    in_tail = idx >= i
    diff = jnp.where(in_tail, log_lam - log_lam[i], 0.0)
    n = (n_all - i).astype(jnp.float32)
    s = jnp.sum(diff)
    alpha = alpha_fn(n, s)
    theory = 1.0 - jnp.exp((1.0 - alpha) * diff)
    empirical = (idx - i).astype(jnp.float32) / n
    d = jnp.max(jnp.where(in_tail, jnp.abs(theory - empirical), 0.0))
    return n, s, alpha, d


def _thresh(thresh) -> jax.Array:
    """The threshold as a traced float32 scalar (None: keep everything), so that changing it does not recompile."""
    return jnp.float32(-jnp.inf if thresh is None else thresh)


def _prepare(eigs, thresh):
    lam = jnp.sort(jnp.asarray(eigs).astype(jnp.float32))
    valid = lam > thresh
    first = lam.shape[0] - jnp.sum(valid)  # ascending: the thresholded values are a prefix
    log_lam = jnp.log(jnp.where(valid, lam, 1.0))
    return lam, log_lam, first


def _finish(lam, i, alpha, d, n):
    num_spikes = jnp.sum(lam >= lam[i]).astype(jnp.int32)
    sigma = (alpha - 1.0) / jnp.sqrt(n)
    return PowerLawFit(alpha, lam[i], d, sigma, num_spikes, jnp.int32(lam.shape[0]))


def fit_power_law(eigs: jax.Array, *, thresh: float | None = EVALS_THRESH) -> PowerLawFit:
    """weightwatcher's power-law fit: ``xmin`` by minimum KS distance over all candidate eigenvalues (module
    docstring). ``eigs``: a 1-D array of eigenvalues (any order). Jit-able; ``O(N²)`` work in batches of rows."""
    _check_eigs(eigs)
    _check_thresh(thresh)
    return _fit_power_law(eigs, _thresh(thresh))


@jax.jit
def _fit_power_law(eigs, thresh):
    lam, log_lam, first = _prepare(eigs, thresh)
    n_all = lam.shape[0]
    n_data = n_all - first

    def row(i):
        def std_alpha(n, s):
            return 1.0 + n / s

        def bc_alpha(n, s):
            return 1.0 + (n - 1.0) / s

        n, s, a_std, d_std = _tail_stats(lam, log_lam, i, std_alpha)
        _, _, a_bc, d_bc = _tail_stats(lam, log_lam, i, bc_alpha)
        cand = (i >= first) & (i < n_all - 1)
        d_std = jnp.where(a_std > 1.0, d_std, 1.0)  # WWFit: Ds start at 1, set only when alpha > 1
        obj_std = jnp.where(cand, d_std, jnp.inf)
        ok_bc = cand & (n >= _SMALL_N_KMIN) & (s > 1e-12) & (a_bc > 1.0)
        obj_bc = jnp.where(ok_bc, d_bc - 0.868 / jnp.sqrt(n), jnp.inf)
        return a_std, d_std, obj_std, a_bc, d_bc, obj_bc, n, s

    if n_all <= _VMAP_MAX:  # all candidate rows at once (n² floats); larger ESDs go in batches of rows
        rows = jax.vmap(row)(jnp.arange(n_all))
    else:
        rows = jax.lax.map(row, jnp.arange(n_all), batch_size=_ROWS_PER_BATCH)
    a_std, d_std, obj_std, a_bc, d_bc, obj_bc, ns, ss = rows
    i_std = jnp.argmin(obj_std)
    i_bc = jnp.argmin(obj_bc)
    bc_any = jnp.isfinite(obj_bc[i_bc])
    # small-N fallback (no admissible candidate): the whole thresholded ESD is the tail (row ``first``)
    i_fb = jnp.minimum(first, n_all - 1)
    degenerate = ss[i_fb] <= 1e-12
    a_fb = jnp.where(degenerate, 1.0, a_bc[i_fb])
    d_fb = jnp.where(degenerate, 1.0, d_bc[i_fb])
    n_fb = ns[i_fb]

    small = n_data < SMALL_N
    i = jnp.where(small, jnp.where(bc_any, i_bc, i_fb), i_std)
    alpha = jnp.where(small, jnp.where(bc_any, a_bc[i_bc], a_fb), a_std[i_std])
    d = jnp.where(small, jnp.where(bc_any, d_bc[i_bc], d_fb), d_std[i_std])
    n = jnp.where(small & ~bc_any, n_fb, ns[i])
    return _finish(lam, i, alpha, d, n)  # (degenerate fallback: alpha = 1 gives sigma = 0, as weightwatcher)


def hill_alpha(eigs: jax.Array, *, xmin_pos: float = 2.0, thresh: float | None = None) -> PowerLawFit:
    """The Hill estimator with ``xmin = λ_(floor(N / xmin_pos))`` (TempBalance / FARMS ``pl_fitting='median'``;
    module docstring). ``thresh=None`` fits all eigenvalues (the reference's ``filter_zeros=False``); a number
    drops the eigenvalues ``<= thresh`` first. Jit-able, ``O(N)``."""
    _check_eigs(eigs)
    _check_thresh(thresh)
    if not float(xmin_pos) > 1.0:
        raise ValueError(f"xmin_pos must be > 1 (xmin = the floor(N / xmin_pos)-th eigenvalue), got {xmin_pos}")
    return _hill_alpha(eigs, jnp.float32(xmin_pos), _thresh(thresh))


@jax.jit
def _hill_alpha(eigs, xmin_pos, thresh):
    lam, log_lam, first = _prepare(eigs, thresh)
    n_data = lam.shape[0] - first
    i = first + jnp.floor(n_data / xmin_pos).astype(jnp.int32)
    i = jnp.clip(i, 0, lam.shape[0] - 2)
    n, _, alpha, d = _tail_stats(lam, log_lam, i, lambda n, s: 1.0 + n / s)
    return _finish(lam, i, alpha, d, n)


# ------------------------------------------------------------------------------------------------- the metrics


def esd_metrics(eigs: jax.Array, *, fit: Literal["ks", "hill"] = "ks", thresh: float | None = EVALS_THRESH,
                xmin_pos: float = 2.0) -> SpectralMetrics:
    """All of weightwatcher's metrics from an ESD: the power-law fit (``fit="ks"``: :func:`fit_power_law` with
    ``thresh``; ``"hill"``: :func:`hill_alpha` with ``xmin_pos``, no threshold) and the norm metrics over all
    eigenvalues. Jit-able."""
    _check_metric_args(fit, thresh, xmin_pos)
    _check_eigs(eigs)
    return _esd_metrics(eigs, _thresh(thresh), jnp.float32(xmin_pos), fit=fit)


def _check_metric_args(fit, thresh, xmin_pos) -> None:
    if fit not in ("ks", "hill"):
        raise ValueError(f"fit must be 'ks' or 'hill', got {fit!r}")
    _check_thresh(thresh)
    if not float(xmin_pos) > 1.0:
        raise ValueError(f"xmin_pos must be > 1, got {xmin_pos}")


@functools.partial(jax.jit, static_argnames=("fit",))
def _esd_metrics(eigs, thresh, xmin_pos, *, fit):
    if fit == "ks":
        pl = _fit_power_law(eigs, thresh)
    else:
        pl = _hill_alpha(eigs, xmin_pos, _thresh(None))
    lam = jnp.asarray(eigs).astype(jnp.float32)
    norm = jnp.sum(lam)
    lmax = jnp.max(lam)
    log_lmax = jnp.log10(lmax)
    # log10 Σ λ^α computed as α·log10 λmax + log10 Σ (λ/λmax)^α (no float32 overflow for large α or λ)
    log_alpha_norm = pl.alpha * log_lmax + jnp.log10(jnp.sum((lam / lmax) ** pl.alpha))
    return SpectralMetrics(
        alpha=pl.alpha, alpha_weighted=pl.alpha * log_lmax, D=pl.D, xmin=pl.xmin, sigma=pl.sigma,
        num_pl_spikes=pl.num_pl_spikes, num_evals=pl.num_evals, norm=norm, log_norm=jnp.log10(norm),
        spectral_norm=lmax, log_spectral_norm=log_lmax, stable_rank=norm / lmax, log_alpha_norm=log_alpha_norm)


def matrix_metrics(w: jax.Array, *, fit: Literal["ks", "hill"] = "ks", thresh: float | None = EVALS_THRESH,
                   xmin_pos: float = 2.0, normalize: bool = False, conv2d_norm: bool = True) -> SpectralMetrics:
    """``esd_metrics(esd(w))``: weightwatcher's row for one Dense / Conv kernel (Flax layout). Jit-able."""
    _check_float_array(w, "w", 2)
    _check_metric_args(fit, thresh, xmin_pos)
    return _matrix_metrics(w, _thresh(thresh), jnp.float32(xmin_pos), fit=fit, normalize=bool(normalize),
                           conv2d_norm=bool(conv2d_norm))


@functools.partial(jax.jit, static_argnames=("fit", "normalize", "conv2d_norm"))
def _matrix_metrics(w, thresh, xmin_pos, *, fit, normalize, conv2d_norm):
    return _esd_metrics(_esd(w, normalize=normalize, conv2d_norm=conv2d_norm), thresh, xmin_pos, fit=fit)


def _num_evals(shape) -> int:
    return int(np.prod(shape[:-2], dtype=np.int64)) * min(shape[-2:])


def select_matrices(params: PyTree, include: str, exclude: str | None, min_evals: int,
                    max_evals: int | None = None) -> dict[str, Any]:
    """The leaves the per-layer walks analyse, ``{path: leaf}`` in tree order: path matches ``include`` and not
    ``exclude``, floating, ``ndim >= 2``, with ``min_evals <= (number of eigenvalues) <= max_evals`` (no upper
    bound for ``None``); each chosen leaf is then checked finite (the error names its path) before any work."""
    inc = re.compile(include)
    exc = re.compile(exclude) if exclude else None
    chosen = {}
    for path, leaf in flatten(params).items():
        if not inc.search(path) or (exc is not None and exc.search(path)):
            continue
        if getattr(leaf, "ndim", 0) < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        n = _num_evals(leaf.shape)
        if n >= min_evals and (max_evals is None or n <= max_evals):
            chosen[path] = leaf
    for path, leaf in chosen.items():
        _check_float_array(leaf, path, 2)
    return chosen


def layer_metrics(params: PyTree, *, include: str = r"(kernel|embedding)$", exclude: str | None = None,
                  min_evals: int = 8, max_evals: int = 15000, **kwargs) -> dict[str, SpectralMetrics]:
    """:func:`matrix_metrics` for every leaf of ``params`` whose path matches ``include`` (and not ``exclude``) and
    has ``ndim >= 2``: ``{path: SpectralMetrics}`` in tree order. As weightwatcher, layers with fewer than
    ``min_evals`` or more than ``max_evals`` eigenvalues are skipped. ``kwargs`` go to :func:`matrix_metrics`
    (``fit``, ``thresh``, ``xmin_pos``, ``normalize``, ``conv2d_norm``); each distinct shape compiles once."""
    if min_evals < 2 or max_evals < min_evals:
        raise ValueError(f"need 2 <= min_evals <= max_evals, got min_evals={min_evals}, max_evals={max_evals}")
    chosen = select_matrices(params, include, exclude, min_evals, max_evals)
    return {path: matrix_metrics(leaf, **kwargs) for path, leaf in chosen.items()}
