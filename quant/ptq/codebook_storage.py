"""Codebook quantization: the static group layout, dequantization from codes, and the stored form (bit-packed
codes + float16 codebooks, :class:`CodebookWeight`). See :mod:`quant.ptq.codebook` for the method and equations."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quant.packing import pack_bits, unpack_bits

_HI = jax.lax.Precision.HIGHEST  # exact float32 products also on GPUs that would use TF32 by default


class Layout(NamedTuple):
    """Static shape information: ``W[R, C]``, vectors of ``d`` columns, groups of ``gr`` rows × ``gc`` columns,
    ``k`` codebook entries."""

    R: int
    C: int
    d: int
    gr: int
    gc: int
    k: int

    @property
    def n(self) -> int:  # vectors per row
        return self.C // self.d

    @property
    def n_rg(self) -> int:
        return self.R // self.gr

    @property
    def n_cg(self) -> int:
        return self.C // self.gc



# ------------------------------------------------------------------------------------------------ layout helpers

def _group_index(lay: Layout):
    rg = jnp.arange(lay.R) // lay.gr
    cg = (jnp.arange(lay.n) * lay.d) // lay.gc
    return rg, cg


def dequantize_codes(codebooks, codes, lay: Layout):
    """Ŵ[r, v·d:(v+1)·d] = codebooks[r // gr, (v·d) // gc, codes[r, v]]: ``codebooks[n_rg, n_cg, k, d]``,
    ``codes[R, C/d]`` -> ``Ŵ[R, C]`` (GPTQ layout)."""
    rg, cg = _group_index(lay)
    return codebooks[rg[:, None], cg[None, :], codes].reshape(lay.R, lay.C)


def _to_points(a, lay: Layout):
    """``[R, C]`` -> ``[n_rg, n_cg, gr·gc/d, d]``: the vectors of each group."""
    return (a.reshape(lay.n_rg, lay.gr, lay.n_cg, lay.gc // lay.d, lay.d).transpose(0, 2, 1, 3, 4)
            .reshape(lay.n_rg, lay.n_cg, lay.gr * lay.gc // lay.d, lay.d))


def _codes_from_points(a, lay: Layout):
    """``[n_rg, n_cg, gr·gc/d]`` -> ``[R, C/d]``."""
    return (a.reshape(lay.n_rg, lay.n_cg, lay.gr, lay.gc // lay.d).transpose(0, 2, 1, 3)
            .reshape(lay.R, lay.n))


def _f16(c):
    return c.astype(jnp.float16).astype(jnp.float32)


def _argmin_quadratic(cb, v, A, gr: int):
    """argmin_c c A cᵀ − 2 c·v_r for every row r, over the entries ``cb[r // gr]`` of its row group
    (``cb[n_rg, k, d]``, ``v[R, d]``, ``A[d, d]`` symmetric)."""
    n_rg = cb.shape[0]
    quad = jnp.einsum("gkd,de,gke->gk", cb, A, cb, precision=_HI)
    lin = jnp.einsum("gkd,grd->grk", cb, v.reshape(n_rg, gr, -1), precision=_HI)
    return jnp.argmin(quad[:, None, :] - 2.0 * lin, axis=-1).reshape(-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------------ storage

@jax.tree_util.register_pytree_with_keys_class
class CodebookWeight:
    """A codebook-quantized kernel as stored: bit-packed codes (``packed``: one ``uint8`` array of b·d-bit codes per
    row, or for b·d > 8 a low-byte array and a high-bits array) and ``codebooks[n_rg, n_cg, k, d]`` in float16.
    ``shape`` is the Flax kernel shape ``(in, out)``; ``dequantize()`` returns that kernel (jit-able)."""

    def __init__(self, packed: tuple, codebooks, shape, dim: int, index_bits: int, group_rows: int,
                 group_cols: int, dtype):
        self.packed, self.codebooks = tuple(packed), codebooks
        self.shape, self.dim, self.index_bits = tuple(shape), int(dim), int(index_bits)
        self.group_rows, self.group_cols, self.dtype = int(group_rows), int(group_cols), np.dtype(dtype)

    def tree_flatten_with_keys(self):
        K = jax.tree_util.GetAttrKey
        ch = [(K(f"packed{i}"), p) for i, p in enumerate(self.packed)] + [(K("codebooks"), self.codebooks)]
        return ch, (len(self.packed), self.shape, self.dim, self.index_bits, self.group_rows, self.group_cols,
                    self.dtype.name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        npk, shape, dim, nb, gr, gc, dt = aux
        return cls(tuple(children[:npk]), children[npk], shape, dim, nb, gr, gc, dt)

    @property
    def layout(self) -> Layout:
        n_in, n_out = self.shape
        return Layout(n_out, n_in, self.dim, self.group_rows, self.group_cols, 2 ** self.index_bits)

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes + float16 codebooks."""
        return sum(int(np.prod(l.shape)) * np.dtype(l.dtype).itemsize for l in jax.tree_util.tree_leaves(self))

    @property
    def bits_per_weight(self) -> float:
        """Measured: 8 · stored bytes / number of weights."""
        return 8.0 * self.nbytes / int(np.prod(self.shape))

    def codes(self) -> jax.Array:
        """The ``int32`` codes ``[out, in/d]``."""
        return _unpack_codes(self.packed, self.index_bits, self.shape[0] // self.dim)

    def dequantize(self, dtype=None) -> jax.Array:
        w = dequantize_codes(jnp.asarray(self.codebooks, jnp.float32), self.codes(), self.layout)
        return w.T.astype(self.dtype if dtype is None else dtype)

    def __repr__(self):
        return (f"CodebookWeight(shape={self.shape}, dim={self.dim}, index_bits={self.index_bits}, groups="
                f"{self.group_rows}x{self.group_cols}, bpw={self.bits_per_weight:.4f})")


def _pack_codes_impl(codes, index_bits: int):
    codes = jnp.asarray(codes, jnp.int32)
    if index_bits <= 8:
        return (pack_bits(codes.astype(jnp.uint8), index_bits),)
    return (pack_bits((codes & 255).astype(jnp.uint8), 8), pack_bits((codes >> 8).astype(jnp.uint8), index_bits - 8))


def _unpack_codes_impl(packed, index_bits: int, n: int):
    if index_bits <= 8:
        return unpack_bits(packed[0], index_bits, n).astype(jnp.int32)
    lo = unpack_bits(packed[0], 8, n).astype(jnp.int32)
    return lo | (unpack_bits(packed[1], index_bits - 8, n).astype(jnp.int32) << 8)


_pack_codes = jax.jit(_pack_codes_impl, static_argnums=1)
_unpack_codes = jax.jit(_unpack_codes_impl, static_argnums=(1, 2))


def pack_codebook(codes, codebooks, kernel_shape, dim: int, index_bits: int, group_rows: int, group_cols: int,
                  dtype=jnp.float32) -> CodebookWeight:
    """Pack ``codes[out, in/d]`` (values < 2^index_bits; b·d bits each, above 8 bits as a low byte + the high bits)
    with :func:`quant.packing.pack_bits` and store ``codebooks`` as float16."""
    return CodebookWeight(_pack_codes(codes, index_bits), jnp.asarray(codebooks, jnp.float16), kernel_shape, dim,
                          index_bits, group_rows, group_cols, dtype)


def codebook_tree(params, report: dict):
    """``params`` with every layer of ``report["layers"]`` replaced by its packed :class:`CodebookWeight`."""
    from jaxmodels.tree import flatten, unflatten

    flat = dict(flatten(params))
    for p, rec in report["layers"].items():
        flat[p] = rec["packed"]
    return unflatten(flat)


def materialize_codebooks(tree, dtype=None):
    """Float params from a tree with :class:`CodebookWeight` leaves (jit-able: dequantize on the fly)."""
    is_cb = lambda l: isinstance(l, CodebookWeight)
    return jax.tree_util.tree_map(lambda l: l.dequantize(dtype) if is_cb(l) else l, tree, is_leaf=is_cb)
