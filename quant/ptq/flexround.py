"""FlexRound: learnable rounding based on element-wise division for post-training quantization (Lee, Kim, Kwon &
Lee, ICML 2023, arXiv 2306.00317; reference: the authors' FlexRound/LRQ code, ``quant/UniformAffineQuantizer.py``
with ``mode='flexround'`` and ``quant/REM_fast.py``).

For a weight ``W[out, in]`` (the Flax kernel transposed) on a b-bit grid with integer zero point ``z``:

    Ŵ = s1 · ( clamp( ⌊ W ⊘ (s1 ⊙ S2 ⊙ s3 ⊙ s4) ⌉ + z, 0, 2^b − 1 ) − z )

* ``s1`` — the common grid step, one per (output channel, input group), initialised to the RTN min/max grid
  (:func:`quant.ptq._common.minmax_params`, the grid of :mod:`quant.ptq.rtn`) and learned;
* ``S2`` ``[out, in]`` — one learnable division factor per weight; ``s3`` ``[out, 1]`` per output channel — the
  paper's form for fully-connected layers and the authors' code (``delta1 + delta2 + delta3``); the paper's
  convolutions add ``s4`` per input channel, available here for linears as ``FlexRoundConfig(s4=True)`` ``[1, in]``
  (s4 = 1, i.e. absent, by default);
* every factor is exp-parameterised so it stays positive: ``s1 = s1⁰·exp(δ1)``, ``S2 = exp(Δ2)``, ``s3 = exp(δ3)``,
  ``s4 = exp(δ4)`` with all δ = 0 at the start (S2 = s3 = s4 = 1, s1 = RTN step: Ŵ is then *exactly* RTN);
  the reference stores ``log s1`` instead of ``δ1`` — same gradients and Adam steps, but ``exp(log s1) ≠ s1`` in
  floating point, which would break the exact reduction to RTN;
* ``⌊·⌉`` is round-to-nearest with a straight-through gradient (:func:`quant.fake_quant.ste_round`), the clamp has
  the usual zero gradient outside ``[0, 2^b − 1]``; the zero point ``z`` stays fixed.

Symmetric grids use the same formula with z = 2^(b−1) (the codes are ``q + 2^(b-1)`` of the signed grid
``clamp(⌊·⌉, −2^(b−1), 2^(b−1) − 1)`` of the reference).

Learning is block-wise output reconstruction (BRECQ-style, as ``REM_fast``): block ``ℓ``'s target is the float
block on the float inputs, ``Y = f_ℓ(X_fp; W)``; the block with FlexRound weights runs on the inputs that come out
of the already-quantized blocks ``0..ℓ−1``, and Adam minimises

    L(θ) = Σ_t m_t ‖f_ℓ(X_q,t; Ŵ(θ)) − Y_t‖² / Σ_t m_t          (m_t = 1 for real tokens, 0 for padding)

over θ = {δ1, Δ2, δ3, δ4} of every linear of the block, on random mini-batches of ``batch_size`` calibration
sequences, with learning rate ``lr · (1 + cos(π k / iters)) / 2`` (cosine annealing to 0). The reference's loss
``Σ_tokens Σ_features (·)² / (batch · features)`` differs by a constant factor only.

Only the integer each weight rounds to changes besides ``s1``: the result is stored as plain integer codes
``c = clamp(⌊W ⊘ (s1 ⊙ S2 ⊙ s3 ⊙ s4)⌉ + z, 0, 2^b − 1)`` with per-group scale ``s1`` and zero ``z``, and
``s1 · (c − z)`` is bit-for-bit the Ŵ used in training (the report feeds :mod:`quant.ptq.export` like GPTQ/RTN).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.tree import flatten, unflatten
from quant.fake_quant import ste_round

from ._common import check_bits, grid_record, group_view, minmax_params, pbar

__all__ = ["FlexRoundConfig", "flexround", "flexround_quantize_weight", "flexround_init", "flexround_weight"]


@dataclasses.dataclass(frozen=True)
class FlexRoundConfig:
    """FlexRound hyper-parameters. Defaults follow the authors' Llama-2 W4A16 script (``iters_w=5000``,
    ``w_lr=3e-3``; 2.5e-3 at W3; mini-batches of 2 sequences, Adam, cosine annealing, ``clipping=False`` i.e. the
    plain min/max initial grid); scale ``iters`` down for CPU runs (a few hundred steps already move the rounding).

    ``batch_size``: calibration samples (leading axis of the activations: sequences for a block, rows for a single
    layer) per Adam step. ``learn_s1``: learn the grid step (the paper's ablation shows it matters). ``s4``: also
    learn a per-input-channel divisor (the paper's convolution form; its linear form and code use ``s3`` only).
    ``seed``: mini-batch sampling. ``chunk``: Adam steps per jitted call (progress-bar granularity).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    iters: int = 5000
    lr: float = 3e-3
    batch_size: int = 2
    learn_s1: bool = True
    s4: bool = False
    seed: int = 0
    chunk: int = 100

    def validate(self) -> None:
        check_bits(self.bits, self.group_size)
        for name in ("iters", "batch_size", "chunk", "seed"):
            v = getattr(self, name)
            lo = 0 if name in ("iters", "seed") else 1
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float, np.floating)) \
                or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")


# ----------------------------------------------------------------------------------------------- the quantizer

def flexround_init(w_oi: jax.Array, bits: int, group_size: int = -1, sym: bool = False, *, s4: bool = False,
                   learn_s1: bool = True):
    """Initial state of one weight ``W[out, in]``: ``(theta, grid)``.

    ``grid = {"s1": s1⁰ [out, n_groups], "zero": z [out, n_groups]}`` is the RTN min/max grid (fixed);
    ``theta = {"d1": δ1 [out, n_groups], "d2": Δ2 [out, in], "d3": δ3 [out, 1], "d4": δ4 [1, in]}`` are the learnable
    log-factors, all zero (``d1`` absent when ``learn_s1=False``, ``d4`` only with ``s4=True``).
    """
    check_bits(bits, group_size)
    return _init(jnp.asarray(w_oi, jnp.float32), bits, group_size, sym, s4, learn_s1)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init(w, bits, group_size, sym, s4, learn_s1):
    g = group_view(w, group_size)
    o, ng, gs = g.shape
    s1, zero = minmax_params(g.reshape(o * ng, gs), bits, sym)
    theta = {"d2": jnp.zeros(w.shape, jnp.float32), "d3": jnp.zeros((o, 1), jnp.float32)}
    if learn_s1:
        theta["d1"] = jnp.zeros((o, ng), jnp.float32)
    if s4:
        theta["d4"] = jnp.zeros((1, w.shape[1]), jnp.float32)
    return theta, {"s1": s1.reshape(o, ng), "zero": zero.reshape(o, ng)}


def _forward(w_oi, theta, grid, maxq):
    """(Ŵ, codes as float) of ``W[out, in]``; differentiable in ``theta`` (STE rounding)."""
    o, i = w_oi.shape
    ng = grid["s1"].shape[1]
    gs = i // ng
    s1 = (grid["s1"] * jnp.exp(theta["d1"]) if "d1" in theta else grid["s1"])[..., None]  # [o, ng, 1]
    z = grid["zero"][..., None]
    log_s = theta["d2"] + theta["d3"]
    if "d4" in theta:
        log_s = log_s + theta["d4"]
    # W ⊘ (s1 ⊙ S2 ⊙ s3 ⊙ s4) as (W ⊘ s1) ⊙ exp(−(Δ2 + δ3 + δ4)), per (row, group) view: the first division is the
    # very expression of RTN (quant.ptq._common.quantize_codes), so that with all δ = 0 the codes are RTN's bit for bit
    v = (w_oi.reshape(o, ng, gs) / s1) * jnp.exp(-log_s).reshape(o, ng, gs)
    q = ste_round(v) + z
    # torch.clamp's gradient: 1 on the closed range [0, maxq] (jnp.clip would give 1/2 at codes exactly 0 or maxq)
    codes = jnp.where((q >= 0) & (q <= maxq), q, jax.lax.stop_gradient(jnp.clip(q, 0.0, maxq)))
    return (s1 * (codes - z)).reshape(o, i), codes.reshape(o, i)


def flexround_weight(w_oi: jax.Array, theta: dict, grid: dict, bits: int):
    """FlexRound quantizer of ``W[out, in]`` (jit-able, differentiable in ``theta`` through the STE):

        Ŵ = s1 · (clamp(⌊W ⊘ (s1 ⊙ S2 ⊙ s3 ⊙ s4)⌉ + z, 0, 2^b − 1) − z),
        s1 = s1⁰·exp(δ1) (per group), S2 = exp(Δ2), s3 = exp(δ3), s4 = exp(δ4) (1 without ``d4``).

    Returns ``(Ŵ [out, in] float32, codes [out, in] uint8, s1 [out, n_groups])``; ``s1·(codes − z) == Ŵ`` exactly.
    """
    w = jnp.asarray(w_oi, jnp.float32)
    w_hat, codes = _forward(w, theta, grid, jnp.float32(2.0) ** bits - 1)  # ``bits`` may be traced
    s1 = grid["s1"] * jnp.exp(theta["d1"]) if "d1" in theta else grid["s1"]
    return w_hat, codes.astype(jnp.uint8), s1


# --------------------------------------------------------------------------------------- reconstruction engine

@dataclasses.dataclass(frozen=True)
class _BlockFn:
    """Block forward with some kernels replaced: ``f(frozen_params, {name: kernel [in, out]}, h, ctx)``."""

    block: nn.Module

    def __call__(self, frozen, kernels, h, ctx):
        flat = dict(flatten(frozen))
        for n, k in kernels.items():
            flat[n + "/kernel"] = k
        return self.block.apply({"params": unflatten(flat, like=frozen)}, h, **ctx)


@dataclasses.dataclass(frozen=True)
class _LinearFn:
    """One linear layer ``x @ K`` (layer-wise reconstruction)."""

    def __call__(self, frozen, kernels, h, ctx):
        return h @ kernels["linear"]


def _kernels(weights, theta, grids, maxq):
    return {n: _forward(weights[n], theta[n], grids[n], maxq)[0].T for n in weights}


def _loss(theta, fn, frozen, weights, grids, maxq, h, ctx, y, tok):
    out = fn(frozen, _kernels(weights, theta, grids, maxq), h, ctx).astype(jnp.float32)
    err = jnp.sum(((out - y) ** 2).reshape(tok.shape + (-1,)), axis=-1)
    return jnp.sum(err * tok) / jnp.maximum(jnp.sum(tok), 1e-12)


_ADAM = optax.scale_by_adam()  # torch.optim.Adam defaults: b1 = 0.9, b2 = 0.999, eps = 1e-8


@functools.partial(jax.jit, static_argnames=("fn", "batch_size"))
def _adam_steps(fn, frozen, weights, grids, theta, opt_state, data, ctx_fixed, key, start, n, iters, lr, maxq,
                batch_size):
    """``n`` Adam steps (k = start .. start+n−1) on random mini-batches of ``batch_size`` leading-axis samples."""
    N = data["tok"].shape[0]

    def body(k, carry):
        theta, opt_state = carry
        if batch_size >= N:
            b = data
        else:
            idx = jax.random.choice(jax.random.fold_in(key, k), N, (batch_size,), replace=False)
            b = jax.tree_util.tree_map(lambda a: a[idx], data)
        g = jax.grad(_loss)(theta, fn, frozen, weights, grids, maxq, b["h"], {**b["ctx"], **ctx_fixed}, b["y"],
                            b["tok"])
        upd, opt_state = _ADAM.update(g, opt_state)
        lr_k = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * k / jnp.maximum(iters, 1)))  # CosineAnnealingLR, eta_min = 0
        theta = jax.tree_util.tree_map(lambda p, u: p - lr_k * u, theta, upd)
        return theta, opt_state

    return jax.lax.fori_loop(start, start + n, body, (theta, opt_state))


@functools.partial(jax.jit, static_argnames=("fn",))
def _full_loss(fn, frozen, weights, grids, theta, data, ctx_fixed, maxq):
    return _loss(theta, fn, frozen, weights, grids, maxq, data["h"], {**data["ctx"], **ctx_fixed}, data["y"],
                 data["tok"])


@jax.jit
def _fold(weights, grids, theta, maxq):
    """Per weight: (Ŵ, uint8 codes, learned s1, fraction of weights rounded beyond both neighbours ⌊W/s1⌋, ⌈W/s1⌉
    of their own grid — the moves the paper credits to element-wise division and AdaRound cannot make)."""
    out = {}
    for n in weights:
        w, g = weights[n], grids[n]
        w_hat, codes = _forward(w, theta[n], g, maxq)
        s1 = g["s1"] * jnp.exp(theta[n]["d1"]) if "d1" in theta[n] else g["s1"]
        o, i = w.shape
        v = (w.reshape(o, s1.shape[1], -1) / s1[..., None]).reshape(o, i)
        z = jnp.repeat(g["zero"], i // s1.shape[1], axis=1)
        lo, hi = jnp.clip(jnp.floor(v) + z, 0, maxq), jnp.clip(jnp.ceil(v) + z, 0, maxq)
        beyond = jnp.mean(((codes < lo) | (codes > hi)).astype(jnp.float32))
        out[n] = (w_hat, codes.astype(jnp.uint8), s1, beyond)
    return out


def _split_ctx(ctx: dict, n: int):
    """ctx entries with the calibration batch as leading axis (sliced per mini-batch) and the others."""
    batched, fixed = {}, {}
    for k, v in ctx.items():
        (batched if getattr(v, "ndim", 0) >= 1 and v.shape[0] == n else fixed)[k] = v
    return batched, fixed


def _reconstruct(fn, frozen, weights: dict, h, ctx: dict, y, tok, cfg: FlexRoundConfig, key, progress, desc):
    """Learn FlexRound's θ for ``weights`` ({name: W[out, in]}) so that ``fn`` on ``h`` reproduces ``y``.
    Returns ``({name: (Ŵ[out, in], codes[out, in], s1, zero, beyond_nearest)}, loss at RTN, final loss)``."""
    maxq = jnp.float32(2**cfg.bits - 1)
    theta, grids = {}, {}
    for n, w in weights.items():
        theta[n], grids[n] = flexround_init(w, cfg.bits, cfg.group_size, cfg.sym, s4=cfg.s4, learn_s1=cfg.learn_s1)
    n_samples = tok.shape[0]
    ctx_b, ctx_f = _split_ctx(ctx, n_samples)
    data = {"h": h, "ctx": ctx_b, "y": y, "tok": tok}
    loss0 = float(_full_loss(fn, frozen, weights, grids, theta, data, ctx_f, maxq))
    opt_state = _ADAM.init(theta)
    bs = min(cfg.batch_size, n_samples)
    starts = list(range(0, cfg.iters, cfg.chunk))
    for s in pbar(starts, progress, desc=desc):
        n = min(cfg.chunk, cfg.iters - s)
        theta, opt_state = _adam_steps(fn, frozen, weights, grids, theta, opt_state, data, ctx_f, key,
                                       jnp.int32(s), jnp.int32(n), jnp.int32(cfg.iters), jnp.float32(cfg.lr), maxq,
                                       batch_size=bs)
    loss = float(_full_loss(fn, frozen, weights, grids, theta, data, ctx_f, maxq)) if cfg.iters else loss0
    folded = _fold(weights, grids, theta, maxq)
    return {n: (*folded[n][:3], grids[n]["zero"], float(folded[n][3])) for n in weights}, loss0, loss


def _record(w_in, w_hat, codes, s1, zero, beyond, cfg: FlexRoundConfig, kernel_layout: bool = True) -> dict:
    return grid_record(w_in, w_hat, codes, s1, zero, cfg.group_size, kernel_layout, bits=cfg.bits, sym=cfg.sym,
                       beyond_nearest=beyond)


def _check_group(in_features: int, group_size: int, what: str) -> None:
    if group_size != -1 and in_features % group_size:
        raise ValueError(f"{what}: input features {in_features} are not divisible by group_size {group_size}")


# ---------------------------------------------------------------------------------------------------- one layer

def flexround_quantize_weight(w: Any, x: Any, config: FlexRoundConfig = FlexRoundConfig(), *,
                              kernel_layout: bool = True, token_weights: Any = None,
                              progress: bool | None = None) -> dict:
    """FlexRound one linear layer by layer-wise output reconstruction (Lee et al., 2023):

        min_θ Σ_t m_t ‖x_t Ŵ(θ)ᵀ − x_t Wᵀ‖² / Σ_t m_t,   Ŵ = s1 · (clamp(⌊W ⊘ (s1 ⊙ S2 ⊙ s3 ⊙ s4)⌉ + z, 0, 2^b−1) − z)

    ``w``: Flax kernel ``[in, out]`` (``kernel_layout=False``: ``W[out, in]``); ``x[..., in]`` calibration inputs
    whose leading axis is sampled in mini-batches of ``config.batch_size``; ``token_weights`` (shape ``x.shape[:-1]``,
    default 1) m_t. Returns the dict of :func:`quant.ptq.rtn.rtn_quantize_weight` (``weight`` in the layout/dtype of
    ``w``, ``codes``, ``scale`` = learned s1, ``zero``, ``g_idx``, ``perm=None``) plus ``loss_rtn`` / ``loss`` (the
    objective at the RTN start and at the end) and ``beyond_nearest`` (fraction of weights whose code is neither
    ⌊W/s1⌋ nor ⌈W/s1⌉ of their learned grid: the paper's "rounded beyond the nearest grid points").
    """
    config.validate()
    w_in = jnp.asarray(w)
    if w_in.ndim != 2:
        raise ValueError(f"w must be a 2-D kernel, got shape {w_in.shape}")
    W = jnp.asarray(w_in, jnp.float32)
    W = W.T if kernel_layout else W
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"x{tuple(x.shape)} does not match the layer's {W.shape[1]} input features")
    _check_group(W.shape[1], config.group_size, "flexround_quantize_weight")
    tok = (jnp.ones(x.shape[:-1], jnp.float32) if token_weights is None
           else jnp.asarray(token_weights, jnp.float32))
    if tok.shape != x.shape[:-1]:
        raise ValueError(f"token_weights shape {tok.shape} != {x.shape[:-1]}")
    y = x @ W.T
    res, l0, l1 = _reconstruct(_LinearFn(), {}, {"linear": W}, x, {}, y, tok, config,
                               jax.random.PRNGKey(config.seed), progress, f"FlexRound w{config.bits}")
    out = _record(w_in, *res["linear"], config, kernel_layout)
    out.update(loss_rtn=l0, loss=l1)
    return out


# -------------------------------------------------------------------------------------------------- whole model

def flexround(params, model, calib_batch, config: FlexRoundConfig = FlexRoundConfig(), *,
              progress: bool | None = None):
    """FlexRound every linear layer of ``model`` (a :class:`quant.ptq.blocks.BlockModel`), block by block.

    Block ℓ learns θ of all its linears jointly by minimising ``Σ_t m_t ‖f_ℓ(X_q; Ŵ(θ)) − f_ℓ(X_fp; W)‖² / Σ_t m_t``
    (X_fp: float-model inputs, X_q: outputs of the already-quantized blocks; m_t: ``model.token_weight``), with
    ``Ŵ = s1 · (clamp(⌊W ⊘ (s1 ⊙ S2 ⊙ s3 ⊙ s4)⌉ + z, 0, 2^b − 1) − z)`` (module docstring); biases and norms stay
    float. The block is computed in float32.

    Returns ``(quantized_params, report)``: params with the dequantized kernels (input dtype) and
    ``{"method": "flexround", "config", "layers": {path: {weight, codes, scale (= learned s1), zero, g_idx,
    perm=None, error, beyond_nearest}}, "blocks": {block path: {"loss_rtn", "loss"}}}``; ``error`` is the relative
    output error ‖XW − XŴ‖² / ‖XW‖² of the layer on its (quantized-stream) calibration inputs, ``beyond_nearest`` as
    in :func:`flexround_quantize_weight`, ``loss_rtn``/``loss`` the block objective before and after learning.
    """
    from .blocks import dense_names, get_sub, set_kernels
    from .engine import walk_blocks

    config.validate()
    if calib_batch is None:
        raise ValueError("flexround needs a calibration batch")
    for bp in model.block_paths:  # shapes are checked before any work
        for name in dense_names(get_sub(params, bp)):
            _check_group(get_sub(get_sub(params, bp), name)["kernel"].shape[0], config.group_size, f"{bp}/{name}")
    fn = _BlockFn(model.block)
    key = jax.random.PRNGKey(config.seed)

    def step(view):
        frozen, block = view.params, view.source  # float32 copy / the block in its own dtype
        h_q, ctx, tok = view.hidden(), view.block_ctx(), jnp.asarray(view.tok(), jnp.float32)
        y_fp = jnp.asarray(view.model.apply_block(frozen, view.hidden(stream="float"), ctx), jnp.float32)
        view.float_outputs[0] = y_fp
        weights = {n: get_sub(frozen, n)["kernel"].T for n in view.names}
        res, l0, l1 = _reconstruct(fn, frozen, weights, h_q, ctx, y_fp, tok, config,
                                   jax.random.fold_in(key, view.index), progress, view.path)
        new_k, recs = {}, {}
        for n in view.names:
            k = get_sub(block, n)["kernel"]
            recs[n] = _record(jnp.asarray(k), *res[n], config)
            new_k[n] = recs[n]["weight"]
        for n, e in view.errors({n: (get_sub(block, n)["kernel"], recs[n]["weight"]) for n in recs}).items():
            recs[n]["error"] = e
        return set_kernels(block, new_k), recs, {"loss_rtn": l0, "loss": l1}

    out, layers, blocks = walk_blocks(params, model, calib_batch, step, feed="both", streaming=False,
                                      float32=True, progress=progress, desc=f"FlexRound w{config.bits}")
    return out, {"method": "flexround", "config": dataclasses.asdict(config), "layers": layers, "blocks": blocks}
