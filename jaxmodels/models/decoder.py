"""Pieces shared by the decoders of this package (:mod:`jaxmodels.models.llama`, :mod:`jaxmodels.models.gpt2`):
rotary position embeddings with transformers' scalings, the causal / padding / sliding-window mask in cache-slot
coordinates, grouped-query attention, and the preallocated KV-cache update (equations in the llama module
docstring). All names are also importable from :mod:`jaxmodels.models.llama`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rope_inv_freq", "apply_rope", "decoder_mask", "block_mask", "causal_attention", "update_cache",
           "check_input_ids"]


def rope_inv_freq(config: Any) -> np.ndarray:
    """``inv_freq`` [d_head / 2] float32 as transformers computes it (llama module docstring), scaling included;
    ``config`` has ``dim_head``, ``rope_theta`` and ``rope_scaling_dict`` (a :class:`LlamaConfig`)."""
    dim = config.dim_head
    base = np.float32(config.rope_theta)
    inv = (np.float32(1.0) / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    rs = config.rope_scaling_dict or {}
    kind = rs.get("rope_type", "default")
    if kind == "linear":
        inv = (inv / np.float32(rs["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = np.float32(rs["factor"])
        lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        low_wl, high_wl = old / lo, old / hi
        wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
        llama = np.where(wavelen > low_wl, inv / factor, inv).astype(np.float32)
        smooth = ((np.float32(old) / wavelen - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * llama / factor + smooth * llama).astype(np.float32)
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, llama).astype(np.float32)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding of ``x [B, T, heads, d_head]`` at integer ``positions [B, T]`` (module docstring)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def decoder_mask(q_len: int, kv_len: int, offset: Any = 0, key_mask: jax.Array | None = None,
                 window: int | None = None) -> jax.Array:
    """Boolean attention mask ``[B or 1, 1, q_len, kv_len]``: query t sits at slot ``offset + t`` and may attend
    key slot j iff ``j <= offset + t``, ``key_mask[b, j] > 0`` (if given, ``[B, kv_len]``) and, with a sliding
    ``window``, ``j > offset + t - window``."""
    q = jnp.arange(q_len)[:, None] + offset
    j = jnp.arange(kv_len)[None, :]
    allowed = j <= q
    if window is not None:
        allowed = allowed & (j > q - window)
    allowed = allowed[None, None]
    if key_mask is not None:
        if key_mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask covers {key_mask.shape[-1]} positions, the keys are {kv_len}")
        allowed = allowed & (key_mask > 0)[:, None, None, :]
    return allowed


def block_mask(attention_mask: jax.Array | None, q_len: int, kv_len: int, offset: Any,
               window: int | None) -> jax.Array:
    """The mask a block uses: a 4-D boolean mask as given; else :func:`decoder_mask` with a 2-D token mask
    (``[B, kv_len]``, 1 = real token) or none."""
    if attention_mask is not None and attention_mask.ndim == 4:
        return attention_mask.astype(bool)
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, T] (0/1 tokens) or [B, 1, T, S] (boolean), got shape "
                         f"{attention_mask.shape}")
    return decoder_mask(q_len, kv_len, offset, attention_mask, window)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """``softmax(q kᵀ / sqrt(d) + M) v`` with grouped kv heads: q ``[B, T, H, d]``, k/v ``[B, S, K, d]``
    (H a multiple of K), mask boolean broadcastable to ``[B, 1, T, S]``; logits and softmax in float32."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * jnp.float32(1.0 / math.sqrt(d))
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", w, v).reshape(b, t, h * d)


def update_cache(cache: Mapping[str, jax.Array], k: jax.Array, v: jax.Array, index: Any) -> dict[str, jax.Array]:
    """Write ``k, v [B, T, K, d]`` into the preallocated ``cache {"k", "v": [B, S, K, d]}`` at slot ``index``."""
    kc = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
    vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
    return {"k": kc, "v": vc}


def check_input_ids(name: str, input_ids) -> None:
    """``input_ids`` must be an integer ``[B, T]`` array."""
    if input_ids.ndim != 2:
        raise ValueError(f"{name} expects input_ids [B, T], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"{name}: input_ids must be integers, got {input_ids.dtype}")
