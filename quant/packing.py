"""Bit packing of unsigned integer codes, ``b`` bits per code for any ``b`` in 1..8.

Codes are packed along the last axis, LSB first: code ``i`` of a row occupies bits ``[i b, (i + 1) b)`` of the row's
little-endian byte string, so for ``b = 4`` code ``2k`` is the low nibble and code ``2k+1`` the high nibble of byte
``k`` ("two int4 per byte"). Rows are padded with zero codes to a multiple of 8 codes, i.e. a row of ``n`` codes takes
``ceil(n / 8) * b`` bytes (8-bit codes are stored as they are). Leading axes are untouched, so a tensor sharded on a leading axis stays sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["pack_bits", "unpack_bits", "packed_last_dim"]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")


def packed_last_dim(n: int, bits: int) -> int:
    """Bytes used by a row of ``n`` codes (``n`` for 8-bit codes, which need no padding)."""
    _check_bits(bits)
    if bits == 8:
        return n
    return -(-n // 8) * bits


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """Pack ``uint8`` codes (values ``< 2**bits``; higher bits are masked off) into ``uint8`` bytes."""
    _check_bits(bits)
    codes = jnp.asarray(codes)
    if codes.ndim == 0:
        codes = codes[None]
    if bits == 8:
        return codes.astype(jnp.uint8)
    lead, n = codes.shape[:-1], codes.shape[-1]
    n_pad = -(-n // 8) * 8
    c = codes.astype(jnp.uint32) & (2 ** bits - 1)
    if n_pad != n:
        c = jnp.pad(c, [(0, 0)] * len(lead) + [(0, n_pad - n)])
    if bits in (1, 2, 4):  # whole codes per byte: shift-or 8 // bits codes into each byte
        per = 8 // bits
        c = c.reshape(lead + (n_pad // per, per))
        shifts = jnp.arange(per, dtype=jnp.uint32) * bits
        return jnp.sum(c << shifts, axis=-1).astype(jnp.uint8)
    # General b: 8 codes = b bytes = 8b bits. Spread each code into its b bits, then regroup bits into bytes.
    c = c.reshape(lead + (n_pad // 8, 8))
    bit_idx = jnp.arange(bits, dtype=jnp.uint32)
    bitplanes = (c[..., None] >> bit_idx) & 1  # [..., blocks, 8 codes, b bits] -> stream order code-major
    stream = bitplanes.reshape(lead + (n_pad // 8, bits, 8))  # 8b bits as b bytes of 8 bits (LSB first)
    weights = jnp.arange(8, dtype=jnp.uint32)
    packed = jnp.sum(stream << weights, axis=-1)
    return packed.reshape(lead + (n_pad // 8 * bits,)).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack_bits`: ``uint8`` codes with last dim ``n``."""
    _check_bits(bits)
    packed = jnp.asarray(packed)
    if bits == 8:
        return packed[..., :n].astype(jnp.uint8)
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    if nbytes != packed_last_dim(n, bits):
        raise ValueError(f"packed last dim {nbytes} does not hold {n} codes of {bits} bits")
    p = packed.astype(jnp.uint32)
    if bits in (1, 2, 4):
        per = 8 // bits
        shifts = jnp.arange(per, dtype=jnp.uint32) * bits
        c = (p[..., None] >> shifts) & (2 ** bits - 1)
        return c.reshape(lead + (nbytes * per,))[..., :n].astype(jnp.uint8)
    blocks = nbytes // bits
    bytes_ = p.reshape(lead + (blocks, bits, 1))
    stream = (bytes_ >> jnp.arange(8, dtype=jnp.uint32)) & 1  # [..., blocks, b bytes, 8 bits]
    bitplanes = stream.reshape(lead + (blocks, 8, bits))
    c = jnp.sum(bitplanes << jnp.arange(bits, dtype=jnp.uint32), axis=-1)
    return c.reshape(lead + (blocks * 8,))[..., :n].astype(jnp.uint8)
