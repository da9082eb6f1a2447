"""``QuantizedArray``: a pytree holding packed codes, scales and zero points, with the format as static aux data.

``quantize(x, fmt)`` computes the parameters (:func:`quant.formats.compute_qparams`), encodes every element to an
unsigned ``bits``-bit code (:func:`quant.formats.encode`) and packs the codes along the last axis
(:func:`quant.packing.pack_bits`); ``dequantize(qa)`` inverts the three steps, so
``dequantize(quantize(x, fmt)) == round_trip(x, fmt)`` exactly. ``qa.nbytes`` is the sum of the leaves' sizes (packed
codes + scales + zero points): the stored size is measured, not assumed.

``quantize_tree`` / ``dequantize_tree`` apply the same to every leaf of a pytree chosen by path-regex rules.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import map_with_path
from quant.formats import Format, MXFormat, QParams, compute_qparams, decode, encode
from quant.packing import pack_bits, unpack_bits

__all__ = ["QuantizedArray", "quantize", "dequantize", "quantize_tree", "dequantize_tree", "match_rule",
           "is_quantized"]


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
    """Packed ``uint8`` codes (``packed``), compact ``scale`` and optional ``zero``; ``fmt``, ``shape`` and ``dtype``
    are static. Flattened paths read ``.../packed``, ``.../scale``, ``.../zero``."""

    __slots__ = ("packed", "scale", "zero", "fmt", "shape", "dtype")

    def __init__(self, packed, scale, zero, fmt: Format, shape: tuple[int, ...], dtype):
        self.packed, self.scale, self.zero = packed, scale, zero
        self.fmt, self.shape, self.dtype = fmt, tuple(shape), np.dtype(dtype)

    def tree_flatten_with_keys(self):
        K = jax.tree_util.GetAttrKey
        children = [(K("packed"), self.packed), (K("scale"), self.scale)]
        if self.zero is not None:
            children.append((K("zero"), self.zero))
        return children, (self.fmt, self.shape, self.dtype, self.zero is not None)

    @classmethod
    def tree_unflatten(cls, aux, children):
        fmt, shape, dtype, has_zero = aux
        zero = children[2] if has_zero else None
        return cls(children[0], children[1], zero, fmt, shape, dtype)

    @property
    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes + scales + zero points."""
        return sum(int(np.prod(l.shape)) * np.dtype(l.dtype).itemsize for l in jax.tree_util.tree_leaves(self))

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / max(1, int(np.prod(self.shape)))

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize(self, dtype)

    def __repr__(self):
        return (f"QuantizedArray(shape={self.shape}, dtype={self.dtype.name}, fmt={self.fmt}, "
                f"packed={getattr(self.packed, 'shape', None)}, scale={getattr(self.scale, 'shape', None)})")


def is_quantized(x: Any) -> bool:
    """True if ``x`` is a :class:`QuantizedArray` (bit-packed levels + scales), e.g. as ``is_leaf`` in ``jax.tree.map``
    over a tree of quantized and plain leaves."""
    return isinstance(x, QuantizedArray)


def quantize(x: jax.Array, fmt: Format, qparams: QParams | None = None, scale_dtype=jnp.float32) -> QuantizedArray:
    """Quantize ``x`` to a :class:`QuantizedArray` (``qparams`` default: :func:`compute_qparams` of ``x``); scales
    are stored in ``scale_dtype`` (MX formats: their E8M0 bytes)."""
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("quantize needs an array with at least one dimension")
    qp = compute_qparams(x, fmt) if qparams is None else qparams
    codes = encode(x, fmt, qp)
    packed = pack_bits(codes, int(fmt.bits))
    # MX scales are E8M0 bytes (uint8) whatever ``scale_dtype`` says: elem bits + 8 / group_size bits per element
    scale = jnp.asarray(qp.scale).astype(jnp.uint8 if isinstance(fmt, MXFormat) else scale_dtype)
    zero = None if qp.zero is None else jnp.asarray(qp.zero).astype(jnp.uint8 if fmt.bits <= 8 else jnp.int32)
    return QuantizedArray(packed, scale, zero, fmt, x.shape, x.dtype)


def dequantize(qa: QuantizedArray, dtype=None) -> jax.Array:
    """Values ``x_hat`` of a :class:`QuantizedArray` in ``dtype`` (default: the original dtype)."""
    codes = unpack_bits(qa.packed, int(qa.fmt.bits), qa.shape[-1])
    zero = None if qa.zero is None else qa.zero.astype(jnp.float32)
    qp = QParams(qa.scale.astype(jnp.float32), zero)
    return decode(codes, qa.fmt, qp, dtype=qa.dtype if dtype is None else dtype)


def match_rule(path: str, rules: Sequence[tuple[str, Any]]) -> Any:
    """First ``(regex, value)`` rule whose regex ``re.search``-es ``path``; ``None`` if none matches. A rule value
    of ``None`` means "leave this leaf alone" (e.g. ``(r"embed|head", None)`` before a catch-all)."""
    for pattern, value in rules:
        if re.search(pattern, path):
            return value
    return None


def quantize_tree(params: Any, rules: Sequence[tuple[str, Format | None]], min_ndim: int = 2) -> Any:
    """Replace each leaf whose path matches a rule with a format (first match wins) by a :class:`QuantizedArray`;
    leaves with fewer than ``min_ndim`` dims (biases, norms) and unmatched leaves are kept as they are."""

    def fn(path, leaf):
        fmt = match_rule(path, rules)
        if fmt is None or jnp.ndim(leaf) < min_ndim:
            return leaf
        return quantize(leaf, fmt)

    return map_with_path(fn, params)


def dequantize_tree(tree: Any, dtype=None) -> Any:
    """Replace every :class:`QuantizedArray` in ``tree`` by its dequantized values."""
    return jax.tree_util.tree_map(lambda l: dequantize(l, dtype) if is_quantized(l) else l, tree,
                                  is_leaf=is_quantized)
