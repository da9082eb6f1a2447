""":class:`~quant.ptq.blocks.BlockModel` s built from the models themselves: ``block_model(model)`` for the BERT
encoder (MiniLM), the project's GPT (``jaxmodels.models.gpt``), the Llama family (Llama 2/3, Mistral, Qwen2) and
GPT-2 (``jaxmodels.models.llama`` / ``gpt2``), so every PTQ method runs on each of them unchanged.

Each split is ``embed -> block_0 .. block_{L-1} -> head`` with the model's own modules (``forward`` equals
``model.apply`` up to float rounding; the tests check it). Batches are ``{"input_ids": [B, T], "attention_mask":
[B, T]}`` (or a bare ``[B, T]`` id array: no padding); the token weights of every PTQ statistic are the attention
mask (padding tokens weigh 0). Causal decoders mask attention causally inside each block; the Llama family and
GPT-2 also mask padded keys (any padding side; sliding-window layers get their own 4-D mask), the project's GPT
has no key mask, so it accepts right padding only (checked).

AWQ groups (llm-awq's ``get_blocks``/``auto_scale_block`` per architecture): the attention input projections share
``1/s`` folded into the preceding norm's scale (and bias) and are judged on the whole block output; the output
projection folds ``1/s`` into the value projection when their shapes allow it (no GQA, not fused); the MLP input
projections fold into the second norm; the MLP output projection folds into ``up_proj`` (SwiGLU) or keeps an
explicit input scale (after GELU). A post-LN block (BERT, GPT ``placement="post"``) has no norm before its
linears: those groups keep input scales.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .blocks import AWQGroup, BlockModel

__all__ = ["block_model", "gpt_block_model", "llama_block_model", "gpt2_block_model", "decoder_batch"]


def decoder_batch(batch):
    """``(input_ids [B, T] int32, attention_mask [B, T] int32)`` of a decoder batch (dict or bare ids)."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"a decoder batch needs 'input_ids', got keys {sorted(batch)}")
        ids = jnp.asarray(batch["input_ids"])
        am = batch.get("attention_mask")
        am = jnp.ones(ids.shape, jnp.int32) if am is None else jnp.asarray(am)
    else:
        ids = jnp.asarray(batch)
        am = jnp.ones(ids.shape, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    if am.shape != ids.shape:
        raise ValueError(f"attention_mask shape {am.shape} != input_ids shape {ids.shape}")
    return ids, am


def _token_weight(ctx):
    return jnp.asarray(ctx["tokens"], jnp.float32)


# ------------------------------------------------------------------------------------------------------ GPT

def gpt_block_model(gpt) -> BlockModel:
    """The project's :class:`jaxmodels.models.gpt.GPT` (unscanned layout; ``unstack_layers`` converts a scanned
    one). Right padding only (the block has no key mask; with causal attention real tokens never see the padding
    after them)."""
    from jaxmodels.models.gpt import GPTBlock
    from jaxmodels.models.transformer import make_norm

    if gpt.scan_layers:
        raise ValueError("block_model: a GPT with scan_layers=True has one stacked block; build it with "
                         "scan_layers=False and convert the params with jaxmodels.models.gpt.unstack_layers")
    block = GPTBlock(gpt.num_heads, gpt.mlp_dim, gpt.placement, gpt.norm, gpt.ln_scaling, gpt.dtype)
    emb = nn.Embed(gpt.vocab_size, gpt.width, dtype=gpt.dtype)

    def embed(params, batch):
        ids, am = decoder_batch(batch)
        if ids.shape[1] > gpt.max_len:
            raise ValueError(f"GPT: sequence length {ids.shape[1]} exceeds max_len={gpt.max_len}")
        if not isinstance(am, jax.core.Tracer):
            a = np.asarray(am) > 0
            if np.any(~a[:, :-1] & a[:, 1:]):
                raise ValueError("GPT block model: attention_mask must be right-padded (1s then 0s per row): the "
                                 "GPT block has no key mask, so a token after padding would attend to it")
        h = emb.apply({"params": params["embed"]}, ids)
        h = h + params["pos_embed"][:, :ids.shape[1]].astype(h.dtype)
        return h, {"tokens": am}

    def head(params, h, ctx):
        if gpt.placement != "post":
            h = make_norm(gpt.norm, "norm", dtype=gpt.dtype).apply({"params": params["norm"]}, h)
        if gpt.tie_embeddings:
            return emb.apply({"params": params["embed"]}, h, method="attend")
        return h @ params["head"]["kernel"]

    post = gpt.placement == "post"
    groups = (AWQGroup(("attn/query", "attn/key", "attn/value"), None if post else "norm1", "block"),
              AWQGroup(("attn/out",), "attn/value", "linear"),
              AWQGroup(("mlp/fc1",), None if post else "norm2", "linear"),
              AWQGroup(("mlp/fc2",), None, "linear"))
    return BlockModel(embed=embed, block=block, block_paths=[f"block_{i}" for i in range(gpt.depth)], head=head,
                      token_weight=_token_weight, awq_groups=groups, num_heads=gpt.num_heads,
                      attention=("attn/query", "attn/key"), causal=True,
                      block_kwargs=lambda i, ctx: {"layer_index": jnp.asarray(i + 1, jnp.int32)})


# ------------------------------------------------------------------------------------------------------ Llama

def llama_block_model(llama) -> BlockModel:
    """:class:`jaxmodels.models.llama.Llama` (Llama 2/3, Mistral, Qwen2): RMSNorm + RoPE + GQA + SwiGLU blocks
    ``layers_{i}``; key padding and sliding windows through the block's attention mask. RSQ's attention
    concentration uses the rotated (RoPE) queries and keys."""
    from jaxmodels.models.llama import LlamaBlock, LlamaRMSNorm, apply_rope, block_mask, rope_inv_freq

    c = llama.config
    block = LlamaBlock(c, 0, llama.dtype, llama.param_dtype)
    emb = nn.Embed(c.vocab_size, c.hidden_size, dtype=llama.dtype, param_dtype=llama.param_dtype)
    w0 = c.layer_window(0)
    inv = rope_inv_freq(c)

    def embed(params, batch):
        ids, am = decoder_batch(batch)
        return emb.apply({"params": params["embed_tokens"]}, ids), {"tokens": am}

    def block_kwargs(i, ctx):
        am = ctx["tokens"]
        w = c.layer_window(i)
        if w == w0:  # the shared block module (layer 0) builds this mask itself
            return {"attention_mask": am}
        t = am.shape[1]
        return {"attention_mask": block_mask(am, t, t, 0, w)}

    def head(params, h, ctx):
        h = LlamaRMSNorm(c.rms_norm_eps, llama.param_dtype).apply({"params": params["norm"]}, h)
        if c.tie_word_embeddings:
            logits = emb.apply({"params": params["embed_tokens"]}, h, method="attend")
        else:
            logits = h @ params["lm_head"]["kernel"]
        return logits.astype(jnp.float32)

    H, K, dh = c.num_attention_heads, c.kv_heads, c.dim_head

    def attention_fn(rec):
        q, k = rec["self_attn/q_proj"][1], rec["self_attn/k_proj"][1]
        b, t, _ = q.shape
        pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        q = apply_rope(q.reshape(b, t, H, dh), pos, inv)
        k = apply_rope(k.reshape(b, t, K, dh), pos, inv)
        k = jnp.repeat(k, H // K, axis=2)
        return q.reshape(b, t, H * dh), k.reshape(b, t, H * dh)

    groups = (AWQGroup(("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), "input_layernorm", "block"),
              AWQGroup(("self_attn/o_proj",), "self_attn/v_proj" if K == H else None, "linear"),
              AWQGroup(("mlp/gate_proj", "mlp/up_proj"), "post_attention_layernorm", "linear"),
              AWQGroup(("mlp/down_proj",), "mlp/up_proj", "linear"))
    return BlockModel(embed=embed, block=block, block_paths=[f"layers_{i}" for i in range(c.num_hidden_layers)],
                      head=head, token_weight=_token_weight, awq_groups=groups, num_heads=H,
                      attention=("self_attn/q_proj", "self_attn/k_proj"), causal=True, attention_fn=attention_fn,
                      block_kwargs=block_kwargs)


# ------------------------------------------------------------------------------------------------------ GPT-2

def gpt2_block_model(gpt2) -> BlockModel:
    """:class:`jaxmodels.models.gpt2.GPT2`: LayerNorm blocks ``layers_{i}`` with the fused ``attn/c_attn``
    ([d, 3d]: q | k | v); learned positions enter in ``embed``."""
    from jaxmodels.models.gpt2 import GPT2Block

    c = gpt2.config
    block = GPT2Block(c, 0, gpt2.dtype, gpt2.param_dtype)
    wte = nn.Embed(c.vocab_size, c.n_embd, dtype=gpt2.dtype, param_dtype=gpt2.param_dtype)
    wpe = nn.Embed(c.n_positions, c.n_embd, dtype=gpt2.dtype, param_dtype=gpt2.param_dtype)
    ln_f = nn.LayerNorm(epsilon=c.layer_norm_epsilon, dtype=gpt2.dtype, param_dtype=gpt2.param_dtype,
                        use_fast_variance=False)

    def embed(params, batch):
        ids, am = decoder_batch(batch)
        if ids.shape[1] > c.n_positions:
            raise ValueError(f"GPT2: sequence length {ids.shape[1]} exceeds n_positions={c.n_positions}")
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
        h = wte.apply({"params": params["wte"]}, ids) + wpe.apply({"params": params["wpe"]}, pos)
        return h, {"tokens": am}

    def head(params, h, ctx):
        h = ln_f.apply({"params": params["ln_f"]}, h)
        return wte.apply({"params": params["wte"]}, h, method="attend").astype(jnp.float32)

    d = c.n_embd

    def attention_fn(rec):
        qkv = rec["attn/c_attn"][1]
        return qkv[..., :d], qkv[..., d:2 * d]

    groups = (AWQGroup(("attn/c_attn",), "ln_1", "block"),
              AWQGroup(("attn/c_proj",), None, "linear"),
              AWQGroup(("mlp/c_fc",), "ln_2", "linear"),
              AWQGroup(("mlp/c_proj",), None, "linear"))
    return BlockModel(embed=embed, block=block, block_paths=[f"layers_{i}" for i in range(c.n_layer)], head=head,
                      token_weight=_token_weight, awq_groups=groups, num_heads=c.n_head,
                      attention=("attn/c_attn", "attn/c_attn"), causal=True, attention_fn=attention_fn,
                      block_kwargs=lambda i, ctx: {"attention_mask": ctx["tokens"]})


# ------------------------------------------------------------------------------------------------------ dispatch

def block_model(model) -> BlockModel:
    """The :class:`BlockModel` of ``model``: a ``BertEncoder`` / ``SentenceEmbedder`` (mean-pooled embeddings as
    the head), ``GPT``, ``Llama`` or ``GPT2`` (logits as the head). ValueError for any other model."""
    from jaxmodels.models.bert import BertEncoder
    from jaxmodels.models.gpt import GPT
    from jaxmodels.models.gpt2 import GPT2
    from jaxmodels.models.llama import Llama

    inner = getattr(model, "model", model)
    if isinstance(inner, BertEncoder):
        from .minilm import bert_block_model

        return bert_block_model(model)
    if isinstance(model, GPT):
        return gpt_block_model(model)
    if isinstance(model, Llama):
        return llama_block_model(model)
    if isinstance(model, GPT2):
        return gpt2_block_model(model)
    raise ValueError(f"block_model: no block split known for {type(model).__name__} (known: BertEncoder, "
                     "SentenceEmbedder, GPT, Llama, GPT2); build a quant.ptq.blocks.BlockModel by hand")
