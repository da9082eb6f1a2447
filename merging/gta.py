"""Generalized task arithmetic: the engine shared by task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA
(mergekit's ``GeneralizedTaskArithmeticMerge``).

For each tensor, with base ``θ_0``, models ``θ_t`` and per-model weights ``w_t``::

    τ_t   = sparsify(θ_t - θ_0)                       (magnitude / random / outliers / della, or identity)
            with ``rescale``: scaled to restore the L1 (default, mergekit 0.1.5) / L2 / Linf norm of θ_t - θ_0
            (``rescale_norm``), or by 1/p (``rescale_norm="inverse_p"``, DARE / DELLA only: the papers' rule)
    m_t   = 1[sign(w_t τ_t) = s]  with s = sign(Σ_t w_t τ_t) ("sum", TIES) or sign(Σ_t sign(w_t τ_t)) ("count"),
            s = +1 where the sum is 0; m_t = 1 without a consensus step
    Δ     = Σ_t m_t w_t τ_t
    Δ     = Δ / Σ_t m_t w_t   if normalize (a zero divisor becomes 1)
    θ     = θ_0 + λ Δ

(Yadav et al. 2023 "TIES-Merging"; Ilharco et al. 2023 "Editing models with task arithmetic").
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.tree import compute_in_float32
from merging import _common as C
from merging import sparsify as S

__all__ = ["generalized_task_arithmetic", "sign_consensus_mask"]

SPARSIFIERS = (None, "magnitude", "random", "magnitude_outliers", "della_magprune")
CONSENSUS = (None, "sum", "count")


def sign_consensus_mask(weighted_deltas: jax.Array, method: str = "sum") -> jax.Array:
    """TIES sign election over axis 0: True where an entry's sign equals the elected sign (zeros never agree)."""
    sign = jnp.sign(weighted_deltas)
    if method == "sum":
        elected = jnp.where(weighted_deltas.sum(0) >= 0, 1.0, -1.0)
    elif method == "count":
        elected = jnp.where(sign.sum(0) >= 0, 1.0, -1.0)
    else:
        raise ValueError(f"consensus method must be 'sum' or 'count', got {method!r}")
    return sign == elected


@functools.partial(jax.jit, static_argnames=("sparsification", "densities", "consensus", "normalize", "rescale",
                                             "rescale_norm", "gamma", "epsilon"))
def _gta_leaf(base, xs, weights, lambda_, key, *, sparsification, densities, consensus, normalize, rescale,
              rescale_norm, gamma, epsilon):
    base = base.astype(jnp.float32)
    deltas = []
    for i, (x, d) in enumerate(zip(xs, densities)):
        delta = x.astype(jnp.float32) - base
        norm = rescale_norm if rescale else None
        if sparsification == "magnitude":
            delta = S.magnitude(delta, d, norm)
        elif sparsification == "random":
            delta = S.bernoulli(delta, d, jax.random.fold_in(key, i), norm)
        elif sparsification == "magnitude_outliers":
            delta = S.magnitude_outliers(delta, d, gamma[i], norm)
        elif sparsification == "della_magprune":
            delta = S.della_magprune(delta, d, epsilon[i], jax.random.fold_in(key, i), norm)
        deltas.append(delta)
    w = weights.astype(jnp.float32)
    if consensus is None:  # no election: a running weighted sum
        mixed = sum(w[i] * d for i, d in enumerate(deltas))
        wsum = w.sum()
        div = jnp.where(jnp.abs(wsum) < 1e-8, 1.0, wsum)
        if normalize:
            mixed = mixed / div
        return base + lambda_ * mixed
    # election and disjoint merge as running sums over the models: one fused elementwise pass, never an [n, ...]
    # stack (XLA:CPU materialized the stack and its masks; this is ~50x faster on 4 x 16M entries and bit-identical)
    wd = [w[i] * d for i, d in enumerate(deltas)]
    if consensus == "sum":
        positive = sum(wd[1:], wd[0]) >= 0
    else:
        positive = sum((jnp.sign(v) for v in wd[1:]), jnp.sign(wd[0])) >= 0
    mixed, div = 0.0, 0.0
    for i, v in enumerate(wd):
        agree = jnp.where(positive, v > 0, v < 0)  # sign(v) equals the elected sign; zeros never agree
        mixed = mixed + jnp.where(agree, v, 0.0)
        div = div + jnp.where(agree, w[i], 0.0)
    div = jnp.where(div == 0, 1.0, div)
    if normalize:
        mixed = mixed / div
    return base + lambda_ * mixed


def generalized_task_arithmetic(
    base: Any,
    models: Sequence[Any],
    *,
    weights: float | Sequence[float] | None = None,
    density: float | Sequence[float] = 1.0,
    sparsification: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = True,
    rescale_norm: str = "l1",
    lambda_: float = 1.0,
    gamma: float | Sequence[float] = 0.01,
    epsilon: float | Sequence[float] = 0.15,
    key: jax.Array | None = None,
    method: str = "generalized_task_arithmetic",
    check_finite: bool = True,
) -> Any:
    """See the module docstring. ``weights``/``density`` are one value per model (or a
    scalar for every model; ``weights`` default 1 each). Validates everything
    (trees, hyper-parameters) before any computation; computes in float32 and returns ``base``'s dtype."""
    models = C.as_models(models, 1, method)
    if base is None:
        raise ValueError(f"{method}: needs a base model")
    C.validate_trees(base, models, method, check_finite=check_finite)
    C.check_leaf_dtypes(base, models, method)
    n = len(models)
    weights = C.per_model(1.0 if weights is None else weights, n, "weights", method)
    densities = C.per_model(density, n, "density", method)
    for w in weights:
        C.check_finite_param(w, "weights", method)
    C.check_density(densities, method)
    C.check_finite_param(float(lambda_), "lambda_", method)
    if sparsification not in SPARSIFIERS:
        raise ValueError(f"{method}: unknown sparsification {sparsification!r}; one of {SPARSIFIERS}")
    if consensus not in CONSENSUS:
        raise ValueError(f"{method}: consensus must be one of {CONSENSUS}, got {consensus!r}")
    if rescale_norm not in S.RESCALE_NORMS:
        raise ValueError(f"{method}: rescale_norm must be one of {S.RESCALE_NORMS}, got {rescale_norm!r}")
    if rescale_norm == "inverse_p" and sparsification not in ("random", "della_magprune"):
        raise ValueError(f"{method}: rescale_norm='inverse_p' needs a random sparsifier (DARE / DELLA)")
    gammas = C.per_model(gamma, n, "gamma", method)
    epsilons = C.per_model(epsilon, n, "epsilon", method)
    if sparsification == "magnitude_outliers":
        for g in gammas:
            C.check_unit_interval(g, "gamma", method)
    if sparsification == "della_magprune":
        for d, epsilon in zip(densities, epsilons):
            if d < 1.0 and not (0.0 < d - epsilon and d + epsilon < 1.0):
                raise ValueError(f"{method}: epsilon must make density ± epsilon lie in (0, 1); "
                                 f"density={d}, epsilon={epsilon}")
    if sparsification in ("random", "della_magprune") and any(d < 1.0 for d in densities):
        if key is None:
            raise ValueError(f"{method}: random sparsification needs an explicit `key` (jax.random.key)")
    if key is None:
        key = jax.random.key(0)  # unused (deterministic path) but keeps one jit signature

    weights_arr = jnp.asarray(weights, jnp.float32)
    static = dict(sparsification=sparsification, densities=densities, consensus=consensus, normalize=bool(normalize),
                  rescale=bool(rescale), rescale_norm=rescale_norm, gamma=gammas, epsilon=epsilons)

    @compute_in_float32
    def run(base, models):
        return C.map_leaves(
            lambda p, b, xs: _gta_leaf(b, xs, weights_arr, jnp.float32(lambda_), C.leaf_key(key, p), **static),
            base, models)

    return run(base, models)
