"""SparseGPT: massive language models can be accurately pruned in one shot (Frantar & Alistarh, 2023).

A JAX port of the reference ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt ``sparsegpt.py`` at 147d215; the same
code Wanda's ``lib/sparsegpt.py`` runs) for one linear with weight ``W[out, in]`` (the Flax kernel transposed),
Hessian ``H = 2 XᵀX / n`` and lazy blocks of ``B = block_size`` columns (default 128, ``percdamp`` 0.01)::

    dead inputs (H_jj = 0): H_jj = 1, W[:, j] = 0
    H += λ I,  λ = percdamp · mean(diag H);   U = chol(H⁻¹)ᵀ (upper: UᵀU = H⁻¹)
    for each block [i1, i2):
        unstructured: S = W[:, i1:i2]² / diag(U)[i1:i2]²  (the OBS saliency w²/[H_F⁻¹]_qq of the remaining
                      columns);  prune the ⌊R·i2·s⌋ − ⌊R·i1·s⌋ smallest S of the block
        for each column q of the block:
            N:M, q at a group start: per row, prune the n smallest S of columns q .. q+m−1 (on the current W)
            Q[:, q] = W[:, q] ⊙ keep[:, q];   E = (W[:, q] − Q[:, q]) / U_qq
            W[:, q:i2] −= E · U[q, q:i2]        (OBS update of the block's remaining columns)
        W[:, i2:] −= E_block · U[i1:i2, i2:]    (lazy update of the rest)
    loss = Σ (W_q − Q_q)² / (2 U_qq²)

Differences from the reference, on purpose: the unstructured mask prunes EXACTLY ⌊R·i2·s⌋ − ⌊R·i1·s⌋ entries of
each block (⌊R·C·s⌋ over the layer; ``R·B·s`` per block when that is an integer) with ties pruned lowest index first
(:mod:`quant.pruning.masks`), where the reference's ``tmp <= sort(tmp)[int(R·B·s)]`` prunes one entry more per
block plus every tie of its threshold; the N:M choice is the same rule on each row's m-run (the reference's
``topk(largest=False)`` leaves the order of ties to torch). λ is raised ×10 while the Cholesky factorization fails
(GPTQ's :func:`quant.ptq.gptq.damped_inverse_cholesky`; the reference has no retry). The engine's Hessian
``2 Σ_t m_t x_t x_tᵀ / Σ_t m_t`` (per real token) differs from the reference's ``2 Σ x xᵀ / n_sequences`` by one
positive factor, which changes neither the mask (``S`` scales by it) nor the update (``U[q, :] / U_qq`` is invariant).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .masks import (
    NM_PAIRWISE_MAX_M, check_layer_shapes, check_sparsity, layer_record, nm_keep, num_pruned, parse_nm, pruning_report,
    select_groups,
)

__all__ = ["SparseGPTConfig", "sparsegpt_prune_weight", "sparsegpt"]


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig:
    """``sparsity`` in [0, 1) (ignored with ``nm``); ``nm``: ``None`` | ``"n:m"`` | ``(n, m)`` (``block_size``
    must be a multiple of ``m``); ``block_size``: the lazy-update block (columns); ``percdamp``: λ / mean(diag H)."""

    sparsity: float = 0.5
    nm: str | tuple | None = None
    block_size: int = 128
    percdamp: float = 0.01

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        p = parse_nm(self.nm)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not 0 < self.percdamp < 1:
            raise ValueError(f"percdamp must be in (0, 1), got {self.percdamp}")
        if p is not None and p[1] > NM_PAIRWISE_MAX_M:
            raise ValueError(f"nm = {p[0]}:{p[1]}: m > {NM_PAIRWISE_MAX_M} is not supported by sparsegpt")
        if p is not None and self.block_size % p[1]:
            raise ValueError(f"block_size {self.block_size} must be a multiple of m={p[1]} (N:M groups start at "
                             "block-relative multiples of m, as in the reference)")


@functools.partial(jax.jit, static_argnames=("B",))
def _block_start(W, U, i1, B):
    """The block at ``i1``: ``W1 = W[:, i1:i1+B]``, ``U1 = U[i1:i1+B, i1:i1+B]`` and the reference's saliency
    ``W1² / diag(U1)²`` flattened row-major (the unstructured selection's input)."""
    R = W.shape[0]
    W1 = jax.lax.dynamic_slice(W, (0, i1), (R, B))
    U1 = jax.lax.dynamic_slice(U, (i1, i1), (B, B))
    return W1, U1, (W1**2 / jnp.diagonal(U1)[None, :] ** 2).reshape(-1)


@functools.partial(jax.jit, static_argnames=("m",))
def _prune_block(W1, U1, keep_flat, n, m):
    """The column loop of one block ``W1[R, B]`` in groups of ``m`` columns: prune column by column with the OBS
    update of the block's remaining columns. ``n > 0`` (N:M): at each group start the kept mask of the group's
    ``m`` columns is chosen per row on the current ``W1`` (``n`` pruned); ``n = 0`` (unstructured): ``keep_flat``,
    chosen at the block start. ``n`` is traced, so unstructured and n:m blocks of one shape share one compiled
    program (per (R, B, m), not per layer width). Returns ``(Q1, E1, keep1)``."""
    R, B = W1.shape
    d = jnp.diagonal(U1)

    def col(i, carry):
        W1, Q1, E1, keep1 = carry
        w = W1[:, i]
        q = jnp.where(keep1[:, i], w, 0.0)
        err = (w - q) / U1[i, i]
        W1 = W1 - err[:, None] * U1[i][None, :]  # U1 is upper triangular: only columns >= i change
        return W1, Q1.at[:, i].set(q), E1.at[:, i].set(err), keep1

    def group(g, carry):
        W1, Q1, E1, keep1 = carry
        i0 = g * m
        s = jax.lax.dynamic_slice(W1, (0, i0), (R, m)) ** 2 / jax.lax.dynamic_slice(d, (i0,), (m,))[None] ** 2
        kg = jnp.where(n > 0, nm_keep(s, n), jax.lax.dynamic_slice(keep1, (0, i0), (R, m)))
        keep1 = jax.lax.dynamic_update_slice(keep1, kg, (0, i0))
        return jax.lax.fori_loop(i0, i0 + m, col, (W1, Q1, E1, keep1))

    z = jnp.zeros_like(W1)
    _, Q1, E1, keep1 = jax.lax.fori_loop(0, B // m, group, (W1, z, z, keep_flat.reshape(R, B)))
    return Q1, E1, keep1


_LOOP_GROUP = 4  # unstructured blocks run the column loop in groups of 4 columns: the program 2:4 blocks use too


@jax.jit
def _all_kept(W1):
    """All-True ``[R·B]`` (computed from the committed ``W1``: a committed result, the same jit cache key as the
    unstructured selection's output)."""
    return (W1.reshape(-1) == 0) | True  # uses W1, so the jit keeps the (committed) argument


@functools.partial(jax.jit, static_argnames=("B",))
def _lazy_update(W, U, i1, E1, B):
    """``W[:, i1+B:] -= E1 · U[i1:i1+B, i1+B:]`` (the reference's update of the rest after a block) and the block's
    loss Σ (w − q)² / (2 U_qq²) = Σ E1² / 2."""
    C = W.shape[1]
    Urow = jax.lax.dynamic_slice(U, (i1, 0), (B, C))
    Urow = jnp.where(jnp.arange(C)[None, :] >= i1 + B, Urow, 0.0)
    return W - E1 @ Urow, jnp.sum(E1**2) / 2


@functools.partial(jax.jit, static_argnames=("kernel_layout",))
def _prepare(w, H, kernel_layout):
    """``W[out, in]`` in float32 and the reference's first step: dead inputs (diag H = 0) get H_jj = 1, W[:, j] = 0."""
    W = jnp.asarray(w, jnp.float32)
    W = W.T if kernel_layout else W
    H = jnp.asarray(H, jnp.float32)
    dead = jnp.diagonal(H) == 0
    return jnp.where(dead[None, :], 0.0, W), H + jnp.diag(dead.astype(H.dtype))


@functools.partial(jax.jit, static_argnames=("kernel_layout", "dtype"))
def _finish(Qs, keeps, kernel_layout, dtype):
    Q, keep = jnp.concatenate(Qs, axis=1), jnp.concatenate(keeps, axis=1)
    if kernel_layout:
        Q, keep = Q.T, keep.T
    return Q.astype(dtype), keep


def sparsegpt_prune_weight(w, H, config: SparseGPTConfig = SparseGPTConfig(), *, kernel_layout: bool = True) -> dict:
    """SparseGPT one layer: ``w`` a Flax kernel ``[in, out]`` (``kernel_layout=False``: ``W[out, in]``), ``H`` the
    ``[in, in]`` Hessian ``2 E[x xᵀ]`` (or a :class:`quant.ptq.engine.LayerStats` holding it). Returns the record
    (``weight``: pruned and OBS-updated, same layout and dtype as ``w``; ``mask``, ``sparsity``, ``pattern``,
    ``loss``: Σ of the reference's per-weight losses; ``percdamp`` used) of
    :func:`quant.pruning.masks.pruning_report`."""
    from quant.ptq.gptq import damped_inverse_cholesky

    if not isinstance(config, SparseGPTConfig):
        raise TypeError(f"config must be a SparseGPTConfig, got {type(config).__name__}")
    config.validate()
    if hasattr(H, "H") and hasattr(H, "n_tokens"):
        H = H.H
    if H is None:
        raise ValueError("sparsegpt needs the layer Hessian")
    w_in = jnp.asarray(w)
    if w_in.ndim != 2:
        raise ValueError(f"sparsegpt: expected a 2-D kernel, got shape {w_in.shape}")
    R, C = w_in.shape[::-1] if kernel_layout else w_in.shape
    check_layer_shapes({"w": (C, R)}, config.nm, where="sparsegpt_prune_weight")
    if tuple(np.shape(H)) != (C, C):
        raise ValueError(f"sparsegpt: Hessian shape {tuple(np.shape(H))} does not match the layer's {C} input "
                         "features")
    nm = parse_nm(config.nm)
    W, H = _prepare(w_in, H, kernel_layout)
    U, pd = damped_inverse_cholesky(H, config.percdamp)
    Q, keep, loss = [], [], 0.0
    s = float(config.sparsity)
    for i1 in range(0, C, config.block_size):
        i2 = min(i1 + config.block_size, C)
        n_keep = R * (i2 - i1) - (num_pruned(R * i2, s) - num_pruned(R * i1, s))
        B = i2 - i1
        W1, U1, sal = _block_start(W, U, jnp.int32(i1), B=B)
        if nm is None:  # the exact-count selection: one compiled program per (block size, kept count)
            keep_flat, n, m = select_groups(sal, max(n_keep, 1)), 0, _LOOP_GROUP if B % _LOOP_GROUP == 0 else 1
        else:
            keep_flat, (n, m) = _all_kept(W1), nm
        Q1, E1, k1 = _prune_block(W1, U1, keep_flat, jnp.int32(n), m=m)
        W, L1 = _lazy_update(W, U, jnp.int32(i1), E1, B=B)
        Q.append(Q1)
        keep.append(k1)
        loss += float(L1)
    Q, keep = _finish(tuple(Q), tuple(keep), kernel_layout, w_in.dtype)
    return layer_record(Q, keep, nm, loss=loss, percdamp=pd)


def sparsegpt(params, model, calib, config: SparseGPTConfig = SparseGPTConfig(), *, progress: bool | None = None):
    """SparseGPT every linear of ``model``'s blocks (a :class:`quant.ptq.blocks.BlockModel`), block by block on the
    walk of :mod:`quant.ptq.engine` (the reference's ``llama_sequential``: every linear of a block pruned with the
    Hessian of the unpruned block's inputs, the next block fed the pruned block's outputs). Returns ``(pruned
    params, report)`` (:func:`quant.pruning.masks.pruning_report`, with each layer's relative output error);
    ``params`` is not modified."""
    from quant.ptq.engine import quantize_layers

    from .magnitude import block_kernel_shapes

    if not isinstance(config, SparseGPTConfig):
        raise TypeError(f"config must be a SparseGPTConfig (sparsegpt(params, model, calib, "
                        f"SparseGPTConfig(sparsity))), got {type(config).__name__}")
    config.validate()
    if calib is None:
        raise ValueError("sparsegpt needs calibration data")
    check_layer_shapes(block_kernel_shapes(params, model), config.nm, where="sparsegpt")

    def layer(w, stats, cfg):
        return sparsegpt_prune_weight(w, stats.H, cfg)

    out, rep = quantize_layers(params, model, calib, layer, config, needs="hessian", feed="quantized",
                               progress=progress, desc="SparseGPT", method="sparsegpt")
    return out, pruning_report("sparsegpt", config, rep["layers"], params)

