"""GPT-style causal decoder (Radford et al., 2018/2019) with the norm placements the normalization papers compare.

With h_0 = E[tokens] + E_pos and, for block l = 1..L, sublayers F in (causal self-attention, MLP)::

    "post"  (Post-LN, Vaswani et al., 2017):            h <- Norm(h + F(h))
    "pre"   (Pre-LN, Xiong et al., 2020):               h <- h + F(s_l * Norm(h))
    "peri"  (Peri-LN, Kim et al., 2025, "Peri-LN: Revisiting Layer Normalization in the Transformer
             Architecture"):                            h <- h + Norm_out(F(s_l * Norm_in(h)))

    LayerNorm Scaling (Sun et al., 2025, "The Curse of Depth in Large Language Models"): s_l = 1 / sqrt(l)
    multiplies the output of the sublayer-input norms of block l (``ln_scaling=True``); otherwise s_l = 1.
    It is defined for the pre-norm family and is rejected for "post".

    logits = Norm_f(h_L) Eᵀ  (tied head) or Norm_f(h_L) W_head (untied); Norm_f is omitted for "post", whose
    blocks already end in a norm.

Parameter paths (``scan_layers=False``)::

    embed/embedding [V, d], pos_embed [1, max_len, d]
    block_{i}/norm1, block_{i}/attn/{query,key,value,out}/{kernel [d, d], bias}, block_{i}/norm2,
    block_{i}/mlp/{fc1 [d, mlp_dim], fc2 [mlp_dim, d]}/{kernel, bias},
    block_{i}/attn_out_norm, block_{i}/mlp_out_norm   (peri only)
    norm (pre/peri), head/kernel [d, V] (untied only)

With ``scan_layers=True`` the L blocks are one ``nn.scan`` over ``layers/...``: the same names under ``layers/``
with a leading layer axis of size L (e.g. ``layers/attn/query/kernel [L, d, d]``); :func:`stack_layers` /
:func:`unstack_layers` convert between the two layouts. Each block sows the mean L2 norm of its output hidden
state into the ``intermediates`` collection (``hidden_norm``); :func:`hidden_norms` returns them per layer.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxmodels.models.transformer import TRANSFORMER_RULES_TP, FeedForward, MultiHeadAttention, causal_mask, \
    check_norm, make_norm

__all__ = ["GPT", "GPTBlock", "PLACEMENTS", "GPT_RULES_DP", "GPT_RULES_TP", "stack_layers", "unstack_layers",
           "hidden_norms"]

PLACEMENTS = ("post", "pre", "peri")


class GPTBlock(nn.Module):
    """One decoder block; ``layer_index`` (1-based, may be traced) sets the LayerNorm-Scaling factor 1/sqrt(l).

    ``carry_output=True`` makes ``__call__`` return ``(h, None)`` (the ``nn.scan`` body signature).
    """

    num_heads: int
    mlp_dim: int
    placement: str = "pre"
    norm: Any = "layernorm"
    ln_scaling: bool = False
    dtype: Any = None
    carry_output: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, layer_index: Any = 1):
        mask = causal_mask(h.shape[-2])
        attn = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")
        mlp = FeedForward(self.mlp_dim, dtype=self.dtype, name="mlp")
        norm1 = make_norm(self.norm, "norm1", dtype=self.dtype)
        norm2 = make_norm(self.norm, "norm2", dtype=self.dtype)
        if self.placement == "post":
            h = norm1(h + attn(h, mask))
            h = norm2(h + mlp(h))
        else:
            s = jax.lax.rsqrt(jnp.asarray(layer_index, jnp.float32)) if self.ln_scaling else 1.0
            a = attn(norm1(h) * s, mask)
            if self.placement == "peri":
                a = make_norm(self.norm, "attn_out_norm", dtype=self.dtype)(a)
            h = h + a
            m = mlp(norm2(h) * s)
            if self.placement == "peri":
                m = make_norm(self.norm, "mlp_out_norm", dtype=self.dtype)(m)
            h = h + m
        self.sow("intermediates", "hidden_norm", jnp.linalg.norm(h.astype(jnp.float32), axis=-1).mean())
        return (h, None) if self.carry_output else h


class GPT(nn.Module):
    """Tokens ``[B, T]`` (int) -> next-token logits ``[B, T, vocab_size]``."""

    vocab_size: int
    max_len: int = 256
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 512
    placement: str = "pre"
    norm: Any = "layernorm"
    ln_scaling: bool = False
    tie_embeddings: bool = True
    scan_layers: bool = False
    dtype: Any = None

    def _check(self, tokens):
        check_norm(self.norm)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"GPT: placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.ln_scaling and self.placement == "post":
            raise ValueError("GPT: LayerNorm Scaling (Curse of Depth) scales sublayer-input norms; it is defined for "
                             "placement 'pre' or 'peri', not 'post'")
        if min(self.vocab_size, self.max_len, self.width, self.depth, self.num_heads, self.mlp_dim) < 1:
            raise ValueError("GPT: sizes must be positive")
        if self.width % self.num_heads:
            raise ValueError(f"GPT: width={self.width} is not divisible by num_heads={self.num_heads}")
        if tokens.ndim != 2:
            raise ValueError(f"GPT expects tokens [B, T], got shape {tokens.shape}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"GPT: sequence length {tokens.shape[1]} exceeds max_len={self.max_len}")

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        self._check(tokens)
        embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype,
                         name="embed")
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, self.max_len, self.width))
        h = embed(tokens)
        h = h + pos[:, :tokens.shape[1]].astype(h.dtype)
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, placement=self.placement, norm=self.norm,
                  ln_scaling=self.ln_scaling, dtype=self.dtype)
        if self.scan_layers:
            Stack = nn.scan(GPTBlock, variable_axes={"params": 0, "intermediates": 0},
                            split_rngs={"params": True}, in_axes=0, length=self.depth)
            h, _ = Stack(**kw, carry_output=True, name="layers")(h, jnp.arange(1, self.depth + 1))
        else:
            for i in range(self.depth):
                h = GPTBlock(**kw, name=f"block_{i}")(h, i + 1)
        if self.placement != "post":
            h = make_norm(self.norm, "norm", dtype=self.dtype)(h)
        if self.tie_embeddings:
            return embed.attend(h)
        return nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, name="head")(h)


def stack_layers(params: dict, depth: int) -> dict:
    """Unscanned params (``block_0 .. block_{L-1}``) -> scanned layout (``layers`` with a leading layer axis)."""
    blocks = [params[f"block_{i}"] for i in range(depth)]
    if f"block_{depth}" in params:
        raise ValueError(f"stack_layers: params have more than depth={depth} blocks")
    out = {k: v for k, v in params.items() if not k.startswith("block_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return out


def unstack_layers(params: dict) -> dict:
    """Scanned params (``layers/...`` with leading axis L) -> ``block_0 .. block_{L-1}``."""
    layers = params["layers"]
    depth = jax.tree.leaves(layers)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(depth):
        out[f"block_{i}"] = jax.tree.map(lambda x: x[i], layers)
    return out


def hidden_norms(model: GPT, params: Any, tokens: jax.Array) -> np.ndarray:
    """Mean L2 norm of the hidden state after each block, ``[depth]`` (from the sown ``intermediates``)."""
    _, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))({"params": params}, tokens)
    inter = state["intermediates"]
    if model.scan_layers:
        return np.asarray(inter["layers"]["hidden_norm"][0])
    return np.array([float(inter[f"block_{i}"]["hidden_norm"][0]) for i in range(model.depth)])


# Data parallel: replicate everything (the batch is sharded).
GPT_RULES_DP = [(r".*", P())]
# Tensor parallel (Megatron-LM): q/k/v/fc1 column-parallel, out/fc2 row-parallel over "model"; in the scanned
# layout the same split one axis further right (the leading axis is the layer). Embeddings, norms replicated.
GPT_RULES_TP = [
    (r"^layers/.*/(query|key|value|fc1)/kernel$", P(None, None, "model")),
    (r"^layers/.*/(query|key|value|fc1)/bias$", P(None, "model")),
    (r"^layers/.*/(out|fc2)/kernel$", P(None, "model", None)),
    *TRANSFORMER_RULES_TP,
    (r".*", P()),
]
