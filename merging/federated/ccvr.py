"""CCVR (Luo et al., "No Fear of Heterogeneity: Classifier Calibration for Federated Learning with Non-IID Data",
NeurIPS 2021): after federated training, re-train only the classifier head on *virtual representations* sampled
from a per-class Gaussian model of the global model's penultimate features.

1. Every client ``k`` runs the global feature extractor on its data and sends, per class ``c``, the count
   ``N_{c,k}``, the mean ``μ_{c,k}`` and the unbiased covariance
   ``Σ_{c,k} = 1/(N_{c,k} − 1) Σ_j (z_j − μ_{c,k})(z_j − μ_{c,k})ᵀ`` (:func:`client_feature_stats`).
2. The server pools them (the paper's eqs. 3 and 4; :func:`aggregate_feature_stats`), ``N_c = Σ_k N_{c,k}``::

       μ_c = Σ_k (N_{c,k} / N_c) μ_{c,k}
       Σ_c = Σ_k (N_{c,k} − 1)/(N_c − 1) Σ_{c,k} + Σ_k N_{c,k}/(N_c − 1) μ_{c,k} μ_{c,k}ᵀ − N_c/(N_c − 1) μ_c μ_cᵀ

   which are exactly the mean and the unbiased covariance of the concatenated features of class ``c``.
3. It samples ``M_c`` virtual features per class from ``N(μ_c, Σ_c)`` (:func:`sample_virtual_features`; one
   ``M_c`` for all classes or one per class: the reimplementation github.com/smduan/Fed-CCVR samples 2000 per
   class, ``conf.py``; the paper's own values could not be sourced here)
4. and re-trains the classifier head on them with softmax cross-entropy (:func:`calibrate_head`; the
   reimplementation: SGD lr 1e-3, momentum 0.9, batch 64, 10 epochs, starting from the global head).

The pooling rule is transcribed from smduan/Fed-CCVR (``fedavg/server.py``, ``cal_global_gd``, which implements
the paper's eqs. 3-4); its client side (``fedavg/client.py``, ``cal_distributions``) keeps appending to one feature
list across classes, so each class's statistics there also include the earlier classes' features: not copied,
the statistics here are per class as the paper defines them. Edge cases the paper leaves open, chosen so that
eq. 4 stays exact: a client class with
``N_{c,k} ≤ 1`` sends a zero covariance (its scatter is zero, and its ``(N_{c,k} − 1)`` factor multiplies that
zero); a pooled class with ``N_c ≤ 1`` gets a zero covariance and one with ``N_c = 0`` (seen by no client) mean 0
and no valid virtual features (their ``mask`` is False; :func:`calibrate_head` ignores them).

Everything is pure and jittable (shapes are static: ``num_classes``, the virtual counts, ``steps``, the batch
size); features, statistics and virtual features are float32 (other float inputs are cast). The statistics
functions take a leading client axis (``[C, N, D]`` features) so that a sharded client axis stays sharded.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.tree import is_concrete
from merging import _common as C

PyTree = Any

__all__ = ["FeatureStats", "VirtualFeatures", "client_feature_stats", "aggregate_feature_stats",
           "sample_virtual_features", "calibrate_head"]


class FeatureStats(NamedTuple):
    """Per-class feature statistics: ``counts [K]`` (float32 example counts ``N_c``), ``means [K, D]`` and
    ``covs [K, D, D]`` (unbiased, ``1/(N_c − 1)``; zero where ``N_c ≤ 1``). Client-stacked: a leading ``[C]``
    axis on each field."""
    counts: jax.Array
    means: jax.Array
    covs: jax.Array


class VirtualFeatures(NamedTuple):
    """:func:`sample_virtual_features`' result: ``x [M, D]`` (float32), ``y [M]`` (int32 class of each row, class
    blocks in order) and ``mask [M]`` (False for the rows of classes no client has seen: ``N_c = 0``)."""
    x: jax.Array
    y: jax.Array
    mask: jax.Array


def _check_num_classes(num_classes: Any, method: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"{method}: num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _stats_one(features, labels, mask, num_classes):
    f = features.astype(jnp.float32)
    w = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask.astype(jnp.float32)[:, None]  # [N, K]
    n = w.sum(0)
    means = (w.T @ f) / jnp.maximum(n, 1.0)[:, None]
    fc = f[None, :, :] - means[:, None, :]  # [K, N, D], centred per class (two-pass: no cancellation)
    scatter = jnp.einsum("nk,knd,kne->kde", w, fc, fc)
    covs = jnp.where((n > 1)[:, None, None], scatter / jnp.maximum(n - 1.0, 1.0)[:, None, None], 0.0)
    return FeatureStats(n, means, covs)


@functools.partial(jax.jit, static_argnums=(3,))
def _stats(features, labels, mask, num_classes):
    fn = functools.partial(_stats_one, num_classes=num_classes)
    for _ in range(features.ndim - 2):
        fn = jax.vmap(fn)
    return fn(features, labels, mask)


def client_feature_stats(features: jax.Array, labels: jax.Array, num_classes: int,
                         mask: jax.Array | None = None) -> FeatureStats:
    """A client's per-class count, mean and unbiased covariance of its ``features`` (step 1; module docstring).

    ``features [N, D]``, ``labels [N]`` (int in ``[0, num_classes)``), ``mask [N]`` (bool, True on real examples;
    None = all). Leading client axes are mapped over: ``features [C, N, D]`` with ``labels`` / ``mask [C, N]``
    (e.g. a :class:`~merging.federated.partitions.ClientData`'s ``y`` / ``mask``) gives client-stacked stats.
    Jittable; a sharded client axis stays sharded. Shapes, dtypes and (when concrete) the label range and
    finiteness are checked before any work."""
    method = "client_feature_stats"
    num_classes = _check_num_classes(num_classes, method)
    fs, ls = np.shape(features), np.shape(labels)
    if len(fs) < 2 or ls != fs[:-1]:
        raise ValueError(f"{method}: features must be [..., N, D] and labels [..., N] (the same leading shape), "
                         f"got features {fs} and labels {ls}")
    if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
        raise TypeError(f"{method}: features must be floating, got {jnp.result_type(features)}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"{method}: labels must be integer class ids, got {jnp.result_type(labels)}")
    if mask is None:
        mask = jnp.ones(ls, bool)
    elif np.shape(mask) != ls:
        raise ValueError(f"{method}: mask must have the labels' shape {ls}, got {np.shape(mask)}")
    if is_concrete(labels) and is_concrete(mask):
        lab, m = np.asarray(jax.device_get(labels)), np.asarray(jax.device_get(mask), bool)
        if lab[m].size and (lab[m].min() < 0 or lab[m].max() >= num_classes):
            raise ValueError(f"{method}: labels must be in [0, {num_classes}), got range [{lab[m].min()}, "
                             f"{lab[m].max()}]")
    if is_concrete(features):
        C.check_all_finite([features], ["features"], method)
    return _stats(features, jnp.asarray(labels), jnp.asarray(mask), num_classes)


def _check_stats(stats: Any, method: str, stacked: bool) -> tuple[int, int]:
    if not isinstance(stats, FeatureStats):
        raise TypeError(f"{method}: expected FeatureStats, got {type(stats).__name__}")
    cs, ms, vs = (np.shape(a) for a in stats)
    lead = 1 if stacked else 0
    ok = len(cs) == 1 + lead and len(ms) == 2 + lead and ms[:-1] == cs and vs == ms + ms[-1:]
    if not ok:
        want = "counts [C, K], means [C, K, D], covs [C, K, D, D]" if stacked else \
            "counts [K], means [K, D], covs [K, D, D]"
        raise ValueError(f"{method}: FeatureStats shapes disagree: counts {cs}, means {ms}, covs {vs} (want {want})")
    if is_concrete(stats.counts):
        n = np.asarray(jax.device_get(stats.counts))
        if not np.all(np.isfinite(n)) or np.any(n < 0):
            raise ValueError(f"{method}: counts must be finite and non-negative, got {n}")
    if all(is_concrete(a) for a in stats):
        C.check_all_finite([stats.means, stats.covs], ["means", "covs"], method)
    return ms[-2], ms[-1]


@jax.jit
def _pool(stats):
    n_k = stats.counts.astype(jnp.float32)  # [C, K]
    mu_k = stats.means.astype(jnp.float32)  # [C, K, D]
    cov_k = stats.covs.astype(jnp.float32)  # [C, K, D, D]
    n = n_k.sum(0)  # [K]
    mu = jnp.einsum("ck,ckd->kd", n_k, mu_k) / jnp.maximum(n, 1.0)[:, None]  # eq. 3
    den = jnp.maximum(n - 1.0, 1.0)[:, None, None]
    cov = (jnp.einsum("ck,ckde->kde", n_k - 1.0, cov_k)
           + jnp.einsum("ck,ckd,cke->kde", n_k, mu_k, mu_k)
           - n[:, None, None] * mu[:, :, None] * mu[:, None, :]) / den  # eq. 4
    cov = jnp.where((n > 1)[:, None, None], cov, 0.0)
    return FeatureStats(n, mu, cov)


def aggregate_feature_stats(stats_stacked: FeatureStats) -> FeatureStats:
    """The server's pooled per-class Gaussians from the clients' statistics (step 2, the paper's eqs. 3-4; module
    docstring). ``stats_stacked``: client-stacked :class:`FeatureStats` (``counts [C, K]``, ``means [C, K, D]``,
    ``covs [C, K, D, D]``, e.g. :func:`client_feature_stats` of ``[C, N, D]`` features). Returns
    ``FeatureStats(counts [K], means [K, D], covs [K, D, D])``: exactly the count, mean and unbiased covariance of
    all clients' features of each class together. Jittable (the sum over a sharded client axis is one
    reduction)."""
    _check_stats(stats_stacked, "aggregate_feature_stats", stacked=True)
    return _pool(stats_stacked)


def _virtual_counts(counts: Any, k: int, method: str) -> tuple[int, ...]:
    if isinstance(counts, (int, np.integer)) and not isinstance(counts, bool):
        vals = (int(counts),) * k
    else:
        try:
            vals = tuple(int(v) for v in np.asarray(counts).reshape(-1))
        except (TypeError, ValueError):
            raise TypeError(f"{method}: counts must be an int or one int per class, got {counts!r}") from None
        if len(vals) != k or np.any(np.asarray(counts).reshape(-1) != np.asarray(vals)):
            raise ValueError(f"{method}: counts must be one integer per class ({k}), got {counts!r}")
    if any(v < 0 for v in vals) or sum(vals) < 1:
        raise ValueError(f"{method}: counts must be non-negative with at least one virtual feature, got {vals}")
    return vals


@functools.partial(jax.jit, static_argnums=(2,))
def _sample(stats, key, per_class):
    k, d = stats.means.shape
    m_max = max(per_class)
    lam, vec = jnp.linalg.eigh(stats.covs.astype(jnp.float32))  # PSD up to rounding: clip the eigenvalues at 0
    scale = jnp.sqrt(jnp.maximum(lam, 0.0))  # [K, D]
    eps = jax.vmap(lambda kk: jax.random.normal(kk, (m_max, d), jnp.float32))(jax.random.split(key, k))
    z = stats.means[:, None, :] + jnp.einsum("kmd,kd,ked->kme", eps, scale, vec)  # μ + V diag(√λ) ε
    rows = np.concatenate([c * m_max + np.arange(m) for c, m in enumerate(per_class)]).astype(np.int32)
    x = z.reshape(k * m_max, d)[rows]
    y = jnp.asarray(np.repeat(np.arange(k), per_class).astype(np.int32))
    mask = (stats.counts > 0)[y]
    return VirtualFeatures(x, y, mask)


def sample_virtual_features(global_stats: FeatureStats, counts: int | Sequence[int], key: jax.Array
                            ) -> VirtualFeatures:
    """Virtual representations: ``counts[c]`` draws from ``N(μ_c, Σ_c)`` per class (step 3; module docstring).

    ``global_stats``: :func:`aggregate_feature_stats`' pooled statistics; ``counts``: ``M_c``, one int for every
    class (the paper's choice) or one per class (concrete: it fixes the output shape). Draws use the
    eigendecomposition ``Σ_c = V diag(λ) Vᵀ``, ``z = μ_c + V diag(√max(λ, 0)) ε`` with ``ε ~ N(0, I)`` (a singular
    ``Σ_c`` is fine, as numpy's ``multivariate_normal`` that the reimplementation uses), one key per class split
    from ``key``. Returns :class:`VirtualFeatures` (``M = Σ_c M_c`` rows, class blocks in order). Jittable with
    ``counts`` static."""
    method = "sample_virtual_features"
    k, _ = _check_stats(global_stats, method, stacked=False)
    per_class = _virtual_counts(counts, k, method)
    return _sample(global_stats, key, per_class)


@functools.lru_cache(maxsize=32)
def _calibrate_fn(head_apply, tx, steps, batch_size):
    def loss(params, x, y, m):
        logits = head_apply(params, x).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

    def run(params, x, y, mask, key):
        dtypes = jax.tree.map(lambda p: p.dtype, params)
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        m32 = mask.astype(jnp.float32)

        def step(carry, kk):
            p, s = carry
            if batch_size is None:
                xb, yb, mb = x, y, m32
            else:
                _, idx = jax.lax.top_k(jnp.where(mask, jax.random.uniform(kk, mask.shape), -1.0), batch_size)
                xb, yb, mb = x[idx], y[idx], m32[idx]
            g = jax.grad(loss)(p, xb, yb, mb)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
        return jax.tree.map(lambda p, d: p.astype(d), params, dtypes)

    return jax.jit(run)


def calibrate_head(head_params: PyTree, head_apply: Callable[[PyTree, jax.Array], jax.Array], virtual_x: jax.Array,
                   virtual_y: jax.Array, tx: optax.GradientTransformation, steps: int, key: jax.Array, *,
                   batch_size: int | None = None, mask: jax.Array | None = None) -> PyTree:
    """Re-train the classifier head on virtual features (step 4; module docstring): ``steps`` optax steps of
    ``tx`` on the mean softmax cross-entropy of ``head_apply(head_params, x) -> logits`` with labels
    ``virtual_y``, starting from ``head_params`` (the global model's head) with a fresh ``tx.init`` state.

    ``batch_size``: None = the full batch every step, else a minibatch of ``batch_size`` distinct valid rows
    drawn uniformly each step (keys split from ``key``). ``mask`` (e.g. :class:`VirtualFeatures`' ``mask``) drops
    rows from the loss and the draws. Trained in float32; every leaf returned in its own dtype. Jitted once per
    ``(head_apply, tx, steps, batch_size)`` (pass the same function and transform objects to reuse it); the
    inputs are not modified."""
    method = "calibrate_head"
    if not callable(head_apply):
        raise TypeError(f"{method}: head_apply must be callable, got {type(head_apply).__name__}")
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"{method}: tx must be an optax GradientTransformation, got {type(tx).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"{method}: steps must be a positive integer, got {steps!r}")
    xs, ys = np.shape(virtual_x), np.shape(virtual_y)
    if len(xs) != 2 or ys != xs[:1] or xs[0] < 1:
        raise ValueError(f"{method}: virtual_x must be [M, D] and virtual_y [M] (M >= 1), got {xs} and {ys}")
    if not jnp.issubdtype(jnp.result_type(virtual_y), jnp.integer):
        raise TypeError(f"{method}: virtual_y must be integer class ids, got {jnp.result_type(virtual_y)}")
    mask = jnp.ones(ys, bool) if mask is None else mask
    if np.shape(mask) != ys:
        raise ValueError(f"{method}: mask must have shape {ys}, got {np.shape(mask)}")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or not 1 <= batch_size <= xs[0]:
            raise ValueError(f"{method}: batch_size must be an integer in [1, {xs[0]}] or None, got {batch_size!r}")
        batch_size = int(batch_size)
    C.check_leaf_dtypes(head_params, [], method)
    if is_concrete(virtual_x):
        C.check_all_finite([head_params, virtual_x], ["head_params", "virtual_x"], method)
    try:
        fn = _calibrate_fn(head_apply, tx, int(steps), batch_size)
    except TypeError:  # an unhashable head_apply / tx: compile for this call only
        fn = _calibrate_fn.__wrapped__(head_apply, tx, int(steps), batch_size)
    return fn(head_params, jnp.asarray(virtual_x, jnp.float32), jnp.asarray(virtual_y, jnp.int32),
              jnp.asarray(mask, bool), key)
