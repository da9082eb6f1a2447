"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) matching Hugging Face transformers' ``LlamaForCausalLM``,
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (Touvron et al., 2023, "Llama 2"; Dubey et al., 2024, "The Llama 3
Herd of Models"; Jiang et al., 2023, "Mistral 7B"; Yang et al., 2024, "Qwen2 Technical Report").

For block l = 1..L (pre-norm, no dropout)::

    h_0 = E[ids]
    a   = h + o_proj(Attn(RMSNorm_in(h)))                                    (input_layernorm)
    h'  = a + down_proj(silu(gate_proj(x)) * up_proj(x)),  x = RMSNorm_post(a)   (post_attention_layernorm)
    logits = RMSNorm_f(h_L) Eᵀ (tied) or RMSNorm_f(h_L) W_lm_head

    RMSNorm(x) = w * x / sqrt(mean(x²) + eps)        (Zhang & Sennrich, 2019; computed in float32, cast back)

Attention with grouped-query heads (Ainslie et al., 2023, "GQA"): H query heads share K = num_key_value_heads
key/value heads (head h uses kv head h // (H / K)); rotary position embedding (Su et al., 2021, "RoFormer") on
q and k at integer positions p::

    inv_freq_i = rope_theta^(-2i / d_head),  i = 0 .. d_head/2 - 1
    q' = q cos(p θ) + rotate_half(q) sin(p θ),  θ = [inv_freq, inv_freq],  rotate_half([x1, x2]) = [-x2, x1]
    A = softmax(q' k'ᵀ / sqrt(d_head) + M) v      (M = 0 where allowed, -inf elsewhere; float32 softmax)

``rope_scaling`` (transformers' ``rope_parameters``) rescales inv_freq: ``"linear"``: inv_freq / factor;
``"llama3"`` (Llama 3.1): with wavelength λ_i = 2π / inv_freq_i, L_lo = orig_max / low_freq_factor and
L_hi = orig_max / high_freq_factor: λ < L_hi keeps inv_freq, λ > L_lo uses inv_freq / factor, and in between
s = (orig_max / λ - low_freq_factor) / (high_freq_factor - low_freq_factor) interpolates
(1 - s) inv_freq / factor + s inv_freq.

Mask M: query at cache slot q may attend key slot j iff j <= q, the key is not padding, and (sliding-window
layers, Mistral / Qwen2 ``sliding_attention``) j > q - sliding_window.

Parameter paths mirror the Hugging Face module names (``model.`` dropped, ``layers.{i}`` -> ``layers_{i}``, every
linear a plain ``nn.Dense`` with kernel ``[in, out]`` = the transposed torch weight)::

    embed_tokens/embedding [V, d]
    layers_{i}/input_layernorm/scale [d], layers_{i}/post_attention_layernorm/scale [d]
    layers_{i}/self_attn/{q_proj [d, H dh], k_proj [d, K dh], v_proj [d, K dh], o_proj [H dh, d]}/{kernel, bias?}
    layers_{i}/mlp/{gate_proj [d, f], up_proj [d, f], down_proj [f, d]}/{kernel, bias?}
    norm/scale [d], lm_head/kernel [d, V] (untied only)

Calling convention: ``model.apply({"params": p}, input_ids, attention_mask=None)`` -> float32 logits ``[B, T, V]``;
with ``cache=`` (from :meth:`Llama.init_cache`) it returns ``(logits, cache)`` for KV-cached decoding (see
:mod:`jaxmodels.models.generate`). Each block is a standalone module (:class:`LlamaBlock`) with
``block(hidden, *, positions=None, attention_mask=None)``, so a block walker can apply one block at a time.
Float32 parity with transformers (<= 1e-5 on the tests' checkpoints) assumes float32 matmuls: on GPUs that default
to TF32 run under ``jax.default_matmul_precision("float32")``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmodels.models.decoder import (apply_rope, block_mask, causal_attention, check_input_ids, decoder_mask,
                                      rope_inv_freq, update_cache)

__all__ = [
    "LlamaConfig", "Llama", "LlamaBlock", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm",
    "rope_inv_freq", "apply_rope", "decoder_mask", "block_mask", "causal_attention", "update_cache",
    "LLAMA_RULES_DP", "LLAMA_RULES_TP", "LLAMA_RULES_FSDP",
]

ROPE_TYPES = ("default", "linear", "llama3")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _freeze(d: Mapping[str, Any] | None) -> tuple | None:
    return None if d is None else tuple(sorted(d.items()))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Llama / Mistral / Qwen2 ``config.json`` the decoder uses (frozen, hashable).

    ``num_key_value_heads=None`` means H (multi-head attention); ``head_dim=None`` means hidden_size / heads.
    ``rope_scaling``: ``None`` or a tuple of ``(key, value)`` pairs (``rope_type`` plus its parameters; pass a dict to
    :meth:`from_hf_dict`). ``attention_bias`` puts biases on q/k/v/o (Llama), ``qkv_bias`` on q/k/v only (Qwen2).
    ``sliding_window`` applies to the layers whose ``layer_types`` entry is ``"sliding_attention"``, or to every
    layer when ``layer_types`` is None (Mistral).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple | None = None
    hidden_act: str = "silu"
    model_type: str = "llama"
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"LlamaConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type must be one of {sorted(_MODEL_TYPES)}, got {self.model_type!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"LlamaConfig: hidden_size={self.hidden_size} not divisible by "
                             f"num_attention_heads={self.num_attention_heads} (give head_dim)")
        # normalize the implicit defaults, so that equal models compare (and hash) equal
        object.__setattr__(self, "num_key_value_heads", self.kv_heads)
        object.__setattr__(self, "head_dim", self.dim_head)
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.kv_heads}")
        if self.dim_head % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.dim_head} must be even for rotary embeddings")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.hidden_act != "silu":
            raise ValueError(f"LlamaConfig.hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"LlamaConfig.sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"LlamaConfig.layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
            bad = [t for t in self.layer_types if t not in ("full_attention", "sliding_attention")]
            if bad:
                raise ValueError(f"LlamaConfig.layer_types: unknown layer type {bad[0]!r}")
        rs = self.rope_scaling_dict
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"LlamaConfig.rope_scaling: rope_type {kind!r} is not supported (one of {ROPE_TYPES})")
            need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                      "original_max_position_embeddings")}.get(kind, ())
            for k in need:
                if k not in rs:
                    raise ValueError(f"LlamaConfig.rope_scaling: rope_type {kind!r} needs {k!r}")
            if kind != "default" and not float(rs["factor"]) > 0:
                raise ValueError(f"LlamaConfig.rope_scaling: factor must be > 0, got {rs['factor']}")
            if kind == "llama3" and not float(rs["high_freq_factor"]) > float(rs["low_freq_factor"]):
                raise ValueError("LlamaConfig.rope_scaling: llama3 needs high_freq_factor > low_freq_factor")
            if float(rs.get("partial_rotary_factor", 1.0)) != 1.0:
                raise ValueError("LlamaConfig.rope_scaling: partial_rotary_factor != 1 is not supported")

    # derived sizes -------------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else int(self.num_key_value_heads)

    @property
    def dim_head(self) -> int:
        return int(self.head_dim) if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer ``i`` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    # Hugging Face config.json ------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> "LlamaConfig":
        """From a transformers ``config.json`` dict (model_type llama / mistral / qwen2; transformers 4's
        ``rope_theta`` + ``rope_scaling`` or transformers 5's ``rope_parameters``)."""
        raw = dict(raw)
        model_type = raw.get("model_type", "llama")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"LlamaConfig.from_hf_dict: model_type {model_type!r} is not a Llama-family model "
                             f"(one of {sorted(_MODEL_TYPES)})")
        rope = raw.get("rope_parameters")
        if isinstance(rope, Mapping) and rope and all(isinstance(v, Mapping) for v in rope.values()):
            raise ValueError("LlamaConfig.from_hf_dict: per-layer-type rope_parameters are not supported")
        if rope:
            rope = dict(rope)
            theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        else:
            theta = float(raw.get("rope_theta", 10000.0))
            rope = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else {}
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        scaling = None if rope.get("rope_type", "default") == "default" else rope
        window = raw.get("sliding_window")
        layer_types = raw.get("layer_types")
        if model_type == "qwen2":
            if layer_types is None:
                n = int(raw["num_hidden_layers"])
                use = bool(raw.get("use_sliding_window", False))
                start = int(raw.get("max_window_layers", n))
                layer_types = ["sliding_attention" if use and window is not None and i >= start else "full_attention"
                               for i in range(n)]
            if "sliding_attention" not in layer_types:
                window = None
        elif model_type == "llama":
            window, layer_types = None, None
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_scaling", "sliding_window",
                                                               "layer_types", "qkv_bias", "model_type"}
        kw = {k: raw[k] for k in names if raw.get(k) is not None}
        if model_type == "qwen2":
            kw["qkv_bias"] = True
            kw["attention_bias"] = False
        return cls(**kw, rope_theta=theta, rope_scaling=scaling, sliding_window=window,
                   layer_types=None if layer_types is None else tuple(layer_types), model_type=model_type)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict (written in transformers 5's layout with ``rope_parameters``, plus
        the transformers 4 keys ``rope_theta`` / ``rope_scaling``)."""
        rope = {"rope_type": "default", **(self.rope_scaling_dict or {}), "rope_theta": self.rope_theta}
        out: dict[str, Any] = {
            "architectures": [_MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.dim_head,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": self.rope_scaling_dict,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.attention_bias or self.mlp_bias or self.qkv_bias != (self.model_type == "qwen2"):
            raise ValueError(f"LlamaConfig.to_hf_dict: model_type {self.model_type!r} cannot express "
                             f"attention_bias={self.attention_bias} qkv_bias={self.qkv_bias} mlp_bias={self.mlp_bias}")
        if self.model_type == "mistral":
            if self.layer_types is not None and self.sliding_window is not None and \
                    "full_attention" in self.layer_types:
                raise ValueError("LlamaConfig.to_hf_dict: Mistral applies its sliding window to every layer")
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            types = self.layer_types or tuple(
                "sliding_attention" if self.sliding_window is not None else "full_attention"
                for _ in range(self.num_hidden_layers))
            out.update(sliding_window=self.sliding_window, layer_types=list(types),
                       use_sliding_window="sliding_attention" in types)
        return out


# ----------------------------------------------------------------------------------------------------------------
# modules


class LlamaRMSNorm(nn.Module):
    """``w * x / sqrt(mean(x²) + eps)`` (statistics in float32, the normalized x cast back before the scale, as
    transformers' ``LlamaRMSNorm``); parameter ``scale [d]``."""

    epsilon: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + jnp.float32(self.epsilon))
        return scale * xf.astype(x.dtype)


def _dense(features: int, bias: bool, name: str, dtype: Any, param_dtype: Any) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.normal(0.02), name=name)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE (module docstring); ``q_proj/k_proj/v_proj/o_proj``."""

    config: LlamaConfig
    window: int | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=0):
        c = self.config
        b, t, _ = x.shape
        h, kh, d = c.num_attention_heads, c.kv_heads, c.dim_head
        qkv_bias = c.attention_bias or c.qkv_bias
        q = _dense(h * d, qkv_bias, "q_proj", self.dtype, self.param_dtype)(x).reshape(b, t, h, d)
        k = _dense(kh * d, qkv_bias, "k_proj", self.dtype, self.param_dtype)(x).reshape(b, t, kh, d)
        v = _dense(kh * d, qkv_bias, "v_proj", self.dtype, self.param_dtype)(x).reshape(b, t, kh, d)
        inv = rope_inv_freq(c)
        q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
        new_cache = None
        if cache is not None:
            new_cache = update_cache(cache, k, v, cache_index)
            k, v = new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype)
        y = causal_attention(q, k, v, mask)
        out = _dense(c.hidden_size, c.attention_bias, "o_proj", self.dtype, self.param_dtype)(y)
        return out, new_cache


class LlamaMLP(nn.Module):
    """SwiGLU (Shazeer, 2020): ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        g = _dense(c.intermediate_size, c.mlp_bias, "gate_proj", self.dtype, self.param_dtype)(x)
        u = _dense(c.intermediate_size, c.mlp_bias, "up_proj", self.dtype, self.param_dtype)(x)
        return _dense(c.hidden_size, c.mlp_bias, "down_proj", self.dtype, self.param_dtype)(nn.silu(g) * u)


class LlamaBlock(nn.Module):
    """One decoder layer, usable on its own: ``block.apply({"params": p["layers_i"]}, hidden, positions=...,
    attention_mask=...)`` -> hidden ``[B, T, d]``.

    ``positions [B, T]`` (int, RoPE positions; default ``cache_index + arange(T)``). ``attention_mask``: None
    (causal), ``[B, S]`` 0/1 key mask (S = T, or the cache length with a cache), or a ready ``[B, 1, T, S]`` boolean
    mask (used as is; the sliding window is then the caller's). With ``cache={"k", "v"}`` (``[B, S, K, d_head]``)
    the new keys/values are written at slot ``cache_index`` and ``(hidden, cache)`` is returned.
    ``layer_index`` selects the layer's sliding window (``config.layer_window``).
    """

    config: LlamaConfig
    layer_index: int = 0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, *, positions=None, attention_mask=None, cache=None, cache_index=0):
        c = self.config
        b, t, _ = hidden.shape
        s = t if cache is None else cache["k"].shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t)[None] + cache_index, (b, t))
        mask = block_mask(attention_mask, t, s, cache_index, c.layer_window(self.layer_index))
        a, new_cache = LlamaAttention(c, c.layer_window(self.layer_index), self.dtype, self.param_dtype,
                                      name="self_attn")(
            LlamaRMSNorm(c.rms_norm_eps, self.param_dtype, name="input_layernorm")(hidden), positions, mask,
            cache, cache_index)
        hidden = hidden + a
        m = LlamaMLP(c, self.dtype, self.param_dtype, name="mlp")(
            LlamaRMSNorm(c.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(hidden))
        hidden = hidden + m
        return hidden if cache is None else (hidden, new_cache)


class Llama(nn.Module):
    """Token ids ``[B, T]`` -> float32 logits ``[B, T, vocab_size]`` (module docstring).

    ``attention_mask [B, T]`` (1 = token, 0 = padding; ``[B, S]`` over the cache slots when a cache is given).
    ``positions [B, T]``: RoPE positions (default: slots ``0..T-1``, transformers' default for a forward pass).
    ``cache``: from :meth:`init_cache`; then the call returns ``(logits, cache)`` with the keys/values of these
    tokens written at slot ``cache["index"]`` and the index advanced by T.
    ``dtype``: computation dtype (None: the parameters' dtype); ``param_dtype`` for ``init``.
    """

    config: LlamaConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def init_cache(self, batch: int, length: int, dtype: Any = jnp.float32) -> dict:
        """Zeroed KV cache for ``batch`` sequences of up to ``length`` tokens: ``{"index": int32 0,
        "layers": ({"k", "v": [batch, length, K, d_head]}, ...)}``."""
        c = self.config
        shape = (batch, length, c.kv_heads, c.dim_head)
        layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                       for _ in range(c.num_hidden_layers))
        return {"index": jnp.zeros((), jnp.int32), "layers": layers}

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, positions=None, cache=None):
        c = self.config
        check_input_ids("Llama", input_ids)
        b, t = input_ids.shape
        index = 0 if cache is None else cache["index"]
        if cache is not None and t > cache["layers"][0]["k"].shape[1]:
            raise ValueError(f"Llama: {t} tokens do not fit a cache of {cache['layers'][0]['k'].shape[1]} slots")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t)[None] + index, (b, t))
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        h = embed(input_ids)
        new_layers = []
        for i in range(c.num_hidden_layers):
            block = LlamaBlock(c, i, self.dtype, self.param_dtype, name=f"layers_{i}")
            if cache is None:
                h = block(h, positions=positions, attention_mask=attention_mask)
            else:
                h, lc = block(h, positions=positions, attention_mask=attention_mask, cache=cache["layers"][i],
                              cache_index=index)
                new_layers.append(lc)
        h = LlamaRMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(h)
        if c.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = _dense(c.vocab_size, False, "lm_head", self.dtype, self.param_dtype)(h)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, {"index": index + t, "layers": tuple(new_layers)}


# ----------------------------------------------------------------------------------------------------------------
# sharding rules (paths of the params tree; see jaxmodels.sharding)

# Data parallel: every parameter replicated (the batch is sharded over "data").
LLAMA_RULES_DP = [(r".*", P())]
# Tensor parallel (Megatron-LM): q/k/v/gate/up column-parallel (heads / hidden units split over "model"),
# o/down row-parallel (XLA adds the all-reduce); the untied head split over the vocabulary; the rest replicated.
# A kv projection with fewer heads than the model axis falls back to replicated (sharding.spec_for).
LLAMA_RULES_TP = [
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P(None, "model")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P("model")),
    (r"(o_proj|down_proj)/kernel$", P("model", None)),
    (r"^lm_head/kernel$", P(None, "model")),
    (r".*", P()),
]
# Fully sharded data parallel (ZeRO-3 style): every matrix split along its first axis over "data" (gathered by XLA
# where used), the embedding along the vocabulary; vectors replicated.
LLAMA_RULES_FSDP = [
    (r"/kernel$", P("data", None)),
    (r"^embed_tokens/embedding$", P("data", None)),
    (r".*", P()),
]
