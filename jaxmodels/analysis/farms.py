"""FARMS: eigenspectrum analysis without aspect-ratio bias, and the layer-wise hyper-parameters derived from α.

Hu, Goel, Killiakov & Yang, "Eigenspectrum Analysis of Neural Networks without Aspect Ratio Bias" (ICML 2025).
Rules transcribed from the authors' code (github.com/HUST-AI-HYZ/FARMS, commit 834612b: ``sampling.py``
``fixed_sampling`` / ``matrix_size_dependent_sampling``, ``tempbalance_farms.py`` ``net_esd_estimator`` /
``get_layer_temps``, ``LLM_Pruning/lib/prune.py`` ``ww_sparsity``).

**Fixed-aspect-ratio subsampling.** A Dense weight is taken as ``W [rows, cols] = [fan_out, fan_in]`` (the
reference's torch layout: the Flax kernel transposed). Submatrices are ``m x c`` with ``c = int(m · Q)``
(``m = num_row_samples``, ``Q = q_ratio``). The authors' settings: image classification (TempBalance + FARMS,
``farms_imagecls_main.txt``) ``m = 100, Q = 1, sampling_ops_per_dim = 9`` (the defaults here) with the Hill fit;
LLM pruning ``m = 2000, Q = 1, 10 or 15`` windows per axis with weightwatcher's ``xmin_peak`` fit (that
histogram-peak ``xmin`` rule is not implemented here). With ``sampling_ops_per_dim = s`` (``fixed_sampling``)::

    row_step = max(1, (rows - m) // (s - 1))      n_row = min(s, max(1, (rows - m) // row_step + 1))
    row_start(i) = min(i · row_step, rows - m)    (same for the columns with c)

and with ``sampling_ops_per_dim=None`` (``matrix_size_dependent_sampling``) a sliding window with stride
``step_size``: ``n_row = max(1, (rows - m) // step_size + 1)``, ``row_start(i) = i · step_size``. The eigenvalues
``σ²`` of all ``n_row · n_col`` windows are pooled into one ESD, fitted once (``pl_fitting='median'``: the Hill
estimator with ``xmin_pos = 2``, :func:`jaxmodels.analysis.spectral.hill_alpha`; or ``fit="ks"``, weightwatcher's
fit), and the norm metrics are computed on the pooled ESD, as in ``analysis_esd``.

**Conv kernels** (Flax ``[kh, kw, c_in, c_out]``), as the reference's CNN branch: slices ``W_ij`` (``c_out x c_in``,
transposed so that ``rows >= cols``); if ``Q > 1``: ``m = cols // Q, c = cols``, else ``m = cols,
c = cols // (1/Q)``; for each of the ``rows // cols`` row blocks ``b`` the submatrices
``sqrt(conv_norm) · W_ij[b·m:(b+1)·m, :c]`` of all slices are pooled and fitted, and the layer's metrics are the
mean over blocks (``conv_norm = 0.5``).

Deviation: when a layer is smaller than the window (``rows < m`` or ``cols < int(m·Q)``) the reference's slicing
silently returns a smaller, differently shaped window; here ``m`` is reduced to ``min(m, rows, floor(cols / Q))`` so
that the aspect ratio stays ``Q`` (only small layers are affected).

**α → learning rates** (TempBalance, ``get_layer_temps``; ratios multiply the base learning rate; TempBalance
recomputes them every epoch and by default leaves the first and last layers at the base rate: pass the layers to
schedule, call again to update)::

    linear:  interp(α_l, [min α, max α], [lr_min_ratio, lr_max_ratio])      (the paper's 'tb_linear_map')
    sqrt:    L · sqrt(α_l) / Σ sqrt(α)            log2: L · log2(α_l) / Σ log2(α)
    step:    lr_min + (lr_max - lr_min) · rank(α_l) / L
    sigmoid: 10^(s · (1 / (1 + exp(-τ (α_l - mean α))) - 1/2))              (TB_Sigmoid: Liu, Hu et al.,
             "Model Balancing Helps Low-data Training and Fine-tuning", EMNLP 2024, Eq. 3-4: τ = 10 works
             best there; s is tuned per task and has no published default, 1.0 here)

**α → pruning ratios** (AlphaPruning's mapping as FARMS's LLM code uses it, ``ww_sparsity``)::

    r_l = (α_l - min α) / (max α - min α) · (s2 - s1) + s1,   r_l <- r_l · sparsity · Σ P / Σ P_l r_l,
    r_l <- cap if r_l > 1          (P_l = parameter count; the reference caps at 0.998)

API::

    eigs = farms_esd(kernel, num_row_samples=100)            # pooled, ascending
    m = farms_metrics(kernel)                                # SpectralMetrics of the pooled ESD (jit-able)
    res = layer_farms(params)                                # {path: FarmsResult(farms=..., full=...)}
    scales = lr_scales_from_alpha({p: r.farms.alpha for p, r in res.items()}, method="linear")
    tx = optax.chain(optax.sgd(lr), scale_by_layer(layer_scale_tree(params, scales)))
    ratios = pruning_ratios_from_alpha(alphas, sizes, sparsity=0.5)
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.analysis.spectral import (
    EVALS_THRESH,
    SpectralMetrics,
    _check_float_array,
    _check_metric_args,
    _esd_metrics,
    _gram_eigs,
    _matrix_metrics,
    _slices,
    _thresh,
    select_matrices,
)
from jaxmodels.tree import flatten, map_with_path

PyTree = Any

__all__ = ["FarmsResult", "window_starts", "farms_esd", "farms_metrics", "layer_farms", "lr_scales_from_alpha",
           "layer_scale_tree", "scale_by_layer", "pruning_ratios_from_alpha"]


class FarmsResult(NamedTuple):
    """One layer: the metrics of FARMS's pooled submatrix ESD and of the full matrix (same fit)."""

    farms: SpectralMetrics
    full: SpectralMetrics


def _check_sampling(num_row_samples, q_ratio, sampling_ops_per_dim, step_size) -> None:
    if int(num_row_samples) < 1:
        raise ValueError(f"num_row_samples must be >= 1, got {num_row_samples}")
    if not float(q_ratio) > 0:
        raise ValueError(f"q_ratio must be > 0, got {q_ratio}")
    if sampling_ops_per_dim is not None and int(sampling_ops_per_dim) < 2:
        raise ValueError(f"sampling_ops_per_dim must be >= 2 or None, got {sampling_ops_per_dim}")
    if sampling_ops_per_dim is None and int(step_size) < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")


def window_starts(size: int, window: int, sampling_ops_per_dim: int | None = 9, step_size: int = 10) -> list[int]:
    """Start offsets of the windows along one axis of length ``size`` (module docstring; ``window <= size``)."""
    if not 1 <= window <= size:
        raise ValueError(f"window must be in [1, {size}], got {window}")
    if sampling_ops_per_dim is None:
        return [i * step_size for i in range(max(1, (size - window) // step_size + 1))]
    step = max(1, (size - window) // (sampling_ops_per_dim - 1))
    count = min(sampling_ops_per_dim, max(1, (size - window) // step + 1))
    return [min(i * step, size - window) for i in range(count)]


def _window_shape(rows: int, cols: int, m: int, q: float) -> tuple[int, int]:
    m = max(1, min(m, rows, int(cols / q)))
    return m, max(1, int(m * q))


def _dense_windows(w, num_row_samples, q_ratio, sampling_ops_per_dim, step_size):
    """``[windows, m, c]``: every window of the ``[fan_out, fan_in]`` matrix, gathered at once (static indices)."""
    mat = jnp.asarray(w).astype(jnp.float32).T  # [fan_out, fan_in], the reference's torch layout
    rows, cols = mat.shape
    m, c = _window_shape(rows, cols, int(num_row_samples), float(q_ratio))
    rs = window_starts(rows, m, sampling_ops_per_dim, step_size)
    cs = window_starts(cols, c, sampling_ops_per_dim, step_size)
    r_idx = np.asarray([[r + i for i in range(m)] for r in rs for _ in cs], np.int32)  # [windows, m]
    c_idx = np.asarray([[s + j for j in range(c)] for _ in rs for s in cs], np.int32)  # [windows, c]
    return mat[r_idx[:, :, None], c_idx[:, None, :]]


def _conv_blocks(w, q_ratio, conv_norm):
    """``[blocks, slices, m, c]`` for a conv kernel: the reference's CNN branch (module docstring)."""
    s = _slices(jnp.asarray(w).astype(jnp.float32))  # [S, c_in, c_out]
    s = jnp.swapaxes(s, 1, 2)  # [S, c_out, c_in]: torch's W[:, :, i, j]
    if s.shape[1] < s.shape[2]:
        s = jnp.swapaxes(s, 1, 2)
    rows, cols = s.shape[1:]
    q = float(q_ratio)
    m, c = (max(1, int(cols // q)), cols) if q > 1 else (cols, max(1, int(cols // (1 / q))))
    blocks = max(1, rows // cols)
    subs = [s[:, b * m:(b + 1) * m, :c] for b in range(blocks) if (b + 1) * m <= rows]
    return jnp.stack(subs) * np.float32(np.sqrt(conv_norm))


def farms_esd(w: jax.Array, *, num_row_samples: int = 100, q_ratio: float = 1.0,
              sampling_ops_per_dim: int | None = 9, step_size: int = 10, conv_norm: float = 0.5) -> jax.Array:
    """FARMS's pooled ESD of ``w`` (ascending, float32): squared singular values of all fixed-aspect-ratio windows
    of a Dense kernel (module docstring). For a conv kernel, the ESD of each row block, ``[blocks, n]``.
    Jit-able (the windows are static slices)."""
    _check_float_array(w, "w", 2)
    sampling = _sampling(num_row_samples, q_ratio, sampling_ops_per_dim, step_size, conv_norm)
    return _farms_esd(w, sampling=sampling)


def _sampling(num_row_samples, q_ratio, sampling_ops_per_dim, step_size, conv_norm) -> tuple:
    _check_sampling(num_row_samples, q_ratio, sampling_ops_per_dim, step_size)
    if not float(conv_norm) > 0:
        raise ValueError(f"conv_norm must be > 0, got {conv_norm}")
    ops = None if sampling_ops_per_dim is None else int(sampling_ops_per_dim)
    return int(num_row_samples), float(q_ratio), ops, int(step_size), float(conv_norm)


@functools.partial(jax.jit, static_argnames=("sampling",))
def _farms_esd(w, *, sampling):
    num_row_samples, q_ratio, ops, step_size, conv_norm = sampling
    if w.ndim == 2:
        return jnp.sort(_gram_eigs(_dense_windows(w, num_row_samples, q_ratio, ops, step_size)))
    blocks = _conv_blocks(w, q_ratio, conv_norm)
    return jnp.sort(jax.vmap(_gram_eigs)(blocks), axis=-1)


def farms_metrics(w: jax.Array, *, fit: Literal["hill", "ks"] = "hill", xmin_pos: float = 2.0,
                  thresh: float | None = EVALS_THRESH, num_row_samples: int = 100, q_ratio: float = 1.0,
                  sampling_ops_per_dim: int | None = 9, step_size: int = 10,
                  conv_norm: float = 0.5) -> SpectralMetrics:
    """The metrics of FARMS's pooled ESD (``fit="hill"``: the paper's image-classification setting; ``"ks"``:
    weightwatcher's fit with ``thresh``). Conv kernels: the mean over row blocks. Jit-able."""
    _check_float_array(w, "w", 2)
    _check_metric_args(fit, thresh, xmin_pos)
    sampling = _sampling(num_row_samples, q_ratio, sampling_ops_per_dim, step_size, conv_norm)
    return _farms_metrics(w, _thresh(thresh), jnp.float32(xmin_pos), fit=fit, sampling=sampling)


@functools.partial(jax.jit, static_argnames=("fit", "sampling"))
def _farms_metrics(w, thresh, xmin_pos, *, fit, sampling):
    eigs = _farms_esd(w, sampling=sampling)

    def one(e):
        return _esd_metrics(e, thresh, xmin_pos, fit=fit)

    if eigs.ndim == 1:
        return one(eigs)
    per_block = jax.vmap(one)(eigs)
    return jax.tree_util.tree_map(lambda x: jnp.mean(x.astype(jnp.float32), axis=0), per_block)


@functools.partial(jax.jit, static_argnames=("fit", "sampling"))
def _farms_and_full(w, thresh, xmin_pos, *, fit, sampling):
    full = _matrix_metrics(w, thresh, xmin_pos, fit=fit, normalize=False, conv2d_norm=True)
    return FarmsResult(_farms_metrics(w, thresh, xmin_pos, fit=fit, sampling=sampling), full)


def layer_farms(params: PyTree, *, include: str = r"kernel$", exclude: str | None = None, min_evals: int = 2,
                fit: Literal["hill", "ks"] = "hill", xmin_pos: float = 2.0, thresh: float | None = EVALS_THRESH,
                num_row_samples: int = 100, q_ratio: float = 1.0, sampling_ops_per_dim: int | None = 9,
                step_size: int = 10, conv_norm: float = 0.5) -> dict[str, FarmsResult]:
    """:func:`farms_metrics` and the same fit on the full matrix (:func:`jaxmodels.analysis.spectral.esd`, conv
    slices with ``conv2d_norm``) for every ``ndim >= 2`` floating leaf matching ``include`` (not ``exclude``) with at
    least ``min_evals`` full-matrix eigenvalues: ``{path: FarmsResult}``. One compilation per distinct shape."""
    _check_metric_args(fit, thresh, xmin_pos)
    sampling = _sampling(num_row_samples, q_ratio, sampling_ops_per_dim, step_size, conv_norm)
    chosen = select_matrices(params, include, exclude, max(2, min_evals))
    t, xp = _thresh(thresh), jnp.float32(xmin_pos)
    return {path: _farms_and_full(leaf, t, xp, fit=fit, sampling=sampling) for path, leaf in chosen.items()}


# ------------------------------------------------------------------------------------------- α -> hyper-params


def _alpha_vector(alphas: Mapping[str, Any]) -> tuple[list[str], jax.Array]:
    if not isinstance(alphas, Mapping) or len(alphas) == 0:
        raise ValueError("alphas must be a non-empty mapping {layer path: alpha}")
    keys = list(alphas)
    vals = jnp.stack([jnp.asarray(alphas[k], jnp.float32).reshape(()) for k in keys])
    return keys, vals


def lr_scales_from_alpha(alphas: Mapping[str, Any], *, method: str = "linear", lr_min_ratio: float = 0.5,
                         lr_max_ratio: float = 1.5, s: float = 1.0, tau: float = 10.0) -> dict[str, jax.Array]:
    """Per-layer learning-rate ratios (multiply the base learning rate) from per-layer α: TempBalance's
    ``tb_linear_map`` (``"linear"``), ``"sqrt"``, ``"log2"``, ``"step"``, and TB_Sigmoid (``"sigmoid"``, with ``s``
    and ``tau``); module docstring. Higher α (less heavy-tailed, "under-trained") gets a larger ratio."""
    if method not in ("linear", "sqrt", "log2", "step", "sigmoid"):
        raise ValueError(f"method must be linear, sqrt, log2, step or sigmoid, got {method!r}")
    if not 0.0 < lr_min_ratio <= lr_max_ratio:
        raise ValueError(f"need 0 < lr_min_ratio <= lr_max_ratio, got {lr_min_ratio}, {lr_max_ratio}")
    keys, a = _alpha_vector(alphas)
    n = a.shape[0]
    if method == "linear":
        r = jnp.interp(a, jnp.stack([a.min(), a.max()]), jnp.array([lr_min_ratio, lr_max_ratio], jnp.float32))
    elif method == "sqrt":
        r = jnp.sqrt(a) / jnp.sum(jnp.sqrt(a)) * n
    elif method == "log2":
        r = jnp.log2(a) / jnp.sum(jnp.log2(a)) * n
    elif method == "step":
        rank = jnp.argsort(jnp.argsort(a))  # the reference assigns the i-th smallest α the i-th ratio
        r = lr_min_ratio + (lr_max_ratio - lr_min_ratio) * rank.astype(jnp.float32) / n
    else:
        r = 10.0 ** (s * (jax.nn.sigmoid(tau * (a - a.mean())) - 0.5))
    return {k: r[i] for i, k in enumerate(keys)}


def _module_of(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else path


def layer_scale_tree(params: PyTree, scales: Mapping[str, Any], default: float = 1.0) -> PyTree:
    """A tree shaped like ``params`` holding each leaf's scale: every leaf of the module of a key of ``scales``
    (``"Dense_1/kernel"`` -> all of ``Dense_1/*``, as TempBalance sets one learning rate per module) gets that
    scale, all other leaves ``default``."""
    by_module = {_module_of(k): v for k, v in scales.items()}
    flat = flatten(params)
    unknown = [m for m in by_module if not any(p == m or p.startswith(m + "/") for p in flat)]
    if unknown:
        raise ValueError(f"scales name modules not in params: {unknown[:3]}")

    def pick(path, leaf):
        mod = _module_of(path)
        return jnp.asarray(by_module.get(mod, default), jnp.float32)

    return map_with_path(pick, params)


def scale_by_layer(scales: PyTree) -> optax.GradientTransformation:
    """Multiply each update leaf by the matching leaf of ``scales`` (a tree shaped like the params, e.g. from
    :func:`layer_scale_tree`): chained after an optimizer it gives every layer its own learning rate."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, s: (u * s).astype(u.dtype), updates, scales), state

    return optax.GradientTransformation(init_fn, update_fn)


def pruning_ratios_from_alpha(alphas: Mapping[str, Any], sizes: Mapping[str, int], sparsity: float, *,
                              s1: float = 0.8, s2: float = 1.2, cap: float = 0.998) -> dict[str, jax.Array]:
    """Per-layer pruning ratios with mean ``sparsity`` weighted by ``sizes`` (parameter counts) from per-layer α
    (AlphaPruning's linear mapping into ``[s1, s2]``, rescaled to the budget, ratios above 1 set to ``cap``;
    module docstring). Higher α (less well trained) is pruned more."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 < s1 <= s2:
        raise ValueError(f"need 0 < s1 <= s2, got {s1}, {s2}")
    keys, a = _alpha_vector(alphas)
    missing = [k for k in keys if k not in sizes]
    if missing:
        raise ValueError(f"sizes lacks layers {missing[:3]}")
    p = jnp.asarray([float(sizes[k]) for k in keys], jnp.float32)
    span = a.max() - a.min()
    r = jnp.where(span > 0, (a - a.min()) / jnp.where(span > 0, span, 1.0), 0.5) * (s2 - s1) + s1
    r = r * (jnp.sum(p) * sparsity / jnp.sum(p * r))
    r = jnp.where(r > 1.0, cap, r)
    return {k: r[i] for i, k in enumerate(keys)}
