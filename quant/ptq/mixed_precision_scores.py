"""Importance scores of layer-wise mixed precision (:mod:`quant.ptq.mixed_precision`, whose docstring has the
equations): LIM and ZD (Dumitru et al., 2024, arXiv 2406.17415, §3.1), Hutchinson Hessian traces and the HAWQ-V2
sensitivity Ω = Tr(H)/n · ‖Q(W) − W‖²_F (Dong et al., 2019).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import flatten, unflatten

from ._common import pbar
from .blocks import ByIdentity, dense_names, get_sub

__all__ = ["lim_score", "lim_scores", "z_score_fraction", "zd_scores", "hutchinson_trace", "hessian_traces",
           "hawq_sensitivity", "block_kernels"]


def lim_score(x_in: jax.Array, x_out: jax.Array, token_weight: jax.Array | None = None) -> jax.Array:
    """LIM (Dumitru et al., 2024): − Σ_t m_t cos(x_in_t, x_out_t) / Σ_t m_t over tokens ``[..., d]`` (``m``: token
    weights ``[...]``, 1 = real token, 0 = padding; default all 1). float32 scalar; jit-able."""
    a = jnp.asarray(x_in, jnp.float32)
    b = jnp.asarray(x_out, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"lim_score: input {a.shape} and output {b.shape} shapes differ")
    den = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)
    cos = jnp.sum(a * b, axis=-1) / den
    m = jnp.ones(cos.shape, jnp.float32) if token_weight is None else jnp.asarray(token_weight, jnp.float32)
    return -jnp.sum(m * cos) / jnp.maximum(jnp.sum(m), 1e-30)


def z_score_fraction(w: jax.Array, threshold: float = 1.0) -> jax.Array:
    """ZD (Dumitru et al., 2024) of one weight array (or the concatenation of a layer's): the fraction of elements
    with z = (θ − μ)/σ > ``threshold`` (μ, σ: mean and population standard deviation). float32 scalar; jit-able."""
    x = jnp.asarray(w, jnp.float32).ravel()
    z = (x - x.mean()) / jnp.maximum(x.std(), 1e-30)
    return jnp.mean((z > threshold).astype(jnp.float32))


def block_kernels(params, model) -> dict[str, dict[str, jax.Array]]:
    """``{block_path: {kernel_path: kernel}}`` of the linear kernels of every block of ``model``."""
    out = {}
    for bp in model.block_paths:
        block = get_sub(params, bp)
        out[bp] = {f"{bp}/{n}/kernel": get_sub(block, n)["kernel"] for n in dense_names(block)}
    return out


def lim_scores(params, model, calib_batch, *, progress: bool | None = None) -> dict[str, float]:
    """LIM of every block of ``model`` (a :class:`quant.ptq.blocks.BlockModel`) on the float model's hidden states
    of ``calib_batch``: ``{block_path: LIM}`` (higher = the block changes its input more = more important)."""
    h, ctx = model.embed(params, calib_batch)
    tok = model.token_weight(ctx)
    out = {}
    for i, bp in enumerate(pbar(model.block_paths, progress, desc="LIM")):
        h2 = model.apply_block(get_sub(params, bp), h, model.block_ctx(i, ctx))
        out[bp] = float(_lim_jit(h, h2, tok))
        h = h2
    return out


_lim_jit = jax.jit(lim_score)


def zd_scores(params, model, threshold: float = 1.0) -> dict[str, float]:
    """ZD of every block: the z-score fraction over the concatenation of the block's linear kernels."""
    out = {}
    for bp, ks in block_kernels(params, model).items():
        w = jnp.concatenate([jnp.ravel(k) for k in ks.values()])
        out[bp] = float(z_score_fraction(w, threshold))
    return out


# ------------------------------------------------------------------------------------- Hessian trace (HAWQ-V2)


def _probe_impl(loss_fn, params, key, *args):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    v = jax.tree_util.tree_unflatten(
        treedef, [jax.random.rademacher(k, l.shape, jnp.float32) for k, l in zip(keys, leaves)])
    _, hv = jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))
    return jax.tree_util.tree_map(lambda a, b: jnp.vdot(a, b), v, hv)


_probe = jax.jit(_probe_impl, static_argnums=0)


def hutchinson_trace(loss_fn: Callable, params, *args, n_probes: int = 16, seed: int = 0, tol: float | None = None,
                     progress: bool | None = None):
    """Hutchinson's estimate of the trace of every diagonal block of the Hessian of ``loss_fn(params, *args)`` with
    respect to ``params`` (any pytree; one block per leaf), as in HAWQ-V2 / PyHessian:

        Tr(H_ℓ) ≈ (1/m) Σ_k v_{k,ℓ}ᵀ (H v_k)_ℓ,   v_k ~ Rademacher over all leaves at once,

    H v by forward-over-reverse (``jax.jvp`` of ``jax.grad``), in float32. ``tol``: stop early when the running mean
    of the total trace changes by less than ``tol`` relatively (PyHessian); ``n_probes`` is the maximum.
    ``loss_fn`` must be hashable (a module-level function or a cached one): the probe is jitted with it static.

    Returns ``(traces, samples)``: pytrees like ``params`` of Python floats and of per-probe NumPy samples ``[m]``.
    """
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be None or positive, got {tol!r}")
    p32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    key = jax.random.PRNGKey(seed)
    samples, prev = [], None
    for k in pbar(range(n_probes), progress, desc="Hutchinson"):
        s = _probe(loss_fn, p32, jax.random.fold_in(key, k), *args)
        samples.append(jax.tree_util.tree_map(float, s))
        total = float(np.mean([sum(jax.tree_util.tree_leaves(x)) for x in samples]))
        if tol is not None and prev is not None and abs(total - prev) / (abs(prev) + 1e-6) < tol:
            break
        prev = total
    stacked = jax.tree_util.tree_map(lambda *xs: np.asarray(xs, np.float64), *samples)
    return jax.tree_util.tree_map(lambda s: float(np.mean(s)), stacked), stacked


class _EmbeddingLoss(ByIdentity):
    """``loss(kernels, params, batch, f0) = (1/B) Σ_b ‖f(x_b; θ) − f0_b‖²`` for ``model``; hashable by the model's
    identity, so that the jitted Hutchinson probe (static in the loss) compiles once per model without writing
    anything into the caller's model."""

    __slots__ = ()

    def __call__(self, kernels, params, batch, f0):
        flat = dict(flatten(params))
        flat.update(kernels)
        out = self.model.forward(unflatten(flat, like=params), batch)
        d = jnp.asarray(out, jnp.float32) - f0
        return jnp.sum(d * d) / d.shape[0]


def hessian_traces(params, model, calib_batch, *, n_probes: int = 16, seed: int = 0, tol: float | None = None,
                   progress: bool | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Hutchinson traces Tr(H_i) of every linear kernel of ``model``'s blocks for the embedding-distance loss
    L(θ) = (1/B) Σ_b ‖f(x_b; θ) − f(x_b; θ₀)‖² at θ = θ₀ (see the module docstring). Returns
    ``({kernel_path: trace}, {kernel_path: per-probe samples})``."""
    kernels = {p: k for ks in block_kernels(params, model).values() for p, k in ks.items()}
    p32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    batch = jax.tree_util.tree_map(jnp.asarray, calib_batch)
    f0 = jnp.asarray(model.forward(p32, batch), jnp.float32)
    return hutchinson_trace(_EmbeddingLoss(model), kernels, p32, batch, f0, n_probes=n_probes, seed=seed, tol=tol,
                            progress=progress)


def hawq_sensitivity(trace, w: jax.Array, w_hat: jax.Array) -> jax.Array:
    """HAWQ-V2: Ω = Tr(H) / n · ‖Ŵ − W‖²_F (n = number of weights). float32 scalar; jit-able."""
    w = jnp.asarray(w, jnp.float32)
    d = jnp.asarray(w_hat, jnp.float32) - w
    return jnp.asarray(trace, jnp.float32) / w.size * jnp.sum(d * d)
