"""A pre-norm decoder as its residual stream of sublayers, run from its params with any attention / MLP sublayer
skipped or gated, without changing the model code (the layer-drop and depth analyses of
:mod:`jaxmodels.analysis.depth`, :mod:`quant.pruning.redundancy` and :mod:`quant.pruning.block_fusion`).

For the Llama family (Llama 2/3, Mistral, Qwen2) and GPT-2 (``jaxmodels.models.llama`` / ``gpt2``), block l is::

    a_l     = Attn_l(Norm_in(h_l))             (the attention sublayer's update of the residual stream)
    m_l     = MLP_l(Norm_post(h_l + g_a a_l))  (the MLP sublayer's update)
    h_{l+1} = h_l + g_a a_l + g_m m_l          (g = 1 for every kept sublayer: the model itself)

with ``h_0`` the embeddings and ``logits = head(Norm_f(h_L))``. A dropped sublayer (``g = 0`` in a
:class:`KeptSublayers` structure) is not computed at all, and its parameters are not read: the reduced model
runs from params without them (:func:`drop_sublayer_params`). Gates ``[L, 2]`` (``[:, 0]`` attention, ``[:, 1]``
MLP), or ``[L, 2, T]`` per position, scale the updates instead (traced: one compile for every gating).
Each sublayer is the model's own module (``LlamaAttention``, ``LlamaMLP``, ``LlamaRMSNorm``; ``GPT2Attention``,
``GPT2MLP``, LayerNorm) applied to its sub-tree of the params, so with everything kept the logits are those of
``model.apply`` (the tests check it to the bit).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.tree import is_concrete

__all__ = ["DecoderSublayers", "KeptSublayers", "ResidualStream", "decoder_sublayers", "residual_stream",
           "sublayer_forward", "sublayer_apply", "gated_apply", "drop_sublayer_params", "remove_blocks",
           "decoder_inputs", "token_mean"]

PyTree = Any


class DecoderSublayers(NamedTuple):
    """The split of one decoder: ``embed(params, ids, attention_mask) -> (h_0, ctx)``; ``attn(block_params, h,
    ctx, i) -> a``; ``mlp(block_params, h) -> m``; ``head(params, h_L) -> float32 logits``; ``block_paths``
    (``"layers_{i}"``); ``attn_keys`` / ``mlp_keys``: the block sub-trees each sublayer reads (its norm and
    itself)."""

    num_layers: int
    block_paths: tuple
    embed: Callable
    attn: Callable
    mlp: Callable
    head: Callable
    attn_keys: tuple
    mlp_keys: tuple


class KeptSublayers(NamedTuple):
    """Which sublayers a reduced model keeps: ``attn[l]`` / ``mlp[l]`` True = block l's attention / MLP kept
    (hashable: a static ``jax.jit`` argument). ``KeptSublayers.full(L)`` keeps everything."""

    attn: tuple
    mlp: tuple

    @classmethod
    def full(cls, num_layers: int) -> "KeptSublayers":
        return cls((True,) * num_layers, (True,) * num_layers)

    @classmethod
    def without(cls, num_layers: int, attn: Sequence[int] = (), mlp: Sequence[int] = (),
                blocks: Sequence[int] = ()) -> "KeptSublayers":
        """Everything kept except the listed attention / MLP sublayers and whole blocks."""
        for name, idx in (("attn", attn), ("mlp", mlp), ("blocks", blocks)):
            bad = [int(i) for i in idx if not 0 <= int(i) < num_layers]
            if bad:
                raise ValueError(f"KeptSublayers.without: {name} index {bad[0]} out of range for {num_layers} layers")
        da, dm = {int(i) for i in attn} | {int(i) for i in blocks}, {int(i) for i in mlp} | {int(i) for i in blocks}
        return cls(tuple(i not in da for i in range(num_layers)), tuple(i not in dm for i in range(num_layers)))

    @property
    def num_dropped(self) -> int:
        return sum(not k for k in self.attn) + sum(not k for k in self.mlp)


class ResidualStream(NamedTuple):
    """``hidden [L+1, B, T, d]`` (``h_l`` into block l; the last is ``h_L``), ``attn`` / ``mlp [L, B, T, d]``
    (the updates as added, i.e. gated; zeros where dropped), ``logits [B, T, V]`` float32."""

    hidden: jax.Array
    attn: jax.Array
    mlp: jax.Array
    logits: jax.Array


# ------------------------------------------------------------------------------------------------ the splits


def _llama_sublayers(model) -> DecoderSublayers:
    from jaxmodels.models.llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, block_mask

    c, dt, pdt = model.config, model.dtype, model.param_dtype
    emb = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=pdt)
    norm = LlamaRMSNorm(c.rms_norm_eps, pdt)
    mlp_mod = LlamaMLP(c, dt, pdt)
    attn_mods = [LlamaAttention(c, c.layer_window(i), dt, pdt) for i in range(c.num_hidden_layers)]

    def embed(params, ids, am):
        b, t = ids.shape
        return emb.apply({"params": params["embed_tokens"]}, ids), {
            "tokens": am, "positions": jnp.broadcast_to(jnp.arange(t)[None], (b, t))}

    def attn(bp, h, ctx, i):
        t = h.shape[1]
        mask = block_mask(ctx["tokens"], t, t, 0, c.layer_window(i))
        x = norm.apply({"params": bp["input_layernorm"]}, h)
        return attn_mods[i].apply({"params": bp["self_attn"]}, x, ctx["positions"], mask)[0]

    def mlp(bp, h):
        return mlp_mod.apply({"params": bp["mlp"]}, norm.apply({"params": bp["post_attention_layernorm"]}, h))

    def head(params, h):
        h = norm.apply({"params": params["norm"]}, h)
        if c.tie_word_embeddings:
            logits = emb.apply({"params": params["embed_tokens"]}, h, method="attend")
        else:
            logits = h @ params["lm_head"]["kernel"]
        return logits.astype(jnp.float32)

    n = c.num_hidden_layers
    return DecoderSublayers(n, tuple(f"layers_{i}" for i in range(n)), embed, attn, mlp, head,
                            ("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))


def _gpt2_sublayers(model) -> DecoderSublayers:
    from jaxmodels.models.decoder import block_mask
    from jaxmodels.models.gpt2 import GPT2Attention, GPT2MLP

    c, dt, pdt = model.config, model.dtype, model.param_dtype
    wte = nn.Embed(c.vocab_size, c.n_embd, dtype=dt, param_dtype=pdt)
    wpe = nn.Embed(c.n_positions, c.n_embd, dtype=dt, param_dtype=pdt)
    ln = nn.LayerNorm(epsilon=c.layer_norm_epsilon, dtype=dt, param_dtype=pdt, use_fast_variance=False)
    attn_mod, mlp_mod = GPT2Attention(c, dt, pdt), GPT2MLP(c, dt, pdt)

    def embed(params, ids, am):
        if ids.shape[1] > c.n_positions:
            raise ValueError(f"GPT2: sequence length {ids.shape[1]} exceeds n_positions={c.n_positions}")
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
        h = wte.apply({"params": params["wte"]}, ids) + wpe.apply({"params": params["wpe"]}, pos)
        return h, {"tokens": am}

    def attn(bp, h, ctx, i):
        t = h.shape[1]
        x = ln.apply({"params": bp["ln_1"]}, h)
        return attn_mod.apply({"params": bp["attn"]}, x, block_mask(ctx["tokens"], t, t, 0, None))[0]

    def mlp(bp, h):
        return mlp_mod.apply({"params": bp["mlp"]}, ln.apply({"params": bp["ln_2"]}, h))

    def head(params, h):
        h = ln.apply({"params": params["ln_f"]}, h)
        return wte.apply({"params": params["wte"]}, h, method="attend").astype(jnp.float32)

    n = c.n_layer
    return DecoderSublayers(n, tuple(f"layers_{i}" for i in range(n)), embed, attn, mlp, head,
                            ("ln_1", "attn"), ("ln_2", "mlp"))


@functools.lru_cache(maxsize=64)
def decoder_sublayers(model) -> DecoderSublayers:
    """The :class:`DecoderSublayers` of a :class:`~jaxmodels.models.Llama` (Llama 2/3, Mistral, Qwen2) or
    :class:`~jaxmodels.models.GPT2` (cached per model, so jitted callers compile once). ValueError otherwise.

    >>> sub = decoder_sublayers(model)              # model, params = load_pretrained(folder)
    >>> sub.num_layers, sub.block_paths[0]
    (3, 'layers_0')
    """
    from jaxmodels.models.gpt2 import GPT2
    from jaxmodels.models.llama import Llama

    if isinstance(model, Llama):
        return _llama_sublayers(model)
    if isinstance(model, GPT2):
        return _gpt2_sublayers(model)
    raise ValueError(f"decoder_sublayers: {type(model).__name__} is not a Llama-family or GPT-2 decoder")


# ------------------------------------------------------------------------------------------------ running


def decoder_inputs(batch, attention_mask=None, vocab_size: int | None = None):
    """``(ids [B, T] int32, attention_mask [B, T] int32)`` from ids or a ``{"input_ids", "attention_mask"}`` dict,
    validated (2-D integer ids in ``[0, vocab_size)`` when concrete, mask of the same shape)."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"a decoder batch needs 'input_ids', got keys {sorted(batch)}")
        attention_mask = batch.get("attention_mask", attention_mask)
        batch = batch["input_ids"]
    ids = jnp.asarray(batch)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be a [B, T] integer array, got {ids.dtype} shape {ids.shape}")
    am = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    if am.shape != ids.shape:
        raise ValueError(f"attention_mask shape {am.shape} != input_ids shape {ids.shape}")
    if is_concrete(ids) and vocab_size is not None and ids.size:
        lo, hi = int(jnp.min(ids)), int(jnp.max(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, {vocab_size}), got [{lo}, {hi}]")
    return ids.astype(jnp.int32), am.astype(jnp.int32)


def _check_keep(keep, n):
    if keep is None:
        return KeptSublayers.full(n)
    keep = KeptSublayers(tuple(bool(k) for k in keep[0]), tuple(bool(k) for k in keep[1]))
    if len(keep.attn) != n or len(keep.mlp) != n:
        raise ValueError(f"keep has {len(keep.attn)} / {len(keep.mlp)} entries for a {n}-layer model")
    return keep


def _check_gates(gates, n, t):
    """Gates as float32 ``[n, 2, t]`` (ones when None: one compiled program for gated and ungated calls)."""
    if gates is None:
        return jnp.ones((n, 2, t), jnp.float32)
    g = jnp.asarray(gates)
    if not jnp.issubdtype(g.dtype, jnp.floating) or g.shape not in ((n, 2), (n, 2, t)):
        raise ValueError(f"gates must be float [{n}, 2] or [{n}, 2, {t}], got {g.dtype} shape {g.shape}")
    if is_concrete(g) and not bool(jnp.all(jnp.isfinite(g))):
        raise ValueError("gates contain NaN/Inf")
    g = g.astype(jnp.float32)
    return jnp.broadcast_to(g[..., None], (n, 2, t)) if g.ndim == 2 else g


def _gate(g, l, j, h):
    return g[l, j][None, :, None].astype(h.dtype)


def _run(sub, params, ids, am, keep, gates, record):
    h, ctx = sub.embed(params, ids, am)
    hs, As, Ms = [h], [], []
    for i, bp_name in enumerate(sub.block_paths):
        bp = params.get(bp_name, {})
        a = _gate(gates, i, 0, h) * sub.attn(bp, h, ctx, i) if keep.attn[i] else None
        h = h if a is None else h + a
        m = _gate(gates, i, 1, h) * sub.mlp(bp, h) if keep.mlp[i] else None
        h = h if m is None else h + m
        if record:
            As.append(jnp.zeros_like(h) if a is None else a)
            Ms.append(jnp.zeros_like(h) if m is None else m)
            hs.append(h)
    logits = sub.head(params, h)
    if not record:
        return logits, h
    return ResidualStream(jnp.stack(hs), jnp.stack(As), jnp.stack(Ms), logits)


@functools.partial(jax.jit, static_argnums=(0, 4, 6))
def _run_jit(sub, params, ids, am, keep, gates, record):
    return _run(sub, params, ids, am, keep, gates, record)


def residual_stream(model, params: PyTree, batch, attention_mask=None, *, keep: KeptSublayers | None = None,
                    gates=None) -> ResidualStream:
    """Every ``h_l``, ``a_l``, ``m_l`` and the logits of ``model`` (module docstring) on ``batch`` (ids ``[B, T]``
    or a dict with ``input_ids`` / ``attention_mask``), with the sublayers of ``keep`` only and/or ``gates``.

    >>> s = residual_stream(model, params, ids)          # s.hidden [L+1, B, T, d]
    >>> jnp.allclose(s.hidden[1], s.hidden[0] + s.attn[0] + s.mlp[0])
    Array(True, dtype=bool)
    """
    sub = decoder_sublayers(model)
    ids, am = decoder_inputs(batch, attention_mask, _vocab(model))
    return _run_jit(sub, params, ids, am, _check_keep(keep, sub.num_layers),
                    _check_gates(gates, sub.num_layers, ids.shape[1]), True)


def sublayer_forward(model, params: PyTree, batch, attention_mask=None, *, keep: KeptSublayers | None = None,
                     gates=None) -> tuple[jax.Array, jax.Array]:
    """``(logits [B, T, V] float32, h_L [B, T, d])`` of the model reduced to ``keep`` (dropped sublayers are not
    computed; their params may be absent) and/or scaled by ``gates``. ``keep=None`` and no gates: the logits of
    ``model.apply`` exactly.

    >>> keep = KeptSublayers.without(3, attn=[2])        # drop block 2's attention
    >>> logits, _ = sublayer_forward(model, drop_sublayer_params(params, model, keep), ids, keep=keep)
    """
    sub = decoder_sublayers(model)
    ids, am = decoder_inputs(batch, attention_mask, _vocab(model))
    return _run_jit(sub, params, ids, am, _check_keep(keep, sub.num_layers),
                    _check_gates(gates, sub.num_layers, ids.shape[1]), False)


@functools.lru_cache(maxsize=256)
def sublayer_apply(model, keep: KeptSublayers | None = None) -> Callable[[PyTree, jax.Array], jax.Array]:
    """``fn(params, ids) -> logits`` of the reduced model (one cached function per ``(model, keep)``, so
    :func:`jaxmodels.perplexity.evaluate_perplexity` compiles it once).

    >>> ppl = evaluate_perplexity(sublayer_apply(model, keep), params, test_tokens, 128)
    """
    sub = decoder_sublayers(model)
    keep = _check_keep(keep, sub.num_layers)

    def fn(params, ids):
        g = jnp.ones((sub.num_layers, 2, ids.shape[1]), jnp.float32)
        return _run(sub, params, ids, jnp.ones(ids.shape, jnp.int32), keep, g, False)[0]

    return fn


@functools.lru_cache(maxsize=64)
def gated_apply(model) -> Callable[[tuple, jax.Array], jax.Array]:
    """``fn((params, gates), ids) -> logits`` with traced gates ``[L, 2]`` (0 = sublayer skipped, exactly as
    dropping it): every drop structure evaluates through one compiled program, e.g.
    ``evaluate_perplexity(gated_apply(model), (params, gates), tokens, 128)``."""
    sub = decoder_sublayers(model)

    def fn(params_gates, ids):
        params, gates = params_gates
        g = jnp.broadcast_to(jnp.asarray(gates, jnp.float32)[..., None], (sub.num_layers, 2, ids.shape[1]))
        return _run(sub, params, ids, jnp.ones(ids.shape, jnp.int32), KeptSublayers.full(sub.num_layers), g,
                    False)[0]

    return fn


def _vocab(model) -> int | None:
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if v is not None else None


def token_mean(x: jax.Array, weight: jax.Array) -> jax.Array:
    """``Σ_t w_t x_t / Σ_t w_t`` over the trailing ``[B, T]`` axes of ``x [..., B, T]`` (float32)."""
    w = jnp.asarray(weight, jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * w, axis=(-2, -1)) / jnp.maximum(jnp.sum(w), 1e-30)


# ------------------------------------------------------------------------------------------------ reduced params


def drop_sublayer_params(params: PyTree, model, keep: KeptSublayers) -> PyTree:
    """A copy of ``params`` without the sub-trees of the dropped sublayers (a block with both dropped loses its
    whole ``layers_{i}``); runs with :func:`sublayer_forward` / :func:`sublayer_apply` and the same ``keep``.
    The input is not modified."""
    sub = decoder_sublayers(model)
    keep = _check_keep(keep, sub.num_layers)
    out = dict(params)
    for i, bp in enumerate(sub.block_paths):
        if not keep.attn[i] and not keep.mlp[i]:
            out.pop(bp, None)
            continue
        block = dict(out[bp])
        for k in (() if keep.attn[i] else sub.attn_keys) + (() if keep.mlp[i] else sub.mlp_keys):
            block.pop(k, None)
        out[bp] = block
    return out


def remove_blocks(model, params: PyTree, blocks: Sequence[int]):
    """``(model', params')``: the same architecture with the listed blocks removed and the others renumbered
    ``layers_0 .. layers_{L-k-1}`` (config ``num_hidden_layers`` / ``n_layer`` and Qwen2 ``layer_types``
    updated), a plain model that ``model'.apply`` runs and ``save_pretrained`` writes. Params are shared, not
    copied; the input is not modified.

    >>> small, p2 = remove_blocks(model, params, [1])    # a 2-block Llama
    >>> small.apply({"params": p2}, ids).shape
    """
    from jaxmodels.models.gpt2 import GPT2

    sub = decoder_sublayers(model)
    n = sub.num_layers
    drop = sorted({int(b) for b in blocks})
    if any(not 0 <= b < n for b in drop):
        raise ValueError(f"remove_blocks: block indices {drop} out of range for {n} layers")
    if len(drop) >= n:
        raise ValueError(f"remove_blocks: cannot remove all {n} blocks")
    kept = [i for i in range(n) if i not in drop]
    c = model.config
    if isinstance(model, GPT2):
        c2 = dataclasses.replace(c, n_layer=len(kept))
    else:
        lt = None if c.layer_types is None else tuple(c.layer_types[i] for i in kept)
        c2 = dataclasses.replace(c, num_hidden_layers=len(kept), layer_types=lt)
    out = {k: v for k, v in params.items() if k not in sub.block_paths}
    for j, i in enumerate(kept):
        out[f"layers_{j}"] = params[sub.block_paths[i]]
    return model.clone(config=c2), out
