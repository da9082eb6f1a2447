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

Modules: this one (config, GPTVQ assignment, the per-weight and whole-model entry points),
:mod:`~quant.ptq.codebook_kmeans` (step 1), :mod:`~quant.ptq.codebook_finetune` (steps 3-4) and
:mod:`~quant.ptq.codebook_storage` (layout, dequantization, packed storage); every public name is importable from here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quant.packing import packed_last_dim

from .codebook_finetune import _block_finetune, _layer_finetune, _layer_loss
from .codebook_kmeans import _kmeans, assign, kmeans, kmeans_step, weighted_distances
from .codebook_storage import (_HI, CodebookWeight, Layout, _argmin_quadratic, _codes_from_points, _f16, _to_points,
                               codebook_tree, dequantize_codes, materialize_codebooks, pack_codebook)
from .gptq import damped_inverse_cholesky

__all__ = ["CodebookConfig", "CodebookWeight", "codebook_quantize", "codebook_quantize_weight", "kmeans",
           "kmeans_step", "assign", "weighted_distances", "dequantize_codes", "pack_codebook", "codebook_tree",
           "materialize_codebooks", "bits_per_weight_formula", "check_model", "Layout"]


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




def bits_per_weight_formula(config: CodebookConfig, out_f: int, in_f: int) -> float:
    """Bits per weight of the packed storage: b·d bits per vector (rows padded to a multiple of 8 vectors, as
    :func:`quant.packing.pack_bits`) plus 16·k·d bits per group codebook."""
    lay = config.layout(out_f, in_f)
    nb = config.index_bits
    row_bytes = packed_last_dim(lay.n, nb) if nb <= 8 else lay.n + packed_last_dim(lay.n, nb - 8)
    code_bits = 8 * row_bytes * lay.R
    book_bits = 16 * lay.k * lay.d * lay.n_rg * lay.n_cg
    return (code_bits + book_bits) / (lay.R * lay.C)


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
    from .blocks import get_sub, set_kernels
    from .engine import walk_blocks

    config.validate()
    check_model(params, model, config)
    if calib_batch is None:
        raise ValueError("codebook_quantize needs a calibration batch")

    def step(view):
        bi = view.index
        block = view.params
        hs = view.hessians()  # H per linear (streamed over the batches)
        state, Ws, Hs, hist, pds = {}, {}, {}, {}, {}
        for li, name in enumerate(view.names):
            W = np.asarray(get_sub(block, name)["kernel"], np.float32).T
            lay = config.layout(*W.shape)
            W, Hn = _prepare(W, hs[name].H)
            Ws[name], Hs[name] = W, Hn
            cb, codes, pds[name] = _initial(W, Hn, lay, config, np.random.default_rng([config.seed, bi, li]))
            cb, codes, hist[name] = _layer_finetune(W, Hn, cb, codes, lay, config)
            state[name] = (cb, codes, lay)
        y_float = view.capture()[0]
        state, bhist = _block_finetune(view.model, block, state, Ws, Hs, view.hidden(), view.block_ctx(), y_float,
                                       view.tok(), config)
        new_k, recs = {}, {}
        for name, (cb, codes, lay) in state.items():
            k = get_sub(block, name)["kernel"]
            r = _result(jnp.asarray(k), cb, codes, lay, config, True, hist[name], pds[name])
            r["loss"] = float(_layer_loss(Ws[name], Hs[name], cb, codes, lay))
            recs[name] = r
            new_k[name] = r["weight"]
        for name, e in view.errors({n: (get_sub(block, n)["kernel"], recs[n]["weight"]) for n in recs}).items():
            recs[name]["error"] = e
        return set_kernels(block, new_k), recs, {"error_init": bhist[0], "error": bhist[-1], "history": bhist}

    out, layers, blocks = walk_blocks(params, model, calib_batch, step, streaming=False, progress=progress,
                                      desc=f"codebook {config.bits}b d{config.dim}")
    nbytes = sum(r["packed"].nbytes for r in layers.values())
    nweights = sum(int(np.prod(r["packed"].shape)) for r in layers.values())
    return out, {"method": "codebook", "config": dataclasses.asdict(config), "layers": layers, "blocks": blocks,
                 "bits_per_weight": 8.0 * nbytes / max(nweights, 1)}
