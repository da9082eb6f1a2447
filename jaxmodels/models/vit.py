"""Vision Transformer encoder (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"; DeiT-Tiny shape from
Touvron et al., 2021, "Training data-efficient image transformers").

    z_0 = [x_cls; E x_p^1; ...; E x_p^N] + E_pos                 (patches x_p via a stride-p conv E)
    z'_l = z_{l-1} + MSA(Norm(z_{l-1}))                           (pre-LN blocks, l = 1..L)
    z_l  = z'_l + MLP(Norm(z'_l))
    logits = head(Norm(z_L)[cls])                                 (or the mean over patch tokens, pool="mean")

Parameter paths (linen ``params``)::

    patch_embed/{kernel [p, p, C, d], bias}, cls [1, 1, d], pos_embed [1, N(+1), d]
    block_{i}/norm1, block_{i}/attn/{query,key,value,out}/{kernel [d, d], bias},
    block_{i}/norm2, block_{i}/mlp/{fc1 [d, mlp_dim], fc2 [mlp_dim, d]}/{kernel, bias}
    norm, head/{kernel [d, num_classes], bias}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmodels.models.transformer import TRANSFORMER_RULES_TP, FeedForward, MultiHeadAttention, check_norm, make_norm

__all__ = ["ViT", "ViTBlock", "VIT_CONFIGS", "VIT_RULES_DP", "VIT_RULES_TP"]

# Configs as data: ViT(**VIT_CONFIGS["deit_tiny"]).
VIT_CONFIGS: dict[str, dict[str, Any]] = {
    "deit_tiny": dict(patch_size=16, width=192, depth=12, num_heads=3, mlp_dim=768, num_classes=1000),
    "deit_small": dict(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536, num_classes=1000),
    # A tiny encoder for 8x8 digits (16 patches of 2x2).
    "digits": dict(patch_size=2, width=64, depth=2, num_heads=4, mlp_dim=128, num_classes=10),
}


class ViTBlock(nn.Module):
    """Pre-LN encoder block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    num_heads: int
    mlp_dim: int
    norm: Any = "layernorm"
    dtype: Any = None

    @nn.compact
    def __call__(self, x, mask=None):
        x = x + MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(
            make_norm(self.norm, "norm1", dtype=self.dtype)(x), mask)
        return x + FeedForward(self.mlp_dim, dtype=self.dtype, name="mlp")(
            make_norm(self.norm, "norm2", dtype=self.dtype)(x))


class ViT(nn.Module):
    """Image ``[B, H, W, C]`` -> logits ``[B, num_classes]``.

    ``pool``: "cls" (prepend a learned class token and classify it) or "mean" (mean over patch tokens).
    ``norm``: "layernorm" | "rmsnorm" | a callable returning a linen norm module.
    """

    patch_size: int = 16
    width: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_dim: int = 768
    num_classes: int = 1000
    pool: str = "cls"
    norm: Any = "layernorm"
    dtype: Any = None

    def setup_checks(self, x):
        check_norm(self.norm)
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"ViT: pool must be 'cls' or 'mean', got {self.pool!r}")
        if min(self.patch_size, self.width, self.depth, self.num_heads, self.mlp_dim, self.num_classes) < 1:
            raise ValueError("ViT: sizes must be positive")
        if self.width % self.num_heads:
            raise ValueError(f"ViT: width={self.width} is not divisible by num_heads={self.num_heads}")
        if x.ndim != 4:
            raise ValueError(f"ViT expects images [B, H, W, C], got shape {x.shape}")
        if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
            raise ValueError(f"ViT: image {x.shape[1]}x{x.shape[2]} is not divisible by patch_size={self.patch_size}")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        self.setup_checks(x)
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed")(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], d))
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = ViTBlock(self.num_heads, self.mlp_dim, self.norm, self.dtype, name=f"block_{i}")(x)
        x = make_norm(self.norm, "norm", dtype=self.dtype)(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


# Data parallel: everything replicated (the train step shards the batch).
VIT_RULES_DP = [(r".*", P())]
# Tensor parallel: heads and MLP hidden units split over "model" (column-parallel q/k/v/fc1, row-parallel out/fc2);
# embeddings, norms and the head replicated.
VIT_RULES_TP = [*TRANSFORMER_RULES_TP, (r".*", P())]
