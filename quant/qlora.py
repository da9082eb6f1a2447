"""QLoRA's frozen base (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): NF4 weights with
double-quantized scales, read by :mod:`jaxmodels.adapters` through its ``materialize`` hook.

Per weight ``W`` (a Dense kernel ``[in, out]``; blocks of ``group_size = 64`` along the input axis)::

    c2_b  = max_{i in b} |W_i|                               (float32 absmax of each block)
    q_i   = argmin_k |W_i / c2_b - NF4_LEVELS[k]|            (4-bit codes, two per byte: quant.formats.NF4Format)
    Double quantization (the paper's Sec. 3): the c2 (flattened, padded to a multiple of 256 with their mean)
    μ = mean(c2);  c2 - μ in FP8 E4M3 with one float32 scale c1 per 256 consecutive c2 (quant.formats.FloatFormat)
    Ŵ_i   = NF4_LEVELS[q_i] · (μ + fp8(c2_b - μ))

Storage per weight: 4 bits + 8 / 64 bits + 32 / (64 · 256) bits ≈ 4.127 bits (≈ 0.258× bf16), measured by
:func:`frozen_bytes` from the stored leaves. Usage::

    frozen = qlora_base(params, target=r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
    lora = adapters.init_lora(key, frozen, cfg, materialize=dequantize_base)
    logits = adapters.apply(model, frozen, lora, cfg, x, materialize=dequantize_base)

Adapters stay in their own dtype (fp32 or bf16); the dequantized base is in the original weight dtype.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import map_with_path
from quant.formats import FloatFormat, NF4Format
from quant.qarray import QuantizedArray, dequantize, quantize

__all__ = ["QLoRAWeight", "quantize_base", "dequantize_base", "qlora_base", "frozen_bytes", "is_qlora_weight",
           "DQ_BLOCK"]

DQ_BLOCK = 256  # c2 per FP8 block (the paper's block size for the second quantization)
_DQ_FORMAT = FloatFormat("e4m3", granularity="channel", in_axis=1, out_axis=0)


@jax.tree_util.register_pytree_with_keys_class
class QLoRAWeight:
    """A frozen NF4 weight: packed 4-bit codes, FP8 codes of ``c2 - μ`` with their block scales ``c1``, and ``μ``.
    Static: the NF4 format, the weight's shape/dtype and the compact shape of ``c2``."""

    __slots__ = ("packed", "c2", "mu", "fmt", "shape", "dtype", "c2_shape")

    def __init__(self, packed, c2: QuantizedArray, mu, fmt: NF4Format, shape, dtype, c2_shape):
        self.packed, self.c2, self.mu = packed, c2, mu
        self.fmt, self.shape, self.dtype, self.c2_shape = fmt, tuple(shape), np.dtype(dtype), tuple(c2_shape)

    def tree_flatten_with_keys(self):
        K = jax.tree_util.GetAttrKey
        return [(K("packed"), self.packed), (K("c2"), self.c2), (K("mu"), self.mu)], \
            (self.fmt, self.shape, self.dtype, self.c2_shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(l.shape)) * np.dtype(l.dtype).itemsize for l in jax.tree_util.tree_leaves(self))

    def __repr__(self):
        return f"QLoRAWeight(shape={self.shape}, dtype={self.dtype.name}, nbytes={self.nbytes})"


def is_qlora_weight(x: Any) -> bool:
    """True if ``x`` is a :class:`QLoRAWeight` (a frozen NF4 base with double-quantized scales), e.g. as ``is_leaf``
    when walking a QLoRA model's params."""
    return isinstance(x, QLoRAWeight)


def quantize_base(w: jax.Array, group_size: int = 64) -> QLoRAWeight:
    """NF4 + double-quantized scales of one weight (module docstring). Raises on NaN/Inf (NF4 has no code)."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"quantize_base: expects a 2-D Dense kernel, got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"quantize_base: expects a float weight, got {w.dtype}")
    fmt = NF4Format(group_size=group_size)
    if w.shape[0] % group_size:
        raise ValueError(f"quantize_base: input size {w.shape[0]} is not divisible by group_size {group_size}")
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.isfinite(w).all()):
        raise ValueError("quantize_base: the weight contains NaN or Inf (NF4 has no code for them)")
    return _quantize_base(w, fmt)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_base(w, fmt):  # one compile per shape instead of one per eager op
    qa = quantize(w, fmt)
    c2 = qa.scale.astype(jnp.float32)
    flat = c2.reshape(-1)
    mu = jnp.mean(flat)
    n = flat.shape[0]
    pad = -n % DQ_BLOCK
    centred = jnp.pad(flat - mu, (0, pad)).reshape(-1, DQ_BLOCK)
    return QLoRAWeight(qa.packed, quantize(centred, _DQ_FORMAT), mu.astype(jnp.float32), fmt, w.shape, w.dtype,
                       c2.shape)


def dequantize_base(q: Any) -> jax.Array:
    """The ``materialize`` hook: ``Ŵ`` of a :class:`QLoRAWeight` in its original dtype (arrays pass through)."""
    if not isinstance(q, QLoRAWeight):
        if isinstance(q, jax.Array) or isinstance(q, np.ndarray):
            return q
        raise TypeError(f"dequantize_base: expected a QLoRAWeight, got {type(q).__name__}")
    n = int(np.prod(q.c2_shape))
    c2 = (dequantize(q.c2, jnp.float32).reshape(-1)[:n] + q.mu).reshape(q.c2_shape)
    return dequantize(QuantizedArray(q.packed, c2, None, q.fmt, q.shape, q.dtype))


def qlora_base(params: Any, target: str = r"kernel$", exclude: str | None = r"(embed|lm_head|head)",
               group_size: int = 64) -> Any:
    """``params`` with every 2-D ``kernel`` whose path matches ``target`` (and not ``exclude``) replaced by its
    :class:`QLoRAWeight`; other leaves unchanged. Inputs are not modified."""
    t, e = re.compile(target), re.compile(exclude) if exclude else None

    def fn(path, leaf):
        if path.endswith("/kernel") and jnp.ndim(leaf) == 2 and t.search(path) and not (e and e.search(path)):
            return quantize_base(leaf, group_size)
        return leaf

    return map_with_path(fn, params)


def frozen_bytes(tree: Any) -> int:
    """Stored bytes of a (partly) quantized params tree: the sum of its leaves' sizes, QLoRA weights included."""
    return sum(int(np.prod(np.shape(l))) * np.dtype(l.dtype).itemsize for l in jax.tree_util.tree_leaves(tree))
