"""Query-key reparameterization (QKR) from OFQ (Liu et al. 2023, "Oscillation-free Quantization for Low-bit Vision
Transformers", Sec. 4.3).

Query and key weights oscillate most because the attention logits depend on their *product*; QKR quantizes that
product instead of the two factors. With Flax kernels ``W_q, W_k: [C, C]`` (``[in, out]``) and head ``h`` owning
output columns ``h d : (h+1) d``::

    W_qk,h = W_q[:, h] W_k[:, h]^T                      ([C, C]; query-side input x key-side input)
    logits_h[i, j] = (x_i Q(W_qk,h) x_j^T + x_i W_q[:, h] b_k,h + b_q,h . x_j W_k[:, h] + b_q,h . b_k,h) / sqrt(d)

``Q`` is StatsQ (:mod:`quant.statsq`) with one scale per row of the ``[H C, C]`` stack (the reference's
``multi_head_qk`` layout). The bias cross terms (absent in the bias-free reference) use the float weights. Values and
the output projection use the (already quantized) ``value`` / ``out`` parameters.

:func:`qkr_attention` re-implements ``jaxmodels.models.transformer.MultiHeadAttention.__call__`` from the module's
parameters; :mod:`quant.qat` calls it from an ``nn.intercept_methods`` interceptor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from quant.statsq import statsq_fake_quant

__all__ = ["qk_product", "qkr_logits", "qkr_attention"]


def qk_product(wq: jax.Array, wk: jax.Array, num_heads: int) -> jax.Array:
    """``[H, C, C]`` stack of ``W_q[:, h] W_k[:, h]^T``."""
    c, d_model = wq.shape
    if wk.shape != wq.shape or d_model % num_heads:
        raise ValueError(f"qk_product: shapes {wq.shape}, {wk.shape} with {num_heads} heads")
    dh = d_model // num_heads
    q = wq.reshape(c, num_heads, dh)
    k = wk.reshape(c, num_heads, dh)
    return jnp.einsum("chd,ehd->hce", q, k)


def qkr_logits(x, wq, wk, bq, bk, num_heads: int, bits: int | None) -> jax.Array:
    """Attention logits ``[..., H, T, T]`` with the quantized ``W_qk`` (see module docstring); ``bits=None`` keeps
    ``W_qk`` in float."""
    c, d_model = wq.shape
    dh = d_model // num_heads
    w_qk = qk_product(wq, wk, num_heads)
    if bits is None:  # float reparameterization (the identity check in the tests)
        w_hat = w_qk
    else:
        w_hat = statsq_fake_quant(w_qk.reshape(num_heads * c, c), bits, out_axis=0).reshape(num_heads, c, c)
    xf = x.astype(jnp.float32)
    logits = jnp.einsum("...ic,hce,...je->...hij", xf, w_hat.astype(jnp.float32), xf)
    if bq is not None and bk is not None:
        q = (xf @ wq).reshape(*x.shape[:-1], num_heads, dh)
        k = (xf @ wk).reshape(*x.shape[:-1], num_heads, dh)
        bqh, bkh = bq.reshape(num_heads, dh), bk.reshape(num_heads, dh)
        logits = logits + jnp.einsum("...ihd,hd->...hi", q, bkh)[..., :, None]
        logits = logits + jnp.einsum("...jhd,hd->...hj", k, bqh)[..., None, :]
        logits = logits + jnp.einsum("hd,hd->h", bqh, bkh)[:, None, None]
    return logits / jnp.sqrt(jnp.float32(dh))


def qkr_attention(mod, cfg, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Forward of a ``MultiHeadAttention``-shaped module (``query``/``key``/``value``/``out`` Dense children)."""
    p = mod.variables["params"]
    h = mod.num_heads
    *batch, length, d = x.shape
    qp, kp = p[cfg.query], p[cfg.key]
    out_name = getattr(mod, "out_name", "out")
    logits = qkr_logits(x, qp["kernel"], kp["kernel"], qp.get("bias"), kp.get("bias"), h, cfg.bits)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    vp, op = p["value"], p[out_name]
    v = x @ vp["kernel"] + (vp["bias"] if "bias" in vp else 0.0)
    v = v.reshape(*batch, length, h, d // h)
    y = jnp.einsum("...hqk,...khd->...qhd", weights.astype(v.dtype), v).reshape(*batch, length, d)
    return (y @ op["kernel"] + (op["bias"] if "bias" in op else 0.0)).astype(x.dtype)
