"""Building blocks shared by the transformer models (ViT, GPT, BERT): multi-head attention with separately named
``query``/``key``/``value``/``out`` Dense layers, the two-layer MLP (``fc1``/``fc2``) and the norm factory.

Every linear layer is a plain ``nn.Dense`` with a 2-D kernel ``[in, out]``, so quantization, merging and sharding
rules can target them by path regex (e.g. ``r"attn/(query|key|value)/kernel$"``).

Scaled dot-product attention (Vaswani et al., 2017, "Attention Is All You Need"), per head h::

    Q_h = x W_q[:, h],  K_h = x W_k[:, h],  V_h = x W_v[:, h]
    A_h = softmax(Q_h K_hᵀ / sqrt(d_head) + M) V_h          (M = 0 where attended, -inf where masked)
    out = concat_h(A_h) W_o + b_o
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["NORMS", "make_norm", "MultiHeadAttention", "FeedForward", "causal_mask", "padding_mask"]

NormSpec = Any  # "layernorm" | "rmsnorm" | a callable (name=..., epsilon=...) -> nn.Module

NORMS = ("layernorm", "rmsnorm")


def make_norm(norm: NormSpec, name: str, epsilon: float = 1e-6, dtype: Any = None) -> nn.Module:
    """The normalization layer a model's ``norm`` option names.

    ``"layernorm"``: ``nn.LayerNorm`` (Ba et al., 2016): y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias.
    ``"rmsnorm"``: ``nn.RMSNorm`` (Zhang & Sennrich, 2019): y = x / sqrt(mean(x²) + eps) * scale.
    A callable is called as ``norm(name=name, epsilon=epsilon)`` and must return a linen module mapping
    ``[..., d] -> [..., d]`` (plug-in point for the layers in ``jaxmodels.layers``).
    """
    if callable(norm) and not isinstance(norm, str):
        return norm(name=name, epsilon=epsilon)
    if norm == "layernorm":
        return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name)
    if norm == "rmsnorm":
        return nn.RMSNorm(epsilon=epsilon, dtype=dtype, name=name)
    raise ValueError(f"norm must be one of {NORMS} or a callable returning a linen module, got {norm!r}")


def check_norm(norm: NormSpec) -> None:
    if not (norm in NORMS or (callable(norm) and not isinstance(norm, str))):
        raise ValueError(f"norm must be one of {NORMS} or a callable returning a linen module, got {norm!r}")


def causal_mask(length: int) -> jax.Array:
    """``[1, 1, T, T]`` boolean mask, True where query i may attend key j (j <= i)."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """``[B, T]`` 0/1 token mask -> ``[B, 1, 1, T]`` boolean key mask."""
    return (attention_mask > 0)[:, None, None, :]


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with Dense layers named ``query``, ``key``, ``value`` (``[d, d]``) and ``out``.

    ``mask``: boolean, broadcastable to ``[B, heads, T, T]``, True where attention is allowed.
    ``out_name`` renames the output projection (BERT calls it ``attention_output``).
    """

    num_heads: int
    use_bias: bool = True
    out_name: str = "out"
    dtype: Any = None
    kernel_init: Callable = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        *batch, length, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"MultiHeadAttention: width {d} is not divisible by num_heads={self.num_heads}")
        dh = d // self.num_heads

        def proj(name):
            y = nn.Dense(d, use_bias=self.use_bias, dtype=self.dtype, kernel_init=self.kernel_init, name=name)(x)
            return y.reshape(*batch, length, self.num_heads, dh)

        q, k, v = proj("query"), proj("key"), proj("value")
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(dh))
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        y = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*batch, length, d)
        return nn.Dense(d, use_bias=self.use_bias, dtype=self.dtype, kernel_init=self.kernel_init,
                        name=self.out_name)(y)


class FeedForward(nn.Module):
    """Position-wise MLP: ``fc2(act(fc1(x)))`` with ``fc1: [d, hidden]`` and ``fc2: [hidden, d]``."""

    hidden: int
    activation: Callable = nn.gelu
    use_bias: bool = True
    dtype: Any = None
    kernel_init: Callable = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = nn.Dense(self.hidden, use_bias=self.use_bias, dtype=self.dtype, kernel_init=self.kernel_init,
                     name="fc1")(x)
        return nn.Dense(d, use_bias=self.use_bias, dtype=self.dtype, kernel_init=self.kernel_init,
                        name="fc2")(self.activation(h))


# Tensor-parallel rules for the blocks above (Megatron-LM, Shoeybi et al., 2019): q/k/v and fc1 column-parallel
# (output features, hence heads, split over "model"), out and fc2 row-parallel (input features split; XLA inserts
# the all-reduce). Models prepend their own rules (embeddings, heads) to these.
TRANSFORMER_RULES_TP = [
    (r"(^|/)(query|key|value|fc1)/kernel$", jax.sharding.PartitionSpec(None, "model")),
    (r"(^|/)(query|key|value|fc1)/bias$", jax.sharding.PartitionSpec("model")),
    (r"(^|/)(out|fc2)/kernel$", jax.sharding.PartitionSpec("model", None)),
]
