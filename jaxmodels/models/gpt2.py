"""GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners") matching Hugging Face
transformers' ``GPT2LMHeadModel``.

Pre-LN decoder, for block l = 1..L (no dropout)::

    h_0 = wte[ids] + wpe[positions]
    a   = h + c_proj(Attn(ln_1(h)))          q, k, v = split(c_attn(x), 3);  A = softmax(q kᵀ / sqrt(d_head) + M) v
    h'  = a + mlp.c_proj(gelu_new(c_fc(ln_2(a))))
    logits = ln_f(h_L) wteᵀ                  (tied head)

    LayerNorm(x) = (x - mean) / sqrt(var + eps) * scale + bias;   gelu_new(x) = x/2 (1 + tanh(√(2/π)(x + 0.044715 x³)))

M is the causal + padding mask of :func:`jaxmodels.models.llama.decoder_mask`. Hugging Face's ``Conv1D`` stores
its weight as ``[in, out]`` (it computes ``x @ W + b``), which is already the layout of a flax ``nn.Dense``
kernel: GPT-2 weights load without a transpose (the Llama family's ``nn.Linear`` weights ``[out, in]`` do need one).

Parameter paths (``transformer.`` dropped, ``h.{i}`` -> ``layers_{i}``, so every decoder in this package walks
its blocks as ``layers_{i}``)::

    wte/embedding [V, d], wpe/embedding [n_positions, d]
    layers_{i}/ln_1/{scale,bias}, layers_{i}/attn/c_attn/{kernel [d, 3d], bias}, layers_{i}/attn/c_proj/{kernel, bias}
    layers_{i}/ln_2/{scale,bias}, layers_{i}/mlp/c_fc/{kernel [d, 4d], bias}, layers_{i}/mlp/c_proj/{kernel, bias}
    ln_f/{scale,bias}

Same calling convention and cache as :class:`jaxmodels.models.llama.Llama`; the block (:class:`GPT2Block`) is
``block(hidden, *, positions=None, attention_mask=None)`` (positions are unused inside a block: GPT-2's positions
enter once, through ``wpe``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmodels.models.decoder import block_mask, causal_attention, check_input_ids, update_cache

__all__ = ["GPT2Config", "GPT2", "GPT2Block", "GPT2_RULES_DP", "GPT2_RULES_TP", "GPT2_RULES_FSDP"]

_ACTS = {"gelu_new": lambda x: nn.gelu(x, approximate=True), "gelu": lambda x: nn.gelu(x, approximate=False),
         "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True), "relu": nn.relu}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The fields of a GPT-2 ``config.json`` the model uses (``n_inner=None`` means 4 n_embd)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    model_type: str = "gpt2"

    def __post_init__(self):
        for f in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"GPT2Config.{f} must be >= 1, got {getattr(self, f)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd={self.n_embd} not divisible by n_head={self.n_head}")
        if self.activation_function not in _ACTS:
            raise ValueError(f"GPT2Config.activation_function must be one of {sorted(_ACTS)}, got "
                             f"{self.activation_function!r}")
        if not self.scale_attn_weights:
            raise ValueError("GPT2Config: scale_attn_weights=False is not supported")
        if not self.tie_word_embeddings:
            raise ValueError("GPT2Config: GPT-2's head is tied to wte (tie_word_embeddings=False is not supported)")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")

    @property
    def inner(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else int(self.n_inner)

    @property
    def dim_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_hidden_layers(self) -> int:  # the name the Llama family uses (block walkers read it)
        return self.n_layer

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> "GPT2Config":
        raw = dict(raw)
        if raw.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"GPT2Config.from_hf_dict: model_type {raw.get('model_type')!r} is not gpt2")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if raw.get(flag):
                raise ValueError(f"GPT2Config.from_hf_dict: {flag}=True is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: raw[k] for k in names if raw.get(k) is not None})

    def to_hf_dict(self) -> dict[str, Any]:
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": self.vocab_size,
                "n_positions": self.n_positions, "n_embd": self.n_embd, "n_layer": self.n_layer,
                "n_head": self.n_head, "n_inner": self.n_inner, "layer_norm_epsilon": self.layer_norm_epsilon,
                "activation_function": self.activation_function, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "tie_word_embeddings": True, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}


def _dense(features, name, dtype, param_dtype):
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=nn.initializers.normal(0.02),
                    name=name)


def _ln(c: GPT2Config, name, dtype, param_dtype):
    return nn.LayerNorm(epsilon=c.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                        name=name)


class GPT2Attention(nn.Module):
    config: GPT2Config
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cache=None, cache_index=0):
        c = self.config
        b, t, d = x.shape
        qkv = _dense(3 * d, "c_attn", self.dtype, self.param_dtype)(x)
        q, k, v = (y.reshape(b, t, c.n_head, c.dim_head) for y in jnp.split(qkv, 3, axis=-1))
        new_cache = None
        if cache is not None:
            new_cache = update_cache(cache, k, v, cache_index)
            k, v = new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype)
        y = causal_attention(q, k, v, mask)
        return _dense(d, "c_proj", self.dtype, self.param_dtype)(y), new_cache


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = _dense(c.inner, "c_fc", self.dtype, self.param_dtype)(x)
        return _dense(c.n_embd, "c_proj", self.dtype, self.param_dtype)(_ACTS[c.activation_function](h))


class GPT2Block(nn.Module):
    """One GPT-2 layer, usable on its own: ``block(hidden, *, positions=None, attention_mask=None, cache=None,
    cache_index=0)`` with the conventions of :class:`jaxmodels.models.llama.LlamaBlock` (``positions`` accepted
    and unused)."""

    config: GPT2Config
    layer_index: int = 0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, *, positions=None, attention_mask=None, cache=None, cache_index=0):
        del positions
        c = self.config
        t = hidden.shape[1]
        s = t if cache is None else cache["k"].shape[1]
        mask = block_mask(attention_mask, t, s, cache_index, None)
        a, new_cache = GPT2Attention(c, self.dtype, self.param_dtype, name="attn")(
            _ln(c, "ln_1", self.dtype, self.param_dtype)(hidden), mask, cache, cache_index)
        hidden = hidden + a
        hidden = hidden + GPT2MLP(c, self.dtype, self.param_dtype, name="mlp")(
            _ln(c, "ln_2", self.dtype, self.param_dtype)(hidden))
        return hidden if cache is None else (hidden, new_cache)


class GPT2(nn.Module):
    """Token ids ``[B, T]`` -> float32 logits ``[B, T, vocab_size]``; the arguments of
    :class:`jaxmodels.models.llama.Llama` (``positions`` index ``wpe``; default slots ``0..T-1``)."""

    config: GPT2Config
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def init_cache(self, batch: int, length: int, dtype: Any = jnp.float32) -> dict:
        """Zeroed KV cache: ``{"index": int32 0, "layers": ({"k", "v": [batch, length, n_head, d_head]}, ...)}``."""
        c = self.config
        if length > c.n_positions:
            raise ValueError(f"GPT2: cache length {length} exceeds n_positions={c.n_positions}")
        shape = (batch, length, c.n_head, c.dim_head)
        layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(c.n_layer))
        return {"index": jnp.zeros((), jnp.int32), "layers": layers}

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, positions=None, cache=None):
        c = self.config
        check_input_ids("GPT2", input_ids)
        b, t = input_ids.shape
        if cache is None and t > c.n_positions:
            raise ValueError(f"GPT2: sequence length {t} exceeds n_positions={c.n_positions}")
        index = 0 if cache is None else cache["index"]
        if cache is not None and t > cache["layers"][0]["k"].shape[1]:
            raise ValueError(f"GPT2: {t} tokens do not fit a cache of {cache['layers'][0]['k'].shape[1]} slots")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t)[None] + index, (b, t))
        wte = nn.Embed(c.vocab_size, c.n_embd, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=nn.initializers.normal(0.02), name="wte")
        wpe = nn.Embed(c.n_positions, c.n_embd, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=nn.initializers.normal(0.01), name="wpe")
        h = wte(input_ids) + wpe(positions)
        new_layers = []
        for i in range(c.n_layer):
            block = GPT2Block(c, i, self.dtype, self.param_dtype, name=f"layers_{i}")
            if cache is None:
                h = block(h, attention_mask=attention_mask)
            else:
                h, lc = block(h, attention_mask=attention_mask, cache=cache["layers"][i], cache_index=index)
                new_layers.append(lc)
        h = _ln(c, "ln_f", self.dtype, self.param_dtype)(h)
        logits = wte.attend(h).astype(jnp.float32)
        if cache is None:
            return logits
        return logits, {"index": index + t, "layers": tuple(new_layers)}


GPT2_RULES_DP = [(r".*", P())]
# Tensor parallel: c_attn / c_fc column-parallel, the two c_proj row-parallel over "model" (the fused q|k|v
# output is split in contiguous blocks; XLA reshards at the head split, so the math is unchanged).
GPT2_RULES_TP = [
    (r"(c_attn|c_fc)/kernel$", P(None, "model")),
    (r"(c_attn|c_fc)/bias$", P("model")),
    (r"c_proj/kernel$", P("model", None)),
    (r".*", P()),
]
GPT2_RULES_FSDP = [
    (r"/kernel$", P("data", None)),
    (r"^(wte|wpe)/embedding$", P("data", None)),
    (r".*", P()),
]
