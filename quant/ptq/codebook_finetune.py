"""Codebook quantization steps 3-4: layer fine-tuning (Adam on the codebooks with codes fixed, alternating with
greedy re-mapping of the codes) and block fine-tuning on the calibration outputs (AQLM ``finetune_groupwise``).
Equations in :mod:`quant.ptq.codebook`."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from .codebook_storage import _HI, Layout, _argmin_quadratic, _f16, _group_index, dequantize_codes

if TYPE_CHECKING:
    from .codebook import CodebookConfig


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
