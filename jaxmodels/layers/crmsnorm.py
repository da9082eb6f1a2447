"""Pre-RMSNorm and Pre-CRMSNorm transformers and their exact equivalence with Pre-LN transformers.

Jiang, Gu, Zhu & Pan, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN Transformers"
(NeurIPS 2023).

CRMSNorm ("compressed RMSNorm") normalizes a zero-mean vector ``x in R^d`` stored in its first ``d-1`` coordinates
``z = x[:d-1]`` (the last one is recovered as ``x_d = -sum_i z_i``)::

    CRMSNorm(z) = gamma * z / sqrt((sum_i z_i^2 + (sum_i z_i)^2) / d + eps)

The paper's conversions, implemented here for the minimal Pre-LN transformer :class:`PreNormTransformer`:

Pre-LN -> Pre-RMSNorm (:func:`pre_ln_to_pre_rmsnorm`)
    1. fold every LayerNorm's affine into the linear layers that read its output:
       ``W' = diag(gamma) W``, ``b' = b + beta W`` (:func:`fold_norm_affine`);
    2. make the residual stream zero-mean: every layer that writes into it (token/position embeddings, attention
       output projection, second MLP layer) has its output recentred, ``W' = W (I - 1 1^T / d)``, ``b' = b - mean(b)``
       (:func:`recenter_output`). A zero-mean input makes ``LN(x) = RMSNorm(x)`` exactly (same eps), and the
       LayerNorm output does not depend on the mean of its input, so the network function is unchanged.

Pre-RMSNorm -> Pre-CRMSNorm (:func:`pre_rmsnorm_to_pre_crmsnorm`)
    1. fold the RMSNorm gains into the readers (as above);
    2. writers drop their last output column (:func:`compress_output`);
    3. readers get ``W'_i = W_i - W_d`` for ``i < d`` (rows of a ``[in, out]`` kernel, :func:`compress_input`) since
       ``sum_i y_i W_i = sum_{i<d} y_i (W_i - W_d)`` when ``y_d = -sum_{i<d} y_i``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.layers.norms import LayerNorm, RMSNorm

__all__ = [
    "CRMSNorm",
    "crms_norm",
    "PreNormTransformer",
    "fold_norm_affine",
    "recenter_output",
    "compress_output",
    "compress_input",
    "pre_ln_to_pre_rmsnorm",
    "pre_rmsnorm_to_pre_crmsnorm",
]


def crms_norm(z: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``z / sqrt((sum z^2 + (sum z)^2) / d + eps)`` with ``d = z.shape[-1] + 1`` (no gain), in float32."""
    zf = z.astype(jnp.float32)
    d = z.shape[-1] + 1
    ms = (jnp.square(zf).sum(-1, keepdims=True) + jnp.square(zf.sum(-1, keepdims=True))) / d
    return zf * jax.lax.rsqrt(ms + eps)


class CRMSNorm(nn.Module):
    """Jiang et al. (2023): ``y = gamma * z / sqrt((sum_i z_i^2 + (sum_i z_i)^2) / d + eps)``, ``d = dim(z) + 1``:
    RMSNorm of the zero-mean vector ``[z, -sum z]`` without materializing the last coordinate."""

    eps: float = 1e-6
    use_scale: bool = True

    @nn.compact
    def __call__(self, z):
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        y = crms_norm(z, self.eps)
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (z.shape[-1],), jnp.float32)
        return y.astype(z.dtype)


_NORMS = ("layernorm", "rmsnorm", "crmsnorm")


class _Block(nn.Module):
    d_model: int
    num_heads: int
    mlp_dim: int
    norm: str
    eps: float

    def _norm(self, name):
        if self.norm == "layernorm":
            return LayerNorm(self.eps, name=name)
        if self.norm == "rmsnorm":
            return RMSNorm(self.eps, name=name)
        return CRMSNorm(self.eps, name=name)

    @nn.compact
    def __call__(self, x):
        resid = x.shape[-1]
        b, t, _ = x.shape
        h = self._norm("norm_1")(x)
        hd = self.d_model // self.num_heads
        q, k, v = (nn.Dense(self.d_model, name=n)(h).reshape(b, t, self.num_heads, hd)
                   for n in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(q.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, t, self.d_model)
        x = x + nn.Dense(resid, name="out")(a)
        h = self._norm("norm_2")(x)
        h = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(h))
        return x + nn.Dense(resid, name="fc2")(h)


class PreNormTransformer(nn.Module):
    """A minimal causal Pre-norm transformer (token + learned position embedding, ``num_layers`` blocks of
    ``x + Attn(Norm(x))``, ``x + MLP(Norm(x))``, final norm, linear head) with ``norm`` in
    ``{"layernorm", "rmsnorm", "crmsnorm"}``. With ``"crmsnorm"`` the residual stream has width ``d_model - 1``.
    Returns logits ``[B, T, vocab_size]``."""

    vocab_size: int
    d_model: int = 32
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 64
    max_len: int = 64
    norm: str = "layernorm"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, tokens):
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={self.max_len}")
        resid = self.d_model - (self.norm == "crmsnorm")
        x = nn.Embed(self.vocab_size, resid, name="tok_embed")(tokens)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, resid))
        x = x + pos[: tokens.shape[1]]
        for i in range(self.num_layers):
            x = _Block(self.d_model, self.num_heads, self.mlp_dim, self.norm, self.eps, name=f"block_{i}")(x)
        x = _Block._norm(self, "final_norm")(x)
        return nn.Dense(self.vocab_size, name="head")(x)


# ----------------------------------------------------------------------------------------------------------------
# Conversion primitives (plain array functions).


def fold_norm_affine(scale: jax.Array, bias: jax.Array | None, kernel: jax.Array, dense_bias: jax.Array):
    """Fold a norm's ``y = scale * n + bias`` into the following Dense ``y W + b``:
    ``W' = diag(scale) W``, ``b' = b + bias W``. Returns ``(W', b')``."""
    if kernel.ndim != 2 or scale.shape != (kernel.shape[0],):
        raise ValueError(f"fold_norm_affine: scale {scale.shape} does not match kernel {kernel.shape}")
    new_b = dense_bias if bias is None else dense_bias + bias @ kernel
    return scale[:, None] * kernel, new_b


def recenter_output(kernel: jax.Array, bias: jax.Array | None = None):
    """Make a writer's outputs zero-mean over the last axis: ``W' = W (I - 11^T/d)``, ``b' = b - mean(b)``.
    Works for Dense kernels ``[in, d]`` and embedding tables ``[vocab, d]``."""
    k = kernel - kernel.mean(-1, keepdims=True)
    return k if bias is None else (k, bias - bias.mean(-1, keepdims=True))


def compress_output(kernel: jax.Array, bias: jax.Array | None = None):
    """Drop the last output coordinate of a writer (its value is minus the sum of the others)."""
    k = kernel[..., :-1]
    return k if bias is None else (k, bias[..., :-1])


def compress_input(kernel: jax.Array) -> jax.Array:
    """A reader ``[d, out]`` of a zero-mean input becomes ``[d-1, out]`` with rows ``W_i - W_d``."""
    return kernel[:-1] - kernel[-1:]


# ----------------------------------------------------------------------------------------------------------------
# Whole-model conversions for PreNormTransformer parameters.

_READERS = {"norm_1": ("query", "key", "value"), "norm_2": ("fc1",)}
_WRITERS = ("out", "fc2")


def _blocks(params):
    return sorted((k for k in params if k.startswith("block_")), key=lambda s: int(s.split("_")[1]))


def _fold_all(p: dict, has_bias: bool) -> dict:
    """Fold every norm's affine into its readers; norms keep a unit gain."""
    for blk in _blocks(p):
        for norm, readers in _READERS.items():
            n = p[blk][norm]
            for r in readers:
                d = p[blk][r]
                d["kernel"], d["bias"] = fold_norm_affine(n["scale"], n.get("bias") if has_bias else None,
                                                          d["kernel"], d["bias"])
            p[blk][norm] = {"scale": jnp.ones_like(n["scale"])}
    n = p["final_norm"]
    p["head"]["kernel"], p["head"]["bias"] = fold_norm_affine(n["scale"], n.get("bias") if has_bias else None,
                                                              p["head"]["kernel"], p["head"]["bias"])
    p["final_norm"] = {"scale": jnp.ones_like(n["scale"])}
    return p


def _unwrap(params):
    return params["params"] if "params" in params and len(params) == 1 else params


def pre_ln_to_pre_rmsnorm(params: Any) -> dict:
    """Convert :class:`PreNormTransformer` ``norm="layernorm"`` params to an equivalent ``norm="rmsnorm"`` model
    (fold LN affines into readers, recentre every residual writer). The input is not modified."""
    p = _to_mutable(jax.tree.map(jnp.asarray, _unwrap(params)))
    if "bias" not in p["final_norm"]:
        raise ValueError("pre_ln_to_pre_rmsnorm: expected LayerNorm params (scale and bias) in final_norm")
    p = _fold_all(p, has_bias=True)
    p["tok_embed"]["embedding"] = recenter_output(p["tok_embed"]["embedding"])
    p["pos_embed"] = recenter_output(p["pos_embed"])
    for blk in _blocks(p):
        for w in _WRITERS:
            p[blk][w]["kernel"], p[blk][w]["bias"] = recenter_output(p[blk][w]["kernel"], p[blk][w]["bias"])
    return p


def _check_zero_mean(name, arr, rtol=1e-4):
    if isinstance(arr, jax.core.Tracer):  # under jit the values are unknown; the check runs eagerly only
        return
    a = jnp.asarray(arr, jnp.float32)
    if float(jnp.abs(a.mean(-1)).max()) > rtol * (float(jnp.abs(a).max()) + 1e-30):
        raise ValueError(f"pre_rmsnorm_to_pre_crmsnorm: {name} does not write a zero-mean residual stream; "
                         "convert with pre_ln_to_pre_rmsnorm (or recenter_output) first")


def pre_rmsnorm_to_pre_crmsnorm(params: Any) -> dict:
    """Convert zero-mean-residual ``norm="rmsnorm"`` params (e.g. from :func:`pre_ln_to_pre_rmsnorm`) to an equivalent
    ``norm="crmsnorm"`` model with residual width ``d - 1``. The input is not modified.

    The equivalence needs a zero-mean residual stream: every writer's output must have zero mean over features
    (checked, outside jit, to a relative 1e-4)."""
    p = _to_mutable(jax.tree.map(jnp.asarray, _unwrap(params)))
    if "bias" in p["final_norm"]:
        raise ValueError("pre_rmsnorm_to_pre_crmsnorm: expected RMSNorm params (no bias); convert LN first")
    _check_zero_mean("tok_embed", p["tok_embed"]["embedding"])
    _check_zero_mean("pos_embed", p["pos_embed"])
    for blk in _blocks(p):
        for w in _WRITERS:
            _check_zero_mean(f"{blk}/{w}/kernel", p[blk][w]["kernel"])
            _check_zero_mean(f"{blk}/{w}/bias", p[blk][w]["bias"])
    p = _fold_all(p, has_bias=False)
    p["tok_embed"]["embedding"] = compress_output(p["tok_embed"]["embedding"])
    p["pos_embed"] = compress_output(p["pos_embed"])
    for blk in _blocks(p):
        for w in _WRITERS:
            p[blk][w]["kernel"], p[blk][w]["bias"] = compress_output(p[blk][w]["kernel"], p[blk][w]["bias"])
        for norm, readers in _READERS.items():
            for r in readers:
                p[blk][r]["kernel"] = compress_input(p[blk][r]["kernel"])
            p[blk][norm]["scale"] = p[blk][norm]["scale"][:-1]
    p["head"]["kernel"] = compress_input(p["head"]["kernel"])
    p["final_norm"]["scale"] = p["final_norm"]["scale"][:-1]
    return p


def _to_mutable(tree):
    if hasattr(tree, "items"):
        return {k: _to_mutable(v) for k, v in tree.items()}
    return tree
