"""Greedy decoding with a KV cache for the decoders of this package (:class:`~jaxmodels.models.llama.Llama`,
:class:`~jaxmodels.models.gpt2.GPT2`), token for token what transformers' ``generate(do_sample=False)`` returns.

One jitted program with fixed shapes: the cache is preallocated for ``prompt + max_new_tokens`` slots, the prompt
is run once (prefill, its keys/values written at slots 0..T0-1), then ``max_new_tokens - 1`` single-token steps in a
``lax.fori_loop``, step n writing slot T0 + n. Left-padded prompts follow transformers: positions are
``cumsum(attention_mask) - 1`` (0 on padding) and padded slots are masked as keys. Greedy choice
``x_{t+1} = argmax_v logits_t[v]`` (first index on ties, as ``torch.argmax``). After ``eos_token_id`` a row emits
``pad_token_id`` (transformers also stops when every row is done; here the output always has
``T0 + max_new_tokens`` columns).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["generate"]


@functools.lru_cache(maxsize=32)
def _compiled(model, max_new_tokens: int, eos: tuple[int, ...] | None, pad_token_id: int):
    def run(params, input_ids, attention_mask):
        b, t0 = input_ids.shape
        total = t0 + max_new_tokens
        dtype = jax.tree.leaves(params)[0].dtype
        cache = model.init_cache(b, total, dtype)
        full_mask = jnp.concatenate([attention_mask, jnp.ones((b, max_new_tokens), attention_mask.dtype)], axis=1)
        positions = jnp.where(attention_mask > 0, jnp.cumsum(attention_mask, axis=1) - 1, 0)
        logits, cache = model.apply({"params": params}, input_ids, full_mask, positions=positions, cache=cache)
        tok = jnp.argmax(logits[:, -1], axis=-1).astype(input_ids.dtype)
        last = jnp.max(positions, axis=1)
        out = jnp.concatenate([input_ids, jnp.zeros((b, max_new_tokens), input_ids.dtype)], axis=1)
        out = out.at[:, t0].set(tok)
        done = jnp.zeros((b,), bool) if eos is None else jnp.isin(tok, jnp.asarray(eos))

        def step(n, carry):
            out, cache, tok, done = carry
            pos = (last + n)[:, None]
            logits, cache = model.apply({"params": params}, tok[:, None], full_mask, positions=pos, cache=cache)
            nxt = jnp.argmax(logits[:, -1], axis=-1).astype(out.dtype)
            if eos is not None:
                nxt = jnp.where(done, jnp.asarray(pad_token_id, out.dtype), nxt)
                done = done | jnp.isin(nxt, jnp.asarray(eos))
            out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, t0 + n))
            return out, cache, nxt, done

        out, *_ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache, tok, done))
        return out

    return jax.jit(run)


def generate(model, params: Any, input_ids: Any, max_new_tokens: int, attention_mask: Any = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0) -> jax.Array:
    """Greedy continuation ``[B, T0 + max_new_tokens]`` (prompt included) of ``input_ids [B, T0]``.

    ``attention_mask [B, T0]``: 1 = token, 0 = (left) padding. ``eos_token_id``: None (never stop) or an id / ids
    after which a row emits ``pad_token_id``. Compiled once per (model, max_new_tokens, eos, pad, shapes).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"generate: input_ids must be integer [B, T] with T >= 1, got {ids.dtype} {ids.shape}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"generate: token ids must be in [0, {vocab}), got range [{ids.min()}, {ids.max()}]")
    limit = getattr(model.config, "n_positions", None)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"generate: {ids.shape[1]} + {max_new_tokens} tokens exceed n_positions={limit}")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"generate: attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if not mask[:, -1].all():
            raise ValueError("generate: the last prompt token of every row must be real (pad on the left)")
        mask = mask.astype(np.int32)
    eos = None if eos_token_id is None else tuple(int(e) for e in np.atleast_1d(eos_token_id))
    fn = _compiled(model, int(max_new_tokens), eos, int(pad_token_id))
    return fn(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
