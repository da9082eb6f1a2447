"""Flag Aggregator (Almasi, Mishra, Ozsoy, Han, "Flag Aggregator: Scalable Distributed Training under Failures and
Augmented Losses using Convex Optimization", ICLR 2024), transcribed from the authors' code
(github.com/hamidralmasi/FlagAggregator, ``aggregators/flag_median.py`` and ``aggregators/center_algorithms_torch.py``:
``irls_flag``, ``flag_mean_iteration``, ``calc_error_1_2``, at commit cd6fc50).

The clients' updates ``Δ_i = θ_i - θ_t`` of the ``p`` participants are flattened over the whole model (the
concatenation of all leaves) and normalised, ``x_i = Δ_i / max(‖Δ_i‖, 1e-12)`` (``F.normalize``). The paper
models the workers' "quality" as reconstruction ratios ``‖Yᵀx_i‖² ∈ [0, 1]`` of a rank-``r`` subspace ``Y``
(``D x r``, ``YᵀY = I``) and fits ``Y`` by maximum (Beta) likelihood, regularised, with FlagIRLS. The code's rule,
from ``Y_0`` (orthonormalised ``U(-0.5, 0.5)^{D x r}``), for up to ``iters`` iterations::

    a_i  = (|1 - ‖Y_kᵀx_i‖²| + ε)^(-1/4)                                   (i = 1..p)
    a_ij = (|1 - ‖Y_kᵀ(x_i - x_j)‖²| + ε)^(-1/4) · λ / (p(p-1))            (ordered pairs i ≠ j)
    Y_{k+1} = the r leading left singular vectors of [a_1 x_1, …, a_p x_p, …, a_ij (x_i - x_j), …]

(a weighted flag mean per step; the paper's regularised log-likelihood itself is not transcribed here: the code
is the source), stopping early as the reference when the objective ``E(Y) = Σ_i sqrt(max(1 - ‖Yᵀx_i‖², 0))``
(the data term only) decreases by at most 1e-10 or falls below 1e-10, and keeping the previous iterate when the
last one did not decrease it. The authors' aggregate (their ``flag_median`` GAR, which their server applies as the
gradient) is::

    FA = (1/r) Σ_i Y Yᵀ x_i

Here the IRLS runs in the ``p``-dimensional span of the updates: with the Gram matrix ``Ĝ = XᵀX`` of the
normalised updates, ``[a_i x_i, a_ij (x_i - x_j)] = X B`` and the leading left singular vectors of ``X B`` are
``Y = X c`` with ``c = M Ĝ^{1/2} Z / σ²`` (``M = B Bᵀ``, ``Z``, ``σ²``: the top eigenpairs of ``Ĝ^{1/2} M Ĝ^{1/2}``),
so only ``C x C`` matrices are decomposed and the model is read twice (the Gram matrix; the output). Exactly the
same ``Y`` as the reference's SVD (up to float32 rounding; checked against a float64 NumPy transcription).

Departures from the reference, all documented choices:

* ``Y_0``: the same distribution over the flattened model (:func:`init_draw`: one ``[D, r]`` draw from ``key``,
  rows in flatten order; transient memory ``r x`` the model, as the reference), not torch's stream.
  ``key=None`` uses ``PRNGKey(1)`` at every call, as the reference re-seeds with seed 1 at every aggregation.
* ``scale``: the reference's output ``FA`` has the scale of unit vectors (their server multiplies it by its
  learning rate). ``scale="paper"`` returns ``θ_t + η · FA`` exactly. The default ``scale="median"`` (weightlab's
  addition, for parameter deltas whose size matters) returns ``θ_t + η · med_i ‖Δ_i‖ · (1/p) Σ_i Y Yᵀ x_i``: the
  mean reconstructed direction at the median update norm, so that identical clients give back their model and a
  Byzantine client's magnitude cannot leak into the step.
* ``weights``: only participation is used (``weights == 0`` = absent: the client is masked out of ``X``, the
  objective, the pair terms and the sum, and ``p`` counts the participants); magnitudes are ignored, as the
  reference weighs workers only through the IRLS. Nobody participating returns ``global_params``.

Defaults ``rank=3``, ``lam=0.5`` are the reference's ``run_exp.sh`` (``r_col=3``, ``lambda=0.5``), ``iters=4`` and
``eps=1e-7`` its ``flag_median.py`` / ``flag_mean_iteration``. :func:`flag_subspace` returns the diagnostics (the
reconstruction ratios, the objective per iteration). Jittable; every leaf in float32, returned in its own dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import flatten, unflatten
from merging import _common as C
from merging.federated.clients import validate_rule_inputs

PyTree = Any

__all__ = ["flag_aggregator", "flag_subspace", "FlagSubspace", "init_draw"]

_HI = jax.lax.Precision.HIGHEST
_STOP = 1e-10  # the reference's thresholds on the objective and its decrease


class FlagSubspace(NamedTuple):
    """FlagIRLS's result over the ``C`` clients (absent ones: zeros).

    ``coef`` [C] and ``init_coef`` [r]: the paper's aggregate ``FA = Σ_i coef_i Δ_i + Y_0-part`` where the
    ``Y_0``-part (the random initial subspace, kept only when ``from_init``: the first IRLS step did not decrease
    the objective) is ``R_0 @ init_coef`` with ``R_0`` the raw initial draw. ``ratios`` [C]: the reconstruction
    ratios ``‖Yᵀx_i‖²`` of the chosen ``Y``. ``objective`` [iters + 1]: ``E(Y_k)`` per iterate (NaN after an early
    stop). ``steps``: the IRLS iterations run. ``norms`` [C]: ``‖Δ_i‖``.
    """

    coef: jax.Array
    init_coef: jax.Array
    from_init: jax.Array
    ratios: jax.Array
    objective: jax.Array
    steps: jax.Array
    norms: jax.Array


def _objective(F, pf):
    return jnp.sum(pf * jnp.sqrt(jnp.maximum(1.0 - jnp.sum(F * F, axis=1), 0.0)))


def _eigh_unsorted(a):
    """Eigenvectors and eigenvalues of a symmetric matrix, in no particular order (for order-free uses)."""
    return jax.lax.linalg.eigh(0.5 * (a + a.T), symmetrize_input=False, sort_eigenvalues=False)


def _flag_core(gram, present, w0, gr, lam, eps, *, rank, iters) -> FlagSubspace:
    """FlagIRLS in coefficient space (module docstring). ``gram`` [C, C]: ``Δ_i · Δ_j``; ``w0`` [C, r]:
    ``Δ_iᵀ R_0``; ``gr`` [r, r]: ``R_0ᵀ R_0``. The subspace ``Y`` is carried as ``F = X̂ᵀ Y`` [C, r] (all the IRLS
    weights and the objective need) and ``c`` with ``Y = X̂ c`` (the output needs), or as the initial ``Y_0``."""
    n = gram.shape[0]
    pf = present.astype(jnp.float32)
    p = jnp.sum(pf)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)) * pf
    d = jnp.maximum(norms, 1e-12)  # F.normalize's eps
    ghat = gram / (d[:, None] * d[None, :]) * (pf[:, None] * pf[None, :])
    vg, lg = _eigh_unsorted(ghat)
    sqrt_g = (vg * jnp.sqrt(jnp.maximum(lg, 0.0))) @ vg.T  # Ĝ^{1/2}
    vr, lr = _eigh_unsorted(gr)
    gr_isqrt = (vr / jnp.sqrt(jnp.maximum(lr, 1e-30))) @ vr.T
    # Y_0 = R_0 (R_0ᵀR_0)^{-1/2}: orthonormal with the span of QR(R_0), so F_0 = X̂ᵀ Y_0 = (Δ̂ᵀ R_0) (R_0ᵀR_0)^{-1/2}
    f0 = ((w0 / d[:, None]) * pf[:, None]) @ gr_isqrt
    pair = pf[:, None] * pf[None, :] * (1.0 - jnp.eye(n, dtype=jnp.float32))
    pair_coef = lam / jnp.maximum(p * (p - 1.0), 1.0)
    r_eff = min(rank, n)

    def step(F):
        w2 = pf * (jnp.abs(1.0 - jnp.sum(F * F, axis=1)) + eps) ** -0.5  # a_i²
        dist = jnp.sum(jnp.square(F[:, None, :] - F[None, :, :]), axis=-1)  # ‖Yᵀ(x_i - x_j)‖²
        wp2 = pair * (jnp.abs(1.0 - dist) + eps) ** -0.5 * pair_coef ** 2  # a_ij²
        M = jnp.diag(w2 + 2.0 * jnp.sum(wp2, axis=1)) - 2.0 * wp2  # B Bᵀ (both orders of every pair)
        H = sqrt_g @ M @ sqrt_g
        ev, Z = jnp.linalg.eigh(0.5 * (H + H.T))  # ascending
        ev, Z = ev[n - r_eff:], Z[:, n - r_eff:]
        good = ev > jnp.maximum(ev[-1], 0.0) * 1e-6  # rank(X B) < r: the reference's extra columns project to 0
        c = (M @ sqrt_g @ Z) * jnp.where(good, 1.0 / jnp.where(good, ev, 1.0), 0.0)
        if r_eff < rank:
            c = jnp.pad(c, ((0, 0), (0, rank - r_eff)))
        return ghat @ c, c

    err0 = _objective(f0, pf)
    zc = jnp.zeros((n, rank), jnp.float32)
    obj0 = jnp.full((iters + 1,), jnp.nan, jnp.float32).at[0].set(err0)
    yes = jnp.array(True)
    # (t, F, c, from_init, F_prev, c_prev, from_init_prev, err, diff, objective): the reference's while loop
    init = (jnp.int32(0), f0, zc, yes, f0, zc, yes, err0, jnp.float32(1.0), obj0)

    def cond(s):
        return (s[0] < iters) & (s[8] > _STOP) & (s[7] > _STOP)

    def body(s):
        t, F, c, ini, _, _, _, err, _, obj = s
        F_new, c_new = step(F)
        err_new = _objective(F_new, pf)
        return (t + 1, F_new, c_new, jnp.array(False), F, c, ini, err_new, err - err_new, obj.at[t + 1].set(err_new))

    steps, F, c, ini, Fp, cp, inip, _, diff, obj = jax.lax.while_loop(cond, body, init)
    keep = diff > 0  # else the reference returns the previous iterate
    F, c, from_init = jnp.where(keep, F, Fp), jnp.where(keep, c, cp), jnp.where(keep, ini, inip)
    total = jnp.sum(F * pf[:, None], axis=0)  # Σ_i Yᵀ x_i
    coef = jnp.where(from_init, 0.0, (c @ total) / rank) * pf / d
    init_coef = jnp.where(from_init, gr_isqrt @ total / rank, 0.0)
    return FlagSubspace(coef, init_coef, from_init, jnp.sum(F * F, axis=1) * pf, obj, steps, norms)


def init_draw(key: jax.Array, dim: int, rank: int) -> jax.Array:
    """The raw initial subspace ``R_0`` [dim, rank]: ``U(-0.5, 0.5)`` (the reference's ``torch.rand(n, r) - 0.5``)
    over the flattened model, rows in :func:`jaxmodels.tree.flatten` order; ``Y_0`` is its orthonormal basis."""
    return jax.random.uniform(key, (dim, rank), jnp.float32, -0.5, 0.5)


def _deltas(flat_g, flat_c, present):
    """``Δ_i`` per leaf as ``[C, size]`` float32, zero for absent clients (whatever they hold)."""
    out = {}
    for p, g in flat_g.items():
        dl = (flat_c[p].astype(jnp.float32) - g.astype(jnp.float32)[None]).reshape(flat_c[p].shape[0], -1)
        out[p] = jnp.where(present[:, None], dl, 0.0)
    return out


@functools.partial(jax.jit, static_argnames=("rank", "iters"))
def _flag_tree(global_params, client_params, weights, key, lam, eps, lr, median, *, rank, iters):
    """Both passes over the model (Gram matrix, output) around the ``C x C`` FlagIRLS; returns the new global
    params and the :class:`FlagSubspace` (one compilation serves :func:`flag_aggregator` and
    :func:`flag_subspace`)."""
    flat_g, flat_c = flatten(global_params), flatten(client_params)
    present = weights > 0
    deltas = _deltas(flat_g, flat_c, present)
    sizes = [int(np.prod(np.shape(g))) for g in flat_g.values()]
    offsets = np.cumsum([0] + sizes)
    r0 = init_draw(key, int(offsets[-1]), rank)
    r0s = {p: r0[offsets[i]:offsets[i + 1]] for i, p in enumerate(flat_g)}
    gram = w0 = 0.0
    for p, dl in deltas.items():
        gram = gram + jnp.einsum("ik,jk->ij", dl, dl, precision=_HI)
        w0 = w0 + jnp.einsum("ik,kr->ir", dl, r0s[p], precision=_HI)
    gr = jnp.einsum("kr,ks->rs", r0, r0, precision=_HI)
    res = _flag_core(gram, present, w0, gr, lam, eps, rank=rank, iters=iters)
    p_count = jnp.sum(present.astype(jnp.float32))
    med = jnp.nanmedian(jnp.where(present, res.norms, jnp.nan)) * rank / jnp.maximum(p_count, 1.0)
    factor = jnp.where(p_count > 0, jnp.where(median, med, 1.0) * lr, 0.0)
    out = {}
    for path, g in flat_g.items():
        step = jnp.einsum("i,ik->k", res.coef, deltas[path], precision=_HI)
        step = step + jnp.where(res.from_init, jnp.einsum("kr,r->k", r0s[path], res.init_coef, precision=_HI), 0.0)
        out[path] = (g.astype(jnp.float32) + factor * step.reshape(np.shape(g))).astype(g.dtype)
    return unflatten(out, like=global_params), res


def _check_hparams(global_params, rank, iters, lam, eps, scale, method):
    for name, v, low in (("rank", rank, 1), ("iters", iters, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{method}: `{name}` must be an integer >= {low}, got {v!r}")
    dim = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(global_params))
    if rank > dim:
        raise ValueError(f"{method}: `rank` ({rank}) exceeds the number of parameters per client ({dim})")
    lam_v = C.concrete_scalar(lam, "lam", method)
    if lam_v is not None and not (math.isfinite(lam_v) and lam_v >= 0):
        raise ValueError(f"{method}: `lam` must be finite and >= 0, got {lam_v}")
    eps_v = C.concrete_scalar(eps, "eps", method)
    if eps_v is not None and not (math.isfinite(eps_v) and eps_v > 0):
        raise ValueError(f"{method}: `eps` must be finite and > 0, got {eps_v}")
    if scale not in ("median", "paper"):
        raise ValueError(f"{method}: `scale` must be 'median' or 'paper', got {scale!r}")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _key(key):
    return jax.random.PRNGKey(1) if key is None else key


def flag_subspace(global_params: PyTree, client_params: PyTree, *, weights: Any = None, rank: int = 3,
                  lam: float = 0.5, iters: int = 4, eps: float = 1e-7, key: jax.Array | None = None,
                  check_finite: bool = True) -> FlagSubspace:
    """FlagIRLS on the clients' updates (module docstring), returning :class:`FlagSubspace`: the reconstruction
    ratios ``‖Yᵀx_i‖²`` (low for clients outside the consensus subspace), the objective per iterate, and the
    coefficients of the paper's aggregate. Same arguments as :func:`flag_aggregator`. Jittable."""
    _check_hparams(global_params, rank, iters, lam, eps, "paper", "flag_subspace")
    _, w = validate_rule_inputs(global_params, client_params, weights, "flag_subspace", check_finite)
    return _flag_tree(global_params, client_params, w, _key(key), _f32(lam), _f32(eps), _f32(1.0), jnp.bool_(False),
                      rank=int(rank), iters=int(iters))[1]


def flag_aggregator(global_params: PyTree, client_params: PyTree, *, weights: Any = None, rank: int = 3,
                    lam: float = 0.5, iters: int = 4, eps: float = 1e-7, key: jax.Array | None = None,
                    scale: str = "median", server_lr: float = 1.0, check_finite: bool = True) -> PyTree:
    """Flag Aggregator of the clients' updates (module docstring): ``θ_t + server_lr · Δ`` with ``Δ`` the
    projection of the normalised updates onto the FlagIRLS subspace, at the median update norm
    (``scale="median"``) or exactly the authors' ``(1/r) Σ_i Y Yᵀ x_i`` (``scale="paper"``).

    ``rank``: ``r``, the subspace dimension (1 <= r <= parameters per client). ``lam``: λ >= 0, the pairwise
    regulariser. ``iters``: the maximum FlagIRLS iterations. ``eps``: the weights' ε. ``key``: draws ``Y_0``
    (None: ``PRNGKey(1)``). ``weights``: ``[C]``, ``0`` = absent, positive magnitudes ignored. ``lam``, ``eps``,
    ``server_lr`` may be traced, and ``scale`` is passed as a value: one compilation per ``rank`` / ``iters`` (and
    tree structure). Jittable.
    """
    _check_hparams(global_params, rank, iters, lam, eps, scale, "flag_aggregator")
    lr = C.concrete_scalar(server_lr, "server_lr", "flag_aggregator")
    if lr is not None:
        C.check_finite_param(lr, "server_lr", "flag_aggregator")
    _, w = validate_rule_inputs(global_params, client_params, weights, "flag_aggregator", check_finite)
    return _flag_tree(global_params, client_params, w, _key(key), _f32(lam), _f32(eps), _f32(server_lr),
                      jnp.bool_(scale == "median"), rank=int(rank), iters=int(iters))[0]
