"""Codebook (vector) post-training quantization: Hessian-weighted k-means codebooks per group, GPTQ-style error
feedback while assigning (GPTVQ), then learnable codebooks alternating with re-mapping of the codes (AQLM), with the
codes bit-packed and the codebooks in float16, so the bits per weight are measured, not assumed.

References: GPTVQ (van Baalen et al., 2024, "GPTVQ: The Blessing of Dimensionality for LLM Quantization"; reference
Qualcomm-AI-research/gptvq ``gptq.py``/``vq_quant.py``), AQLM (Egiazarian et al., 2024, "Extreme Compression of Large
Language Models via Additive Quantization"; reference Vahe1994/AQLM ``aq_engine.py``/``src/finetune.py``) and
SqueezeLLM (Kim et al., 2024, sensitivity-weighted non-uniform k-means).

Layout (weights in the GPTQ layout ``W[out, in]``, the Flax kernel transposed). A *vector* is ``d`` consecutive
input features of one output row, w_{r,v} = W[r, v·d : (v+1)·d]. A *group* is ``group_rows`` rows × ``group_cols``
columns; all vectors of group g share one codebook C_g ∈ R^{k×d} of k = 2^{b·d} entries (b = ``bits`` per weight, so a
vector index takes b·d bits), and Ŵ[r, v·d:(v+1)·d] = C_{g(r,v)}[a_{r,v}].

1. **Codebook initialisation** — weighted k-means (Lloyd/EM) in every group, on importances h ≥ 0 per coordinate:

       E-step   a_i = argmin_c Σ_j h_ij (x_ij − C_cj)²
       M-step   C_cj = Σ_{i: a_i = c} h_ij x_ij / Σ_{i: a_i = c} h_ij      (an empty cluster keeps its entry)

   (GPTVQ ``kmeans_vq``/``kmeans_m_step_3``; for d = 1 this is SqueezeLLM's sensitivity-weighted k-means). Seeds:
   weighted k-means++ (D² sampling, GPTVQ ``kpp``) or GPTVQ's default Mahalanobis init (points at evenly spaced ranks
   of (x − μ)ᵀ Σ⁻¹ (x − μ)). Importances: without error feedback the diagonal of the layer Hessian H = 2XᵀX/n,
   h_ij = H_jj (the exact output cost of perturbing w_ij alone, as SqueezeLLM's Fisher diagonal); with feedback the
   diagonal of the OBS metric below.

2. **Assignment with error feedback** (GPTVQ, ``error_feedback=True``; GPTQ's column loop applied to d columns at a
   time). U = chol((H + λI)⁻¹)ᵀ (upper, as GPTQ). Column groups are processed left to right; each group's codebooks
   come from k-means on the *current* (already error-updated) weights, then for each slot S of d columns:

       M = U_SS⁻¹ (d×d),   a_r = argmin_c ‖(w_r,S − C_c) M‖²,   E_r = (w_r,S − C_{a_r}) M,   W[:, >S] −= E U[S, >S]

   This is the exact OBS step for quantizing the d columns jointly: the loss of setting w_S to q with the remaining
   columns re-optimised is (w − q)ᵀ [(H_F⁻¹)_SS]⁻¹ (w − q) = ‖(w − q) U_SS⁻¹‖², and the optimal update of the later
   columns is −(w − q) U_SS⁻¹ U_{S,>S}. For d = 1 it is GPTQ's step with a non-uniform grid; the GPTVQ reference uses
   the diagonal of U_SS in both places (an approximation of the same expressions). The k-means importances of a
   column are diag(M Mᵀ) (for d = 1: 1/U_qq², GPTQ's loss weight).

3. **Layer fine-tuning** (GPTVQ's codebook update; AQLM's layer-wise alternation): rounds of ``layer_steps`` Adam steps
   on the codebooks with codes fixed, minimising the relative layer output error

       L(C) = tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ)

   then re-mapping: greedy coordinate descent over the code slots (AQLM's beam search with beam 1), each slot's code
   set to argmin_c e_c H_SS e_cᵀ + 2 e_c · (H_{S,¬S} R_{¬S})ᵀ per row, e_c = w_S − C_c, R = W − Ŵ, which never
   increases L.

4. **Block fine-tuning** (AQLM ``finetune_groupwise``): the codebooks of all linears of a block are learned with Adam
   to minimise the block's output reconstruction error on the calibration tokens,

       L_block = Σ_t m_t ‖f(h_t; Ŵ(C, a)) − f(h_t; W)‖² / Σ_t m_t ‖f(h_t; W)‖²

   (h: outputs of the already quantized previous blocks, m_t = 0 on padding), alternating with re-mapping (step 3's
   coordinate descent per linear). A move is kept only if it lowers L_block evaluated with the float16 codebooks
   that are stored, so fine-tuning never increases the block error of the k-means initialisation (GPTVQ restarts its
   codebook update, AQLM keeps its best parameters, for the same reason).

Adam works on the codebooks in units of the layer's weight RMS (``lr`` is a relative step size). Storage: the codes
of each row are bit-packed with :func:`quant.packing.pack_bits` (b·d bits per vector; above 8 bits as a low byte plus
the high bits), the codebooks in float16; the stored size gives the measured bits per weight

    bpw = 8 · (packed bytes + codebook bytes) / #weights  =  b + 16·k·d / (group_rows · group_cols)

(the formula when each row holds a multiple of 8 vectors; rows are padded to 8 codes otherwise).

All array work runs in jitted functions (one compile per layer layout); like GPTQ, :func:`codebook_quantize_weight`
and :func:`codebook_quantize` loop over column groups and blocks on the host, while :func:`kmeans_step`,
:func:`assign`, :func:`dequantize_codes`, :meth:`CodebookWeight.dequantize` and :func:`materialize_codebooks` are
jit-able. Everything computes in float32 (matmuls at HIGHEST precision); dequantized kernels take the input dtype.

Not implemented: GPTVQ's integer quantization of the codebooks, its block-wise weight scaling and SVD codebook
compression; AQLM's sum of several codebooks per vector (M > 1) and beam search with beam width > 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quant.packing import pack_bits, packed_last_dim, unpack_bits

from ._common import pbar
from .gptq import damped_inverse_cholesky

__all__ = ["CodebookConfig", "CodebookWeight", "codebook_quantize", "codebook_quantize_weight", "kmeans",
           "kmeans_step", "assign", "weighted_distances", "dequantize_codes", "pack_codebook", "codebook_tree",
           "materialize_codebooks", "bits_per_weight_formula", "check_model", "Layout"]

_HI = jax.lax.Precision.HIGHEST  # exact float32 products also on GPUs that would use TF32 by default


@dataclasses.dataclass(frozen=True)
class CodebookConfig:
    """Hyper-parameters of :func:`codebook_quantize` (defaults: 2-D vectors at 3 bits, 128×128 groups: 3.125 bpw).

    ``bits``: index bits per weight b (b·d must be an integer in 1..16; k = 2^{b·d}); ``dim``: vector length d;
    ``group_rows``/``group_cols``: output channels / input features sharing one codebook (-1: all); ``init``:
    ``"kpp"`` (weighted k-means++) or ``"mahalanobis"`` (GPTVQ); ``error_feedback``: GPTVQ's GPTQ-style assignment;
    ``layer_rounds`` × (``layer_steps`` Adam steps + remap) on the layer proxy; ``block_rounds`` ×
    (``block_steps`` Adam steps + remap) on the block output; ``lr``: Adam step relative to the layer's weight RMS.
    """

    bits: float = 3
    dim: int = 2
    group_rows: int = 128
    group_cols: int = 128
    init: str = "kpp"
    kmeans_iters: int = 10
    error_feedback: bool = True
    percdamp: float = 0.01
    layer_rounds: int = 1
    layer_steps: int = 25
    block_rounds: int = 2
    block_steps: int = 25
    lr: float = 1e-2
    remap: bool = True
    seed: int = 0

    @classmethod
    def at_budget(cls, bits: float, dim: int = 2, group_cols: int = 128, overhead: float = 0.125, **kw):
        """The config whose float16 codebooks cost ``overhead`` bits per weight on top of the b index bits:
        group_rows = 16·k·d / (overhead · group_cols) (e.g. b = 3, d = 2, 128 columns: 128 rows, 3.125 bpw)."""
        nb = bits * dim
        if abs(nb - round(nb)) > 1e-9 or not 1 <= round(nb) <= 16 or overhead <= 0:
            raise ValueError(f"no codebook config for bits={bits}, dim={dim}, overhead={overhead}")
        rows = 16 * 2 ** int(round(nb)) * dim / (overhead * group_cols)
        if rows != int(rows) or rows < 1:
            raise ValueError(f"overhead {overhead} with {group_cols} columns needs {rows} rows per group")
        return cls(bits=bits, dim=dim, group_rows=int(rows), group_cols=group_cols, **kw)

    @property
    def index_bits(self) -> int:
        return int(round(self.bits * self.dim))

    @property
    def k(self) -> int:
        return 2 ** self.index_bits

    def validate(self) -> None:
        if not isinstance(self.dim, int) or not 1 <= self.dim <= 8:
            raise ValueError(f"dim must be an integer in 1..8, got {self.dim!r}")
        if not isinstance(self.bits, (int, float)) or self.bits <= 0:
            raise ValueError(f"bits must be a positive number, got {self.bits!r}")
        nb = self.bits * self.dim
        if abs(nb - round(nb)) > 1e-9 or not 1 <= round(nb) <= 16:
            raise ValueError(f"bits * dim must be an integer in 1..16 (index bits of a vector), got "
                             f"{self.bits} * {self.dim} = {nb}")
        for name in ("group_rows", "group_cols"):
            v = getattr(self, name)
            if not isinstance(v, int) or (v != -1 and v < 1):
                raise ValueError(f"{name} must be -1 (whole dimension) or a positive integer, got {v!r}")
        if self.group_cols != -1 and self.group_cols % self.dim:
            raise ValueError(f"group_cols {self.group_cols} is not a multiple of dim {self.dim}")
        if self.init not in ("kpp", "mahalanobis"):
            raise ValueError(f"init must be 'kpp' or 'mahalanobis', got {self.init!r}")
        for name in ("kmeans_iters", "layer_rounds", "layer_steps", "block_rounds", "block_steps", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if not 0 < self.percdamp < 1:
            raise ValueError(f"percdamp must be in (0, 1), got {self.percdamp}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")

    def layout(self, out_f: int, in_f: int) -> "Layout":
        """The group layout of a ``W[out_f, in_f]`` weight; ValueError if the shape does not divide."""
        gr = out_f if self.group_rows == -1 else self.group_rows
        gc = in_f if self.group_cols == -1 else self.group_cols
        if gc % self.dim:
            raise ValueError(f"input features {in_f} (group_cols=-1) are not a multiple of dim {self.dim}")
        if in_f % gc:
            raise ValueError(f"input features {in_f} are not divisible by group_cols {gc}")
        if out_f % gr:
            raise ValueError(f"output features {out_f} are not divisible by group_rows {gr}")
        return Layout(out_f, in_f, self.dim, gr, gc, self.k)


class Layout(NamedTuple):
    """Static shape information: ``W[R, C]``, vectors of ``d`` columns, groups of ``gr`` rows × ``gc`` columns,
    ``k`` codebook entries."""

    R: int
    C: int
    d: int
    gr: int
    gc: int
    k: int

    @property
    def n(self) -> int:  # vectors per row
        return self.C // self.d

    @property
    def n_rg(self) -> int:
        return self.R // self.gr

    @property
    def n_cg(self) -> int:
        return self.C // self.gc


def bits_per_weight_formula(config: CodebookConfig, out_f: int, in_f: int) -> float:
    """Bits per weight of the packed storage: b·d bits per vector (rows padded to a multiple of 8 vectors, as
    :func:`quant.packing.pack_bits`) plus 16·k·d bits per group codebook."""
    lay = config.layout(out_f, in_f)
    nb = config.index_bits
    row_bytes = packed_last_dim(lay.n, nb) if nb <= 8 else lay.n + packed_last_dim(lay.n, nb - 8)
    code_bits = 8 * row_bytes * lay.R
    book_bits = 16 * lay.k * lay.d * lay.n_rg * lay.n_cg
    return (code_bits + book_bits) / (lay.R * lay.C)


# ------------------------------------------------------------------------------------------- weighted k-means (1)

def weighted_distances(x, h, c):
    """D[..., i, c] = Σ_j h_ij (x_ij − C_cj)² for points ``x[..., N, d]``, importances ``h[..., N, d]`` and
    centroids ``c[..., k, d]`` (summed coordinate by coordinate: exact zeros for coinciding vectors)."""
    x, h, c = (jnp.asarray(a, jnp.float32) for a in (x, h, c))
    dist = 0.0
    for j in range(x.shape[-1]):
        dist = dist + h[..., :, j, None] * (x[..., :, j, None] - c[..., None, :, j]) ** 2
    return dist


def assign(x, h, c):
    """E-step: a_i = argmin_c Σ_j h_ij (x_ij − C_cj)² (first minimum on ties)."""
    return jnp.argmin(weighted_distances(x, h, c), axis=-1).astype(jnp.int32)


def kmeans_step(x, h, c):
    """One weighted Lloyd step (GPTVQ ``kmeans_vq`` iteration): E-step ``a = assign(x, h, c)``, then
    C_cj = Σ_{i: a_i=c} h_ij x_ij / Σ_{i: a_i=c} h_ij, an entry with zero total importance kept as it is.
    Any leading batch axes (one codebook each). Returns ``(new centroids, assignments)``."""
    x, h, c = (jnp.asarray(a, jnp.float32) for a in (x, h, c))
    a = assign(x, h, c)
    k, d = c.shape[-2:]
    lead = a.shape[:-1]
    G = int(np.prod(lead))
    ids = (a.reshape(G, -1) + k * jnp.arange(G, dtype=jnp.int32)[:, None]).reshape(-1)  # cluster id per point
    num = jax.ops.segment_sum((h * x).reshape(-1, d), ids, num_segments=G * k).reshape(*lead, k, d)
    den = jax.ops.segment_sum(h.reshape(-1, d), ids, num_segments=G * k).reshape(*lead, k, d)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), c), a


def _kpp_one(x, h, k, u):
    """Weighted k-means++ (D² sampling, as GPTVQ ``kpp_parallel_sampled``) for one group ``x[N, d]`` with uniforms
    ``u[k]``: the first seed drawn ∝ the point's total importance, each next one ∝ its importance-weighted squared
    distance to the nearest seed, by inverse CDF (a point at distance 0 is never drawn while another is farther; when
    all are at 0 the first point is taken — a harmless duplicate)."""
    N, d = x.shape

    def draw(p, ui):
        cdf = jnp.cumsum(p)
        idx = jnp.sum(cdf <= ui * cdf[-1])  # first i with cdf_i > u·total: p_i > 0
        last = N - 1 - jnp.argmax(p[::-1] > 0)  # u·total rounded up to the total: the last point with p > 0
        return jnp.where(cdf[-1] > 0, jnp.where(idx < N, idx, last), 0)

    i0 = draw(h.sum(-1), u[0])
    c = jnp.zeros((k, d), jnp.float32).at[0].set(x[i0])
    d2 = (h * (x - x[i0]) ** 2).sum(-1)

    def body(i, carry):
        c, d2 = carry
        idx = draw(d2, u[i])
        return c.at[i].set(x[idx]), jnp.minimum(d2, (h * (x - x[idx]) ** 2).sum(-1))

    return jax.lax.fori_loop(1, k, body, (c, d2))[0]


def _mahalanobis_one(x, k):
    """GPTVQ ``mahalanobis_init`` for one group: the points at ranks round(linspace(0, N−1, k)) of
    (x − μ)ᵀ Σ⁻¹ (x − μ), Σ = Σ_i (x_i − μ)(x_i − μ)ᵀ (pseudo-inverse when singular)."""
    xc = x - x.mean(0, keepdims=True)
    lam = jnp.linalg.pinv(jnp.matmul(xc.T, xc, precision=_HI))
    dist = (jnp.matmul(xc, lam, precision=_HI) * xc).sum(-1)
    order = jnp.argsort(dist)
    idx = jnp.round(jnp.linspace(0, x.shape[0] - 1, k)).astype(jnp.int32)
    return x[order[idx]]


@functools.partial(jax.jit, static_argnames=("iters", "init"))
def _kmeans(x, h, u, iters: int, init: str):
    k = u.shape[-1]
    if init == "kpp":
        c = jax.vmap(_kpp_one, in_axes=(0, 0, None, 0))(x, h, k, u)
    else:
        c = jax.vmap(_mahalanobis_one, in_axes=(0, None))(x, k)
    return jax.lax.fori_loop(0, iters, lambda i, c: kmeans_step(x, h, c)[0], c)


def kmeans(x, h, k: int, iters: int = 10, init: str = "kpp", seed: int = 0):
    """Weighted k-means on ``x[G, N, d]`` with importances ``h[G, N, d]``: one codebook ``[k, d]`` per group,
    seeded by ``init`` ("kpp": weighted k-means++ with uniforms from ``numpy.random.default_rng(seed)``;
    "mahalanobis": GPTVQ's deterministic init), ``iters`` Lloyd steps (:func:`kmeans_step`), then a final E-step.
    Returns ``(centroids[G, k, d], assignments[G, N])``."""
    x = jnp.asarray(x, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    u = jnp.asarray(np.random.default_rng(seed).random((x.shape[0], k)), jnp.float32)
    c = _kmeans(x, h, u, iters, init)
    return c, assign(x, h, c)


# ------------------------------------------------------------------------------------------------ layout helpers

def _group_index(lay: Layout):
    rg = jnp.arange(lay.R) // lay.gr
    cg = (jnp.arange(lay.n) * lay.d) // lay.gc
    return rg, cg


def dequantize_codes(codebooks, codes, lay: Layout):
    """Ŵ[r, v·d:(v+1)·d] = codebooks[r // gr, (v·d) // gc, codes[r, v]]: ``codebooks[n_rg, n_cg, k, d]``,
    ``codes[R, C/d]`` -> ``Ŵ[R, C]`` (GPTQ layout)."""
    rg, cg = _group_index(lay)
    return codebooks[rg[:, None], cg[None, :], codes].reshape(lay.R, lay.C)


def _to_points(a, lay: Layout):
    """``[R, C]`` -> ``[n_rg, n_cg, gr·gc/d, d]``: the vectors of each group."""
    return (a.reshape(lay.n_rg, lay.gr, lay.n_cg, lay.gc // lay.d, lay.d).transpose(0, 2, 1, 3, 4)
            .reshape(lay.n_rg, lay.n_cg, lay.gr * lay.gc // lay.d, lay.d))


def _codes_from_points(a, lay: Layout):
    """``[n_rg, n_cg, gr·gc/d]`` -> ``[R, C/d]``."""
    return (a.reshape(lay.n_rg, lay.n_cg, lay.gr, lay.gc // lay.d).transpose(0, 2, 1, 3)
            .reshape(lay.R, lay.n))


def _f16(c):
    return c.astype(jnp.float16).astype(jnp.float32)


def _argmin_quadratic(cb, v, A, gr: int):
    """argmin_c c A cᵀ − 2 c·v_r for every row r, over the entries ``cb[r // gr]`` of its row group
    (``cb[n_rg, k, d]``, ``v[R, d]``, ``A[d, d]`` symmetric)."""
    n_rg = cb.shape[0]
    quad = jnp.einsum("gkd,de,gke->gk", cb, A, cb, precision=_HI)
    lin = jnp.einsum("gkd,grd->grk", cb, v.reshape(n_rg, gr, -1), precision=_HI)
    return jnp.argmin(quad[:, None, :] - 2.0 * lin, axis=-1).reshape(-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------ initial quantization

@functools.partial(jax.jit, static_argnames=("lay", "iters", "init"))
def _init_no_feedback(W, hcol, u, lay: Layout, iters: int, init: str):
    """k-means per group with h_ij = H_jj; codes = nearest float16 entry."""
    x = _to_points(W, lay).reshape(lay.n_rg * lay.n_cg, -1, lay.d)
    h = _to_points(jnp.broadcast_to(hcol[None, :], W.shape), lay).reshape(x.shape)
    c = _f16(_kmeans(x, h, u, iters, init))
    a = assign(x, h, c)
    return (c.reshape(lay.n_rg, lay.n_cg, lay.k, lay.d),
            _codes_from_points(a.reshape(lay.n_rg, lay.n_cg, -1), lay))


@functools.partial(jax.jit, static_argnames=("lay", "iters", "init"))
def _gptvq_group(W, U, i1, u, lay: Layout, iters: int, init: str):
    """GPTVQ on the column group starting at (traced) column ``i1``: k-means on the current weights with the OBS
    importances, then the slot loop with error feedback inside the group, then the lazy update of the later columns
    W[:, ≥i2] −= E U[i1:i2, ≥i2]. Returns ``(W, codebooks[n_rg, k, d], codes[R, gc/d])``."""
    R, C = W.shape
    d, gc = lay.d, lay.gc
    ns = gc // d
    W1 = jax.lax.dynamic_slice(W, (0, i1), (R, gc))
    U1 = jax.lax.dynamic_slice(U, (i1, i1), (gc, gc))
    blocks = U1.reshape(ns, d, ns, d)[jnp.arange(ns), :, jnp.arange(ns), :]  # U_SS per slot [ns, d, d]
    eye = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), blocks.shape)
    M = jax.lax.linalg.triangular_solve(blocks, eye, left_side=True, lower=False)  # U_SS⁻¹
    hcol = jnp.einsum("sij,sij->si", M, M, precision=_HI).reshape(gc)  # diag(M Mᵀ) per column
    lay1 = lay._replace(C=gc, gc=gc)
    x = _to_points(W1, lay1)[:, 0]
    h = _to_points(jnp.broadcast_to(hcol[None, :], W1.shape), lay1)[:, 0]
    cb = _f16(_kmeans(x, h, u, iters, init))
    rg = jnp.arange(R) // lay.gr

    def body(s, carry):
        W1, A1, E1 = carry
        w = jax.lax.dynamic_slice(W1, (0, s * d), (R, d))
        Ms = M[s]
        As = jnp.matmul(Ms, Ms.T, precision=_HI)
        # ‖(w − c) M‖² = w A wᵀ − 2 c·(A w) + c A cᵀ, A = M Mᵀ (the first term is the same for every c)
        a = _argmin_quadratic(cb, jnp.matmul(w, As, precision=_HI), As, lay.gr)
        q = cb[rg, a]
        E = jnp.matmul(w - q, Ms, precision=_HI)
        urow = jax.lax.dynamic_slice(U1, (s * d, 0), (d, gc))
        W1 = W1 - jnp.matmul(E, urow, precision=_HI)
        return W1, A1.at[:, s].set(a), jax.lax.dynamic_update_slice(E1, E, (0, s * d))

    init_carry = (W1, jnp.zeros((R, ns), jnp.int32), jnp.zeros((R, gc), jnp.float32))
    _, A1, E1 = jax.lax.fori_loop(0, ns, body, init_carry)
    urow = jax.lax.dynamic_slice(U, (i1, 0), (gc, C))
    urow = jnp.where(jnp.arange(C)[None, :] >= i1 + gc, urow, 0.0)
    W = W - jnp.matmul(E1, urow, precision=_HI)
    return W, cb, A1


def _prepare(W, H):
    """GPTQ's dead-input rule: H_jj = 0 -> H_jj = 1 and W[:, j] = 0. Both gathered onto one device as float32 (a
    sequential per-layer algorithm)."""
    W = jnp.asarray(np.asarray(W, np.float32))
    H = jnp.asarray(np.asarray(H, np.float32))
    return _dead_fix(W, H)


@jax.jit
def _dead_fix(W, H):
    dead = jnp.diag(H) == 0
    return jnp.where(dead[None, :], 0.0, W), H + jnp.diag(dead.astype(H.dtype))


def _initial(W, Hn, lay: Layout, cfg: CodebookConfig, rng: np.random.Generator):
    """Steps (1)–(2) on a prepared ``W``/``Hn``: returns codebooks [n_rg, n_cg, k, d] (float16 values), codes
    [R, C/d] and the dampening used (None without feedback)."""
    if not cfg.error_feedback:
        # the same uniforms per group as the feedback path draws column group by column group
        u = rng.random((lay.n_cg, lay.n_rg, lay.k)).transpose(1, 0, 2).reshape(lay.n_rg * lay.n_cg, lay.k)
        u = jnp.asarray(u, jnp.float32)
        cb, codes = _init_no_feedback(W, jnp.diag(Hn), u, lay, cfg.kmeans_iters, cfg.init)
        return cb, codes, None
    U, pd = damped_inverse_cholesky(Hn, cfg.percdamp)
    cbs, codes = [], []
    for i1 in range(0, lay.C, lay.gc):
        u = jnp.asarray(rng.random((lay.n_rg, lay.k)), jnp.float32)
        W, cb, a = _gptvq_group(W, U, jnp.int32(i1), u, lay, cfg.kmeans_iters, cfg.init)
        cbs.append(cb)
        codes.append(a)
    return jnp.stack(cbs, axis=1), jnp.concatenate(codes, axis=1), pd


# ---------------------------------------------------------------------------------- layer fine-tuning (3)

def _proxy(W, H, What):
    D = W - What
    return jnp.sum(jnp.matmul(D, H, precision=_HI) * D)


def _rel_layer_loss(W, H, codebooks, codes, lay: Layout):
    return _proxy(W, H, dequantize_codes(codebooks, codes, lay)) / jnp.maximum(_proxy(W, H, 0.0), 1e-30)


_layer_loss = jax.jit(_rel_layer_loss, static_argnames=("lay",))


def _rms(W):
    return jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(W))), 1e-12)


def _adam_best(loss_fn, th0, lr, steps):
    """``steps`` Adam steps from ``th0``; the best parameters seen (the start included) by ``loss_fn``."""
    opt = optax.adam(lr)
    pick = lambda c, a, b: jax.tree_util.tree_map(lambda x, y: jnp.where(c, x, y), a, b)

    def step(carry, _):
        th, st, best, best_l = carry
        l, g = jax.value_and_grad(loss_fn)(th)
        better = l < best_l
        upd, st = opt.update(g, st, th)
        return (optax.apply_updates(th, upd), st, pick(better, th, best), jnp.where(better, l, best_l)), None

    (th, _, best, best_l), _ = jax.lax.scan(step, (th0, opt.init(th0), th0, jnp.float32(jnp.inf)), None,
                                            length=steps)
    return pick(loss_fn(th) < best_l, th, best)


@functools.partial(jax.jit, static_argnames=("lay", "steps"))
def _layer_adam(W, H, codebooks, codes, lr, lay: Layout, steps: int):
    """Adam on the codebooks (codes fixed, in units of RMS(W)) minimising the relative layer error; returns the best
    codebooks rounded to float16 and their loss."""
    s = _rms(W)
    th = _adam_best(lambda th: _rel_layer_loss(W, H, th * s, codes, lay), codebooks / s, lr, steps)
    cb = _f16(th * s)
    return cb, _rel_layer_loss(W, H, cb, codes, lay)


def _remap_block(lay: Layout) -> int:
    """Columns per lazy block of the remap sweep: the largest multiple of d dividing C that is <= max(128, d)."""
    return max(b for b in range(lay.d, max(128, lay.d) + 1, lay.d) if lay.C % b == 0)


@functools.partial(jax.jit, static_argnames=("lay",))
def _remap(W, H, codebooks, codes, lay: Layout):
    """Greedy coordinate descent on tr(R H Rᵀ), R = W − Ŵ, over the code slots left to right (AQLM's code search
    with beam 1): slot S of row r takes argmin_c e_c H_SS e_cᵀ + 2 e_c·g_r, e_c = W[r, S] − C_c,
    g_r = Σ_{j∉S} R[r, j] H[j, S]; keeping the current code is a candidate, so the loss never increases.
    G = R H is kept exact inside a lazy block of columns and updated for the rest once per block (as GPTQ's lazy
    batches). Returns the new codes and their relative layer error."""
    d, R, C = lay.d, lay.R, lay.C
    B = _remap_block(lay)
    nb = B // d
    rg, cg = _group_index(lay)
    Rm = W - dequantize_codes(codebooks, codes, lay)
    G = jnp.matmul(Rm, H, precision=_HI)

    def block(bi, carry):
        Rm, G, A = carry
        c1 = bi * B
        R0 = jax.lax.dynamic_slice(Rm, (0, c1), (R, B))
        W1 = jax.lax.dynamic_slice(W, (0, c1), (R, B))
        H1 = jax.lax.dynamic_slice(H, (c1, c1), (B, B))

        def slot(s, carry):
            R1, G1, A = carry
            c0 = s * d
            cb = codebooks[:, cg[bi * nb + s]]  # [n_rg, k, d]
            e0 = jax.lax.dynamic_slice(R1, (0, c0), (R, d))
            hss = jax.lax.dynamic_slice(H1, (c0, c0), (d, d))
            g = jax.lax.dynamic_slice(G1, (0, c0), (R, d)) - jnp.matmul(e0, hss, precision=_HI)
            w = jax.lax.dynamic_slice(W1, (0, c0), (R, d))
            # e H eᵀ + 2 e·g with e = w − c equals c H cᵀ − 2 c·(H w + g) + terms without c
            a = _argmin_quadratic(cb, jnp.matmul(w, hss, precision=_HI) + g, hss, lay.gr)
            enew = w - cb[rg, a]
            G1 = G1 + jnp.matmul(enew - e0, jax.lax.dynamic_slice(H1, (c0, 0), (d, B)), precision=_HI)
            return jax.lax.dynamic_update_slice(R1, enew, (0, c0)), G1, A.at[:, bi * nb + s].set(a)

        G1 = jax.lax.dynamic_slice(G, (0, c1), (R, B))
        R1, _, A = jax.lax.fori_loop(0, nb, slot, (R0, G1, A))
        G = G + jnp.matmul(R1 - R0, jax.lax.dynamic_slice(H, (c1, 0), (B, C)), precision=_HI)
        return jax.lax.dynamic_update_slice(Rm, R1, (0, c1)), G, A

    _, _, A = jax.lax.fori_loop(0, C // B, block, (Rm, G, codes))
    return A, _rel_layer_loss(W, H, codebooks, A, lay)


def _layer_finetune(W, H, cb, codes, lay: Layout, cfg: CodebookConfig):
    """Rounds of (Adam on the codebooks → float16 → accept if better) and (remap → accept if better)."""
    best = float(_layer_loss(W, H, cb, codes, lay))
    history = [best]
    for _ in range(cfg.layer_rounds):
        if cfg.layer_steps:
            cb_new, l = _layer_adam(W, H, cb, codes, jnp.float32(cfg.lr), lay, cfg.layer_steps)
            if float(l) < best:
                cb, best = cb_new, float(l)
        if cfg.remap:
            codes_new, l = _remap(W, H, cb, codes, lay)
            if float(l) < best:
                codes, best = codes_new, float(l)
        history.append(best)
    return cb, codes, history


# ------------------------------------------------------------------------------------------------------ storage

@jax.tree_util.register_pytree_with_keys_class
class CodebookWeight:
    """A codebook-quantized kernel as stored: bit-packed codes (``packed``: one ``uint8`` array of b·d-bit codes per
    row, or for b·d > 8 a low-byte array and a high-bits array) and ``codebooks[n_rg, n_cg, k, d]`` in float16.
    ``shape`` is the Flax kernel shape ``(in, out)``; ``dequantize()`` returns that kernel (jit-able)."""

    def __init__(self, packed: tuple, codebooks, shape, dim: int, index_bits: int, group_rows: int,
                 group_cols: int, dtype):
        self.packed, self.codebooks = tuple(packed), codebooks
        self.shape, self.dim, self.index_bits = tuple(shape), int(dim), int(index_bits)
        self.group_rows, self.group_cols, self.dtype = int(group_rows), int(group_cols), np.dtype(dtype)

    def tree_flatten_with_keys(self):
        K = jax.tree_util.GetAttrKey
        ch = [(K(f"packed{i}"), p) for i, p in enumerate(self.packed)] + [(K("codebooks"), self.codebooks)]
        return ch, (len(self.packed), self.shape, self.dim, self.index_bits, self.group_rows, self.group_cols,
                    self.dtype.name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        npk, shape, dim, nb, gr, gc, dt = aux
        return cls(tuple(children[:npk]), children[npk], shape, dim, nb, gr, gc, dt)

    @property
    def layout(self) -> Layout:
        n_in, n_out = self.shape
        return Layout(n_out, n_in, self.dim, self.group_rows, self.group_cols, 2 ** self.index_bits)

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes + float16 codebooks."""
        return sum(int(np.prod(l.shape)) * np.dtype(l.dtype).itemsize for l in jax.tree_util.tree_leaves(self))

    @property
    def bits_per_weight(self) -> float:
        """Measured: 8 · stored bytes / number of weights."""
        return 8.0 * self.nbytes / int(np.prod(self.shape))

    def codes(self) -> jax.Array:
        """The ``int32`` codes ``[out, in/d]``."""
        return _unpack_codes(self.packed, self.index_bits, self.shape[0] // self.dim)

    def dequantize(self, dtype=None) -> jax.Array:
        w = dequantize_codes(jnp.asarray(self.codebooks, jnp.float32), self.codes(), self.layout)
        return w.T.astype(self.dtype if dtype is None else dtype)

    def __repr__(self):
        return (f"CodebookWeight(shape={self.shape}, dim={self.dim}, index_bits={self.index_bits}, groups="
                f"{self.group_rows}x{self.group_cols}, bpw={self.bits_per_weight:.4f})")


def _pack_codes_impl(codes, index_bits: int):
    codes = jnp.asarray(codes, jnp.int32)
    if index_bits <= 8:
        return (pack_bits(codes.astype(jnp.uint8), index_bits),)
    return (pack_bits((codes & 255).astype(jnp.uint8), 8), pack_bits((codes >> 8).astype(jnp.uint8), index_bits - 8))


def _unpack_codes_impl(packed, index_bits: int, n: int):
    if index_bits <= 8:
        return unpack_bits(packed[0], index_bits, n).astype(jnp.int32)
    lo = unpack_bits(packed[0], 8, n).astype(jnp.int32)
    return lo | (unpack_bits(packed[1], index_bits - 8, n).astype(jnp.int32) << 8)


_pack_codes = jax.jit(_pack_codes_impl, static_argnums=1)
_unpack_codes = jax.jit(_unpack_codes_impl, static_argnums=(1, 2))


def pack_codebook(codes, codebooks, kernel_shape, dim: int, index_bits: int, group_rows: int, group_cols: int,
                  dtype=jnp.float32) -> CodebookWeight:
    """Pack ``codes[out, in/d]`` (values < 2^index_bits; b·d bits each, above 8 bits as a low byte + the high bits)
    with :func:`quant.packing.pack_bits` and store ``codebooks`` as float16."""
    return CodebookWeight(_pack_codes(codes, index_bits), jnp.asarray(codebooks, jnp.float16), kernel_shape, dim,
                          index_bits, group_rows, group_cols, dtype)


# -------------------------------------------------------------------------------------------------- one weight

def codebook_quantize_weight(w: Any, H: Any, config: CodebookConfig = CodebookConfig(), *,
                             kernel_layout: bool = True) -> dict:
    """Codebook-quantize one layer: k-means codebooks (1) with GPTVQ error feedback (2) or plain nearest codes, then
    the layer fine-tuning rounds (3). ``w``: Flax kernel ``[in, out]`` (``kernel_layout=False``: ``W[out, in]``);
    ``H[in, in]``: the layer Hessian 2XᵀX/n (:func:`quant.ptq.gptq.hessian_from_inputs`). Dead inputs (H_jj = 0) get
    H_jj = 1 and W[:, j] = 0, as GPTQ.

    Returns ``weight`` (dequantized, layout/dtype of ``w``), ``format="codebook"``, ``bits``, ``group_size``
    (= ``group_cols``), ``codes[out, in/d]`` (uint8, or uint16 above 8 index
    bits), ``codebooks[n_rg, n_cg, k, d]`` (float16), ``packed`` (:class:`CodebookWeight`), ``bits_per_weight``
    (measured), ``loss_init``/``loss`` (relative layer error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) after step 2 / step 3),
    ``history`` and ``percdamp`` used (None without feedback).
    """
    config.validate()
    w_in = jnp.asarray(w)
    if w_in.ndim != 2:
        raise ValueError(f"expected a 2-D kernel, got shape {w_in.shape}")
    R, C = (w_in.shape[1], w_in.shape[0]) if kernel_layout else w_in.shape
    if np.shape(H) != (C, C):
        raise ValueError(f"Hessian shape {np.shape(H)} does not match the layer's {C} input features")
    lay = config.layout(R, C)
    W = np.asarray(w_in, np.float32)
    W, Hn = _prepare(W.T if kernel_layout else W, H)
    cb, codes, pd = _initial(W, Hn, lay, config, np.random.default_rng(config.seed))
    cb, codes, history = _layer_finetune(W, Hn, cb, codes, lay, config)
    return _result(w_in, cb, codes, lay, config, kernel_layout, history, pd)


@functools.partial(jax.jit, static_argnames=("lay", "kernel_layout", "dtype"))
def _dequant_out(cb, codes, lay: Layout, kernel_layout: bool, dtype):
    W = dequantize_codes(cb, codes, lay)
    return (W.T if kernel_layout else W).astype(dtype)


def _result(w_in, cb, codes, lay: Layout, cfg: CodebookConfig, kernel_layout, history, pd):
    packed = pack_codebook(codes, cb, (lay.C, lay.R), lay.d, cfg.index_bits, lay.gr, lay.gc, w_in.dtype)
    return {
        "weight": _dequant_out(cb, codes, lay, kernel_layout, np.dtype(w_in.dtype).name),
        "format": "codebook",  # the report schema of quant.ptq: ``packed`` is what export stores
        "bits": cfg.bits,
        "group_size": lay.gc,
        "sym": None,
        "codes": np.asarray(codes).astype(np.uint8 if cfg.index_bits <= 8 else np.uint16),
        "codebooks": packed.codebooks,
        "packed": packed,
        "bits_per_weight": packed.bits_per_weight,
        "loss_init": history[0],
        "loss": history[-1],
        "history": history,
        "percdamp": pd,
    }


# ------------------------------------------------------------------------------------------- whole model (4)

def _block_rel_loss(cbs, codes, block_params, h, ctx, target, tok, block, lays):
    """Σ_t m_t ‖f(h_t; Ŵ) − y_t‖² / Σ_t m_t ‖y_t‖², Ŵ from the codebooks ``cbs`` and ``codes`` of each linear."""
    from .blocks import set_kernels

    kern = {n: dequantize_codes(cbs[n], codes[n], lay).T for n, lay in lays}
    y = block.apply({"params": set_kernels(block_params, kern)}, h, **ctx)
    m = tok[..., None]
    return jnp.sum(m * (y - target) ** 2) / jnp.maximum(jnp.sum(m * target ** 2), 1e-30)


_block_loss = jax.jit(_block_rel_loss, static_argnames=("block", "lays"))


@functools.partial(jax.jit, static_argnames=("block", "lays", "steps"))
def _block_adam(cbs, codes, Ws, block_params, h, ctx, target, tok, lr, block, lays, steps):
    """Adam on all codebooks of the block (units RMS(W) of each linear), codes fixed; returns the best codebooks
    rounded to float16 and their block error."""
    s = {n: _rms(Ws[n]) for n, _ in lays}
    loss_fn = lambda th: _block_rel_loss({n: th[n] * s[n] for n in th}, codes, block_params, h, ctx, target, tok,
                                         block, lays)
    th = _adam_best(loss_fn, {n: cbs[n] / s[n] for n in cbs}, lr, steps)
    new = {n: _f16(th[n] * s[n]) for n in th}
    return new, _block_rel_loss(new, codes, block_params, h, ctx, target, tok, block, lays)


def _block_finetune(model, block, state, Ws, Hs, h, ctx, target, tok, cfg: CodebookConfig):
    """Step (4) on one block. ``state``: {name: (codebooks, codes, lay)}. Moves are accepted only if they lower the
    block error with float16 codebooks."""
    names = tuple(state)
    lays = tuple((n, state[n][2]) for n in names)
    cbs = {n: state[n][0] for n in names}
    codes = {n: state[n][1] for n in names}
    ctx = dict(ctx)
    best = float(_block_loss(cbs, codes, block, h, ctx, target, tok, model.block, lays))
    history = [best]
    for _ in range(cfg.block_rounds):
        if cfg.block_steps:
            new, l = _block_adam(cbs, codes, Ws, block, h, ctx, target, tok, jnp.float32(cfg.lr), model.block, lays,
                                 cfg.block_steps)
            if float(l) < best:
                cbs, best = new, float(l)
        if cfg.remap:
            new_codes = {n: _remap(Ws[n], Hs[n], cbs[n], codes[n], state[n][2])[0] for n in names}
            l = float(_block_loss(cbs, new_codes, block, h, ctx, target, tok, model.block, lays))
            if l < best:
                codes, best = new_codes, l
        history.append(best)
    return {n: (cbs[n], codes[n], state[n][2]) for n in names}, history


def check_model(params, model, config: CodebookConfig) -> None:
    """ValueError (before any work) if some linear of ``model`` cannot take the group layout of ``config``."""
    from jaxmodels.tree import flatten

    from .blocks import dense_names, get_sub

    flat = flatten(params)
    for bp in model.block_paths:
        for name in dense_names(get_sub(params, bp)):
            k = flat[f"{bp}/{name}/kernel"]
            try:
                config.layout(k.shape[1], k.shape[0])
            except ValueError as e:
                raise ValueError(f"{bp}/{name}/kernel {tuple(k.shape)}: {e}") from None


def codebook_quantize(params, model, calib_batch, config: CodebookConfig = CodebookConfig(), *,
                      progress: bool | None = None):
    """Codebook-quantize every linear of ``model`` (a :class:`quant.ptq.blocks.BlockModel`), block by block.

    Each block sees the outputs of the already-quantized previous blocks (as GPTQ's ``opt_sequential`` and AQLM);
    every linear gets H = 2 Σ_t m_t x_t x_tᵀ / Σ_t m_t from its calibration inputs and is quantized by steps 1–3
    (as :func:`codebook_quantize_weight`), then the block's codebooks and codes are fine-tuned on the block output
    (step 4) against the float block on the same inputs.

    Returns ``(quantized_params, report)``: float params whose kernels are the dequantized codebook weights (exactly
    what the packed storage dequantizes to) and ``{"method": "codebook", "config", "layers": {path: {weight, codes,
    codebooks, packed, bits_per_weight, error, loss_init, loss}}, "blocks": {path: {error_init, error, history}},
    "bits_per_weight"}``, the last the measured bits per weight over all quantized linears.
    """
    from .blocks import capture_dense, dense_names, get_sub, set_kernels, set_sub
    from .gptq import hessian_from_inputs, layer_error

    config.validate()
    check_model(params, model, config)
    h, ctx = model.embed(params, calib_batch)
    tok = model.token_weight(ctx)
    out = params
    layers, blocks = {}, {}
    for bi, bp in enumerate(pbar(model.block_paths, progress, desc=f"codebook {config.bits}b d{config.dim}")):
        block = get_sub(params, bp)
        y_float, rec = capture_dense(model, block, h, ctx)
        state, Ws, Hs, hist, pds = {}, {}, {}, {}, {}
        for li, name in enumerate(dense_names(block)):
            W = np.asarray(get_sub(block, name)["kernel"], np.float32).T
            lay = config.layout(*W.shape)
            W, Hn = _prepare(W, hessian_from_inputs(rec[name][0], tok))
            Ws[name], Hs[name] = W, Hn
            cb, codes, pds[name] = _initial(W, Hn, lay, config, np.random.default_rng([config.seed, bi, li]))
            cb, codes, hist[name] = _layer_finetune(W, Hn, cb, codes, lay, config)
            state[name] = (cb, codes, lay)
        state, bhist = _block_finetune(model, block, state, Ws, Hs, h, ctx, y_float, tok, config)
        new_k = {}
        for name, (cb, codes, lay) in state.items():
            k = get_sub(block, name)["kernel"]
            r = _result(jnp.asarray(k), cb, codes, lay, config, True, hist[name], pds[name])
            r["loss"] = float(_layer_loss(Ws[name], Hs[name], cb, codes, lay))
            r["error"] = layer_error(rec[name][0], k, r["weight"], tok)
            layers[f"{bp}/{name}/kernel"] = r
            new_k[name] = r["weight"]
        qblock = set_kernels(block, new_k)
        out = set_sub(out, bp, qblock)
        blocks[bp] = {"error_init": bhist[0], "error": bhist[-1], "history": bhist}
        h = model.apply_block(qblock, h, ctx)
    nbytes = sum(r["packed"].nbytes for r in layers.values())
    nweights = sum(int(np.prod(r["packed"].shape)) for r in layers.values())
    return out, {"method": "codebook", "config": dataclasses.asdict(config), "layers": layers, "blocks": blocks,
                 "bits_per_weight": 8.0 * nbytes / max(nweights, 1)}


def codebook_tree(params, report: dict):
    """``params`` with every layer of ``report["layers"]`` replaced by its packed :class:`CodebookWeight`."""
    from jaxmodels.tree import flatten, unflatten

    flat = dict(flatten(params))
    for p, rec in report["layers"].items():
        flat[p] = rec["packed"]
    return unflatten(flat)


def materialize_codebooks(tree, dtype=None):
    """Float params from a tree with :class:`CodebookWeight` leaves (jit-able: dequantize on the fly)."""
    is_cb = lambda l: isinstance(l, CodebookWeight)
    return jax.tree_util.tree_map(lambda l: l.dequantize(dtype) if is_cb(l) else l, tree, is_leaf=is_cb)
