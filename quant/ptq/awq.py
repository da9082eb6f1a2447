"""AWQ: activation-aware weight quantization (Lin et al., 2024), faithful to mit-han-lab/llm-awq
(``awq/quantize/auto_scale.py``, ``auto_clip.py``, ``pre_quant.run_awq``).

Per block (inputs from the *float* model, as ``run_awq``), per group of linears sharing one input x:

    x̄_j = mean_t |x_tj|;   for α in {0, 1/20, ..., 19/20}:  s = max(x̄^α, 1e-4);  s ← s / sqrt(max s · min s)
        L(α) = mean ‖f(x; Q(W·diag s)·diag(s)⁻¹) − f(x; W)‖²        (f = whole block for q/k/v, else the linear)
    s* = s(argmin L);  W ← W·diag(s*), x ← x / s*   (folded into the previous linear when possible)

then clipping per (output channel, input group) for every linear except query/key (as llm-awq):

    m = max|w_g| (1 − i/20), i = 0..9;   err(m) = mean_t (Σ_{j∈g} x_tj (Q(clamp(w, −m, m))_j − w_j))²  on ~512 tokens
    w ← clamp(w, −m*, m*)

and finally ``Q`` = asymmetric min/max g128 (``pseudo_quantize_tensor``; ``sym=True``: its ``zero_point=False``
grid, s = max(max|w_g|, 1e-5) / (2^(b−1) − 1), q = clamp(round(w/s), −2^(b−1), 2^(b−1) − 1)). No backprop.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..intgrid import absmax_scale
from ._common import AWQ_MIN_RANGE, awq_grid, awq_pseudo_quantize, check_bits, group_view, quantize_codes
from .blocks import get_sub, set_kernels, set_sub
from .gptq import layer_error

__all__ = ["AWQConfig", "awq", "awq_codes", "search_scale", "search_clip"]


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    """``sym``: llm-awq's ``zero_point=False`` grid (the inverse flag; one name, ``sym``, across quant.ptq)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    n_grid: int = 20
    max_shrink: float = 0.5
    n_sample_token: int = 512
    auto_scale: bool = True
    auto_clip: bool = True
    # llm-awq: q/k are not clipped (their bmm is hard to model): BERT/GPT, Llama and GPT-2's fused q|k|v names
    no_clip: tuple[str, ...] = ("query", "key", "q_proj", "k_proj", "c_attn")

    def validate(self):
        check_bits(self.bits, self.group_size)
        if self.n_grid < 1 or not 0 <= self.max_shrink < 1 or self.n_sample_token < 1:
            raise ValueError(f"invalid AWQ grid settings {self}")


_pq = jax.jit(awq_pseudo_quantize, static_argnums=(1, 2, 3))


def _q(w_oi, cfg):  # W[out, in] -> pseudo-quantized
    return _pq(w_oi, cfg.bits, cfg.group_size, not cfg.sym)


@jax.jit
def _linear_mse(x, eff, ref):
    return jnp.mean((x @ eff - x @ ref) ** 2)


def _scaled_q_impl(k, s, bits, gs, zp):
    return (awq_pseudo_quantize(k.T * s[None, :], bits, gs, zp) / s[None, :]).T


_scaled_q = jax.jit(_scaled_q_impl, static_argnums=(2, 3, 4))


def scale_candidates(x_mean_abs, n_grid):
    """[n_grid, in] candidate scales s = max(x̄^α, 1e-4) / sqrt(max·min), α = i / n_grid."""
    ratios = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    s = jnp.maximum(x_mean_abs[None, :] ** ratios[:, None], 1e-4)
    return s / jnp.sqrt(s.max(1, keepdims=True) * s.min(1, keepdims=True))


def search_scale(loss_fn, kernels: dict, x_mean_abs, cfg: AWQConfig):
    """Grid search of α: ``loss_fn({name: effective kernel [in, out]}) -> MSE``; kernels are Flax ``[in, out]``.
    Returns ``(best_s, best_alpha, losses)``. (:func:`awq` itself evaluates the whole grid in one compiled call,
    :func:`_grid_losses`; this one takes any Python loss.)"""
    cands = scale_candidates(x_mean_abs, cfg.n_grid)
    losses = []
    for s in cands:
        eff = {n: _scaled_q(k, s, cfg.bits, cfg.group_size, not cfg.sym) for n, k in kernels.items()}
        losses.append(float(loss_fn(eff)))
    i = int(np.argmin(losses))
    return cands[i], i / cfg.n_grid, losses


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _grid_losses(block, bits, gs, zp, kernels, cands, x, block_params, h, ctx, y_ref, rows):
    """L(α) for every candidate scale ``cands [n_grid, in]`` in one program (``jax.lax.map`` over the grid; the same
    per-candidate ops as :func:`search_scale`'s loop, without a dispatch and a host sync per α). ``block`` None:
    the group's own outputs, ``Σ_n mean((x Ŵ_n − x W_n)²)·out_n / Σ_n out_n``; else the whole block's output on the
    real tokens ``rows`` against ``y_ref``."""

    def one(s):
        eff = {n: _scaled_q_impl(k, s, bits, gs, zp) for n, k in kernels.items()}
        if block is None:
            return sum(jnp.mean((x @ eff[n] - x @ kernels[n]) ** 2) * kernels[n].shape[1]
                       for n in eff) / sum(k.shape[1] for k in kernels.values())
        yq = block.apply({"params": set_kernels(block_params, eff)}, h, **ctx)
        return jnp.mean((yq.reshape(-1, yq.shape[-1])[rows] - y_ref) ** 2)

    return jax.lax.map(one, cands)


@jax.jit
def _group_out(w_g, x_g):  # w_g [o, ng, gs], x_g [n, ng, gs] -> [o, n, ng]
    return jnp.einsum("ogk,ngk->ong", w_g, x_g)


def search_clip(w_oi, x, cfg: AWQConfig):
    """llm-awq ``auto_clip_layer``: best max |w| per (out, group) among (1 − i/n_grid)·max|w|, i < max_shrink·n_grid,
    judged by the per-group partial outputs on ``n_sample_token`` evenly strided tokens. Returns ``max_val [o, ng]``."""
    x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    step = max(x.shape[0] // cfg.n_sample_token, 1)
    return _search_clip(w_oi, x[::step], cfg.bits, cfg.group_size, not cfg.sym, int(cfg.max_shrink * cfg.n_grid),
                        cfg.n_grid)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _search_clip(w_oi, x, bits, group_size, zero_point, n_steps, n_grid):
    w_g = group_view(w_oi, group_size)
    o, ng, gs = w_g.shape
    x_g = x.reshape(x.shape[0], ng, gs)
    org_max = jnp.abs(w_g).max(-1)
    org_out = _group_out(w_g, x_g)
    best = org_max
    best_err = jnp.full_like(org_max, jnp.inf)
    for i in range(n_steps):
        mv = org_max * (1 - i / n_grid)
        cur = jnp.clip(w_g, -mv[..., None], mv[..., None])
        q = group_view(awq_pseudo_quantize(cur.reshape(o, ng * gs), bits, group_size, zero_point), group_size)
        err = ((_group_out(q, x_g) - org_out) ** 2).mean(1)
        better = err < best_err
        best_err = jnp.where(better, err, best_err)
        best = jnp.where(better, mv, best)
    return best


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def awq_codes(w_oi, bits: int, group_size: int, sym: bool):
    """The integer codes of :func:`quant.ptq._common.awq_pseudo_quantize` on ``w_oi[out, in]``: ``(codes[out, in]
    uint8, scale[out, G], zero[out, G] or None)`` with ``Q(w) = scale · (codes − zero)`` (asymmetric) or
    ``scale · (codes − 2^(b−1))`` (``sym``: llm-awq's ``zero_point=False`` grid,
    s = max(max|w_g|, 1e-5)/(2^(b−1)−1))."""
    g = group_view(w_oi, group_size)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        # the scale of awq_pseudo_quantize itself (an IEEE quotient): an eager ``/ qmax`` may become ``* (1/qmax)``
        # and differ by one ulp on some CPUs, and the stored codes would no longer give the record's weight
        scale = absmax_scale(jnp.abs(g).max(-1), bits, min_amax=AWQ_MIN_RANGE)
        q = jnp.clip(jnp.round(g / scale[..., None]), -qmax - 1, qmax) + (qmax + 1)
        return q.reshape(w_oi.shape).astype(jnp.uint8), scale, None
    scale, zero = awq_grid(w_oi, bits, group_size)
    codes = quantize_codes(g, scale[..., None], zero[..., None], 2**bits - 1)
    return codes.reshape(w_oi.shape).astype(jnp.uint8), scale, zero


def awq(params, model, calib_batch, config: AWQConfig = AWQConfig(), *, progress: bool | None = None):
    """AWQ every linear of ``model`` (a :class:`quant.ptq.blocks.BlockModel` with ``awq_groups``).

    Returns ``(quantized_params, report)``; ``quantized_params`` are float params whose kernels are the effective
    dequantized weights ``diag(1/s)·Q(diag(s)·clip(W))`` (``1/s`` folded into ``prev`` linears where the group has
    one), i.e. exactly the function the deployed model computes; the report holds per layer the stored
    quantized kernel ``Q(s·W)``, its grid, and the explicit input scale ``in_scale`` (``x/s`` at run time) or None.
    """
    from .engine import walk_blocks

    config.validate()
    if not model.awq_groups:
        raise ValueError("awq: the BlockModel defines no awq_groups")
    if calib_batch is None:
        raise ValueError("awq needs a calibration batch")
    alphas = {}

    def step(view):
        block = view.params
        h, ctx, tok = view.hidden(), view.block_ctx(), view.tok()
        valid = np.asarray(tok).reshape(-1) > 0
        y_float, rec = view.capture()
        kern = {n: jnp.asarray(get_sub(block, n)["kernel"], jnp.float32) for g in model.awq_groups for n in g.linears}
        bias = {n: jnp.asarray(get_sub(block, n)["bias"], jnp.float32) for n in kern if "bias" in get_sub(block, n)}
        xs = {n: jnp.asarray(rec[n][0], jnp.float32).reshape(-1, kern[n].shape[0])[valid] for n in kern}
        in_scale = {}
        rows = jnp.asarray(np.nonzero(valid)[0], jnp.int32)
        y_ref = jnp.asarray(y_float).reshape(-1, y_float.shape[-1])[rows]
        # 1) scale search on the float block (all groups searched before any is applied, as auto_scale_block)
        scales = {}
        for g in model.awq_groups:
            if not config.auto_scale:
                break
            x = xs[g.linears[0]]
            x_mean = jnp.abs(x).mean(0)
            sub = {n: kern[n] for n in g.linears}
            cands = scale_candidates(x_mean, config.n_grid)
            if g.inspect == "block":
                losses = _grid_losses(model.block, config.bits, config.group_size, not config.sym, sub, cands,
                                      None, block, h, ctx, y_ref, rows)
            else:
                losses = _grid_losses(None, config.bits, config.group_size, not config.sym, sub, cands, x,
                                      None, None, None, None, None)
            i = int(np.argmin(np.asarray(losses)))
            s, alpha = cands[i], i / config.n_grid
            scales[g] = s
            alphas[view.path, g.linears] = alpha
        # 2) apply: W ← diag(s) W; x ← x / s; fold 1/s into prev (a linear's output features or a norm's
        #    scale/bias, the Pre-LN decoders' case) or keep it as an input scale
        norms = {}
        for g, s in scales.items():
            for n in g.linears:
                kern[n] = kern[n] * s[:, None]
                xs[n] = xs[n] / s[None, :]
            if g.prev is not None and g.prev in kern:
                kern[g.prev] = kern[g.prev] / s[None, :]
                if g.prev in bias:
                    bias[g.prev] = bias[g.prev] / s
            elif g.prev is not None:  # a norm (LayerNorm / RMSNorm): y = n(h)·γ (+ β) -> γ/s, β/s
                nrm = dict(norms.get(g.prev, get_sub(block, g.prev)))
                if "scale" not in nrm:
                    raise ValueError(f"awq: {view.path}/{g.prev} is neither a linear of an AWQ group nor a norm "
                                     "with a scale")
                for key in ("scale", "bias"):
                    if key in nrm:
                        nrm[key] = (jnp.asarray(nrm[key], jnp.float32) / s).astype(jnp.asarray(nrm[key]).dtype)
                norms[g.prev] = nrm
            else:
                for n in g.linears:
                    in_scale[n] = s
        # 3) clip search and quantization
        eff_k, recs = {}, {}
        for n in kern:
            w_oi = kern[n].T  # scaled float weight: the deployed linear computes (x / s) @ Q(diag(s) W)
            if config.auto_clip and n.split("/")[-1] not in config.no_clip:
                mv = search_clip(w_oi, xs[n], config)
                w_oi = jnp.clip(group_view(w_oi, config.group_size), -mv[..., None], mv[..., None]).reshape(w_oi.shape)
            q_oi = _q(w_oi, config)
            codes, sc, zr = awq_codes(w_oi, config.bits, config.group_size, config.sym)
            k_eff = q_oi.T if n not in in_scale else q_oi.T / in_scale[n][:, None]
            eff_k[n] = k_eff
            C = w_oi.shape[1]
            gs = C if config.group_size == -1 else config.group_size
            recs[n] = {"weight": k_eff, "format": "int", "bits": config.bits, "group_size": config.group_size,
                       "sym": config.sym, "codes": codes.T, "scale": sc, "zero": zr,
                       "g_idx": (jnp.arange(C) // gs).astype(jnp.int32), "perm": None, "stored": q_oi.T,
                       "in_scale": in_scale.get(n), "error": layer_error(xs[n], kern[n], q_oi.T)}
        qblock = set_kernels(block, eff_k, {n: b for n, b in bias.items()})
        for nm, nrm in norms.items():
            qblock = set_sub(qblock, nm, nrm)
        return qblock, recs, None

    # the next block sees float activations (run_awq)
    out, layers, _ = walk_blocks(params, model, calib_batch, step, feed="float", streaming=False,
                                 progress=progress, desc=f"AWQ w{config.bits}")
    return out, {"method": "awq", "config": dataclasses.asdict(config), "layers": layers,
                 "alphas": {f"{bp}:" + "/".join(k): v for (bp, k), v in alphas.items()}}
