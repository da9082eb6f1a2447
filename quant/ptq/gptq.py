"""GPTQ: accurate post-training quantization for generative pre-trained transformers (Frantar et al., 2022).

A faithful JAX port of the reference ``GPTQ.fasterquant`` (IST-DASLab/gptq ``gptq.py``) for one linear layer with
weight ``W[out, in]`` (the Flax kernel transposed) and calibration inputs ``X[n, in]``:

    H = 2 XᵀX / n;   dead inputs (H_jj = 0): H_jj = 1 and W[:, j] = 0
    (act-order) perm = argsort(diag H, descending); W, H permuted
    H += λ I, λ = percdamp · mean(diag H)   (λ raised ×10 while the Cholesky fails)
    U = chol(H⁻¹)ᵀ  (upper Cholesky factor of the inverse Hessian)
    for each column q (in lazy blocks of ``block_size`` columns):
        Q[:, q] = quant(W[:, q]);  E = (W[:, q] - Q[:, q]) / U_qq
        W[:, q:] -= E · U[q, q:]       (inside the block; the rest of the matrix is updated once per block)
    loss_q = (W[:, q] - Q[:, q])² / (2 U_qq²)

Group parameters are found with the min/max quantizer of the reference either when a group starts (on the block-start
weights, exactly like the reference, whose ``W`` is only updated between blocks) or up front on the full weight
(``static_groups``). The column loop is a ``lax.fori_loop`` inside a jitted per-block update.

``quant(·)`` is the reference's uniform min/max integer grid (:class:`MinMaxQuantizer`) unless a ``quantizer`` is
passed: any hashable object with

* ``prepare(W) -> aux``: once per layer, on ``W[out, in]`` before GPTQ's updates and before the act-order
  permutation, so ``aux`` (any pytree of arrays, or ``None``) must not depend on the column order (a per-row anchor);
* ``params(groups[R, G, gs], aux) -> (scale[R, G], zero[R, G])``;
* ``quantize(w, scale, zero) -> codes`` and ``dequantize(codes, scale, zero) -> values``, elementwise on a column.

ZeroQuant-FP runs GPTQ in FP4 this way (:mod:`quant.ptq.zeroquant_fp`); ``config.bits``/``sym`` are then unused.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._common import check_bits, minmax_params, quantize_codes

__all__ = ["GPTQConfig", "MinMaxQuantizer", "gptq_quantize_weight", "hessian_from_inputs", "HessianAccumulator",
           "damped_inverse_cholesky"]


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's settings (the reference's names): ``bits``, ``group_size`` (input features per group; -1: one group per
    output channel), ``sym``, ``act_order`` (``desc_act``: columns in descending ``diag H`` order), ``static_groups``
    (group parameters up front on the full weight), ``block_size`` (columns per lazy block) and ``percdamp`` (the
    damping ``λ = percdamp · mean(diag H)``). ``validate()`` raises on invalid settings."""

    bits: int = 4
    group_size: int = 128          # -1: one group per output channel
    sym: bool = False
    act_order: bool = False        # desc_act
    static_groups: bool = False
    block_size: int = 128
    percdamp: float = 0.01

    def validate(self) -> None:
        check_bits(self.bits, self.group_size)
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0 < self.percdamp < 1:
            raise ValueError(f"percdamp must be in (0, 1), got {self.percdamp}")
        if self.static_groups and self.group_size == -1:
            raise ValueError("static_groups needs a group_size")


@dataclasses.dataclass(frozen=True)
class MinMaxQuantizer:
    """The reference's quantizer: per-row min/max grid (``quant.ptq._common.minmax_params``) of every group,
    ``codes = clamp(round(w/s) + z, 0, 2^b - 1)``, ``values = s (codes - z)``."""

    bits: int = 4
    sym: bool = False

    def prepare(self, W):
        return None

    def params(self, groups, aux):
        R, G, gs = groups.shape  # one call on [R·G, gs] rows (no vmap: the grid's IEEE division, quant.intgrid)
        s, z = minmax_params(groups.reshape(R * G, gs), self.bits, self.sym)
        return s.reshape(R, G), z.reshape(R, G)

    def quantize(self, w, scale, zero):
        return quantize_codes(w, scale, zero, 2**self.bits - 1)

    def dequantize(self, codes, scale, zero):
        return scale * (codes - zero)


def hessian_from_inputs(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """H = 2 XᵀX / n for inputs ``x[..., in]`` (optionally token weights ``w``: H = 2 Σ w_t x_t x_tᵀ / Σ w_t)."""
    x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    if weights is None:
        return 2.0 * (x.T @ x) / x.shape[0]
    w = jnp.asarray(weights, jnp.float32).reshape(-1)
    return 2.0 * ((x * w[:, None]).T @ x) / jnp.maximum(w.sum(), 1e-12)


class HessianAccumulator:
    """Running H = 2 Σ_t w_t x_t x_tᵀ / Σ_t w_t over batches (w_t = 1 for plain GPTQ; 0 masks padding tokens)."""

    def __init__(self, in_features: int):
        self.sum = jnp.zeros((in_features, in_features), jnp.float32)
        self.n = 0.0

    def add(self, x: jax.Array, weights: jax.Array | None = None) -> None:
        x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
        w = jnp.ones(x.shape[0], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32).reshape(-1)
        self.sum = self.sum + (x * w[:, None]).T @ x
        self.n += float(w.sum())

    @property
    def H(self) -> jax.Array:
        if self.n == 0:
            raise ValueError("HessianAccumulator: no calibration tokens were added")
        return 2.0 * self.sum / self.n


@jax.jit
def _inverse_cholesky(H, lam):
    """U = chol((H + λI)⁻¹)ᵀ (upper; UᵀU = (H + λI)⁻¹) in float32 with one Cholesky factorization: for the reversal
    permutation P and L = chol(P (H + λI) P), (H + λI)⁻¹ = (P L⁻ᵀ P)(P L⁻¹ P) with P L⁻ᵀ P lower triangular, so
    U = P L⁻¹ P. NaN when H + λI is not positive definite."""
    eye = jnp.eye(H.shape[0], dtype=jnp.float32)
    L = jnp.linalg.cholesky((H + lam * eye)[::-1, ::-1])
    return jax.lax.linalg.triangular_solve(L, eye, left_side=True, lower=True)[::-1, ::-1]


def damped_inverse_cholesky(H: Any, percdamp: float) -> tuple[jax.Array, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = percdamp·mean(diag H), ×10 until the factorization is finite.

    float32 on the device, as the reference (torch ``cholesky`` -> ``cholesky_inverse`` -> ``cholesky(upper=True)``
    in float32; here one factorization of the reversed matrix gives the same U). Returns ``(U, percdamp_used)``.
    """
    H = jnp.asarray(H, jnp.float32)
    mean_diag = jnp.mean(jnp.diag(H))
    pd = percdamp
    for _ in range(8):
        U = _inverse_cholesky(H, pd * mean_diag)
        if bool(jnp.all(jnp.isfinite(U))):
            return U, pd
        pd *= 10.0
    raise np.linalg.LinAlgError("GPTQ: Hessian is not positive definite even after raising the dampening 10^8x")


@functools.partial(jax.jit, static_argnames=("qz",))
def _gptq_block(W1, Hinv1, scale, zero, new_group, g_scale, g_zero, qz):
    """Quantize the columns of one lazy block. ``new_group[i]``: column i takes (g_scale[i], g_zero[i]) as its
    quantizer; otherwise it keeps the carried one. Returns Q1, codes, Err1, losses, carried scale/zero."""
    R, B = W1.shape

    def body(i, carry):
        W1, Q1, C1, E1, L1, S1, Z1, sc, zr = carry
        sc = jnp.where(new_group[i], g_scale[i], sc)
        zr = jnp.where(new_group[i], g_zero[i], zr)
        w = W1[:, i]
        d = Hinv1[i, i]
        c = qz.quantize(w, sc, zr)
        q = qz.dequantize(c, sc, zr)
        err = (w - q) / d
        W1 = W1 - err[:, None] * Hinv1[i][None, :]  # Hinv1 is upper triangular: only columns >= i change
        return (W1, Q1.at[:, i].set(q), C1.at[:, i].set(c), E1.at[:, i].set(err),
                L1.at[:, i].set((w - q) ** 2 / d**2), S1.at[:, i].set(sc), Z1.at[:, i].set(zr), sc, zr)

    z = jnp.zeros_like(W1)
    _, Q1, C1, E1, L1, S1, Z1, sc, zr = jax.lax.fori_loop(0, B, body, (W1, z, z, z, z, z, z, scale, zero))
    return Q1, C1, E1, L1, S1, Z1, sc, zr


@functools.partial(jax.jit, static_argnames=("B", "gs", "qz", "mode"))
def _gptq_step(W, U, i1, scale, zero, st_cols, aux, B, gs, qz, mode):
    """One lazy block at (traced) offset i1: quantize its B columns, then W[:, i2:] -= Err1 · U[i1:i2, i2:].

    Group parameters (``mode="dynamic"``) come from ``W[:, c:c+gs]`` as it is at the block start, exactly as in the
    reference (its ``W`` is only updated between blocks); ``mode="static"``: per-column parameters ``st_cols``."""
    R, C = W.shape
    W1 = jax.lax.dynamic_slice(W, (0, i1), (R, B))
    U1 = jax.lax.dynamic_slice(U, (i1, i1), (B, B))
    cols = i1 + jnp.arange(B)
    if mode == "none":
        new = jnp.zeros((B,), bool)
        g_scale = g_zero = jnp.zeros((B, R), jnp.float32)
    elif mode == "static":
        new = jnp.ones((B,), bool)
        g_scale = jax.lax.dynamic_slice(st_cols[0], (i1, 0), (B, R))
        g_zero = jax.lax.dynamic_slice(st_cols[1], (i1, 0), (B, R))
    else:
        all_s, all_z = qz.params(W.reshape(R, C // gs, gs), aux)  # [R, n_groups]
        new = cols % gs == 0
        g_scale, g_zero = all_s[:, cols // gs].T, all_z[:, cols // gs].T
    Q1, C1, E1, L1, S1, Z1, scale, zero = _gptq_block(W1, U1, scale, zero, new, g_scale, g_zero, qz)
    Urow = jax.lax.dynamic_slice(U, (i1, 0), (B, C))
    Urow = jnp.where(jnp.arange(C)[None, :] >= i1 + B, Urow, 0.0)
    W = W - E1 @ Urow
    return W, Q1, C1, S1, Z1, L1.sum() / 2, scale, zero


def gptq_quantize_weight(w: Any, H: Any, config: GPTQConfig = GPTQConfig(), *, kernel_layout: bool = True,
                         quantizer: Any = None) -> dict:
    """GPTQ one layer. ``w`` is a Flax kernel ``[in, out]`` (``kernel_layout=False``: ``W[out, in]``), ``H[in, in]``;
    ``quantizer``: the grid (default ``MinMaxQuantizer(config.bits, config.sym)``, see the module docstring).

    Returns the per-layer record of :mod:`quant.ptq`: ``weight`` (dequantized, same layout/dtype as ``w``),
    ``format="int"``, ``bits``, ``group_size``, ``sym`` (from ``config``), ``codes`` (uint8, layout of ``w``, in the
    ORIGINAL column order), ``scale``/``zero`` (``[out, n_groups]``, or per column when ``g_idx`` is needed),
    ``g_idx`` (group index of every input feature), ``perm`` (act-order permutation or None), ``loss`` (Σ of the
    reference's per-weight losses) and ``percdamp`` actually used.
    """
    config.validate()
    w_in = jnp.asarray(w)
    W = jnp.asarray(w_in, jnp.float32)
    W = W.T if kernel_layout else W
    R, C = W.shape
    H = np.array(H, np.float64)
    if H.shape != (C, C):
        raise ValueError(f"Hessian shape {H.shape} does not match the layer's {C} input features")
    gs = config.group_size
    if gs != -1 and C % gs:
        raise ValueError(f"input features {C} not divisible by group_size {gs}")
    qz = MinMaxQuantizer(config.bits, config.sym) if quantizer is None else quantizer

    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W = W.at[:, jnp.asarray(dead)].set(0.0) if dead.any() else W
    aux = qz.prepare(W)

    if config.static_groups:
        st_scale, st_zero = qz.params(W.reshape(R, C // gs, gs), aux)  # [R, n_groups]
    perm = None
    if config.act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
    U, pd = damped_inverse_cholesky(H, config.percdamp)
    U = jnp.asarray(U)

    if gs == -1:
        scale, zero = (p[:, 0] for p in qz.params(W[:, None, :], aux))
    else:
        scale = zero = jnp.zeros((R,), jnp.float32)

    mode = "none" if gs == -1 else ("static" if config.static_groups else "dynamic")
    if mode == "static":
        orig = perm if perm is not None else np.arange(C)
        st_cols = (st_scale[:, orig // gs].T, st_zero[:, orig // gs].T)  # [C, R] in processing order
    else:
        st_cols = (jnp.zeros((C, R), jnp.float32), jnp.zeros((C, R), jnp.float32))
    Q, codes, col_scale, col_zero = [], [], [], []
    losses = 0.0
    for i1 in range(0, C, config.block_size):
        B = min(i1 + config.block_size, C) - i1
        W, Q1, C1, S1, Z1, L1, scale, zero = _gptq_step(W, U, jnp.int32(i1), scale, zero, st_cols, aux, B=B,
                                                        gs=max(gs, 1), qz=qz, mode=mode)
        col_scale.append(S1)  # the quantizer each column used (for export)
        col_zero.append(Z1)
        Q.append(Q1)
        codes.append(C1)
        losses += float(L1)
    Q = jnp.concatenate(Q, axis=1)
    codes = jnp.concatenate(codes, axis=1)
    col_scale = jnp.concatenate(col_scale, axis=1)  # [R, C] in processing order
    col_zero = jnp.concatenate(col_zero, axis=1)
    if perm is not None:
        inv = np.argsort(perm)
        Q, codes, col_scale, col_zero = Q[:, inv], codes[:, inv], col_scale[:, inv], col_zero[:, inv]
    # Compact the per-column quantizer into groups when the grouping is contiguous in the original order.
    if gs == -1:
        g_idx = np.zeros(C, np.int32)
    elif perm is None or config.static_groups:
        g_idx = np.arange(C, dtype=np.int32) // gs
    else:
        g_idx = (np.argsort(perm)) // gs  # group of each original column = its position in the processing order
        g_idx = g_idx.astype(np.int32)
    n_groups = int(g_idx.max()) + 1
    first = np.array([np.flatnonzero(g_idx == g)[0] for g in range(n_groups)])
    scale_g, zero_g = col_scale[:, first], col_zero[:, first]
    out_w = Q.T if kernel_layout else Q
    out_c = codes.T if kernel_layout else codes
    return {
        "weight": out_w.astype(w_in.dtype),
        "format": "int",  # a custom ``quantizer``'s caller (ZeroQuant-FP) overwrites format / bits / sym / zero
        "bits": config.bits,
        "group_size": config.group_size,
        "sym": config.sym,
        "codes": out_c.astype(jnp.uint8),
        "scale": scale_g,
        "zero": zero_g,
        "g_idx": g_idx,
        "perm": perm,
        "loss": float(losses),
        "percdamp": pd,
    }


# ----------------------------------------------------------------------------------------------------- whole model

def layer_error(x, w, w_hat, weights=None) -> float:
    """Relative output error ‖XW − XŴ‖² / ‖XW‖² over (real) tokens."""
    return float(_layer_error(x, w, w_hat, weights))


@jax.jit
def _layer_error(x, w, w_hat, weights):
    x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    y, y_hat = x @ jnp.asarray(w, jnp.float32), x @ jnp.asarray(w_hat, jnp.float32)
    m = jnp.ones(x.shape[0]) if weights is None else jnp.asarray(weights, jnp.float32).reshape(-1)
    num = jnp.sum(m[:, None] * (y - y_hat) ** 2)
    den = jnp.maximum(jnp.sum(m[:, None] * y**2), 1e-30)
    return num / den


def gptq(params, model, calib_batch, config: GPTQConfig = GPTQConfig(), *, progress: bool | None = None,
         token_weights_fn=None, transform=None, quantizer=None, transforms=()):
    """GPTQ every linear layer of ``model`` (a :class:`quant.ptq.blocks.BlockModel`), block by block, on the one
    walk of :mod:`quant.ptq.engine`.

    Each block sees the outputs of the already-quantized previous blocks (reference ``opt_sequential``); the Hessian
    of every linear is ``2 Σ_t w_t x_t x_tᵀ / Σ_t w_t`` over the block's calibration tokens (w_t = 1, 0 for padding;
    RSQ passes attention-concentration weights via ``token_weights_fn(records, ctx)``), accumulated batch by batch
    when ``calib_batch`` is a list of batches. ``transform`` maps ``(path, kernel, H) -> (kernel', H', undo)``
    before GPTQ (``undo(kernel_hat)`` brings the result back); ``transforms``: :class:`quant.ptq.engine.
    LayerTransform` s (RSQ's rotation, LoRC). ``quantizer``: the per-layer grid (see :func:`gptq_quantize_weight`).

    Returns ``(quantized_params, report)``: the params with dequantized kernels (a drop-in float model) and a report
    ``{"layers": {path: {...codes, scale, zero, g_idx, perm, stored, error}}, "config": ...}``.
    """
    from .engine import LayerTransform, quantize_layers

    config.validate()
    if calib_batch is None:
        raise ValueError("GPTQ needs a calibration batch")
    ts = list(transforms)
    if transform is not None:
        class _Fn(LayerTransform):
            def before(self, path, w, stats):
                import dataclasses as dc

                k2, H2, undo = transform(path, w, stats.H)
                return k2, dc.replace(stats, H=H2), undo

        ts.insert(0, _Fn())

    def layer(w, stats, cfg):
        r = gptq_quantize_weight(w, stats.H, cfg, quantizer=quantizer)
        r["stored"] = r["weight"]  # what the codes dequantize to (in the transformed basis, if any)
        return r

    return quantize_layers(params, model, calib_batch, layer, config, transforms=ts,
                           token_weights_fn=token_weights_fn, progress=progress, desc=f"GPTQ w{config.bits}",
                           method="gptq", needs="hessian")
