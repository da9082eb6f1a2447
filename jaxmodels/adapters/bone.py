"""Bone: Block Affine adaptation, the frozen weight guiding a zero-initialised block matrix.

Kang & Yin, "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large Language
Models" (arXiv 2409.15371; later versions renamed the method DiSHA, then MiSS). The "weight guide" structure (the
paper's Bone/Bat block-affine form, PEFT's ``MissConfig(init_weights="bat")``): split the weight
``W ∈ R^{d_out × d_in}`` (PyTorch orientation) into ``b × b`` blocks ``W_ij`` (``i`` over ``d_out / b`` output
blocks, ``j`` over ``d_in / b`` input blocks); one trainable ``B_i ∈ R^{b × b}`` per output block, zero at init::

    ΔW_ij = W_ij · B_i + B_i,        W' = W + ΔW                                   (merge)
    W_ij  = (W'_ij − B_i) · (I + B_i)⁻¹                                             (unmerge)

so the update is guided by ``W``'s own blocks and needs no SVD or special initialisation (``B = 0`` gives
``W' = W``). Trainable parameters per layer: ``d_out · b`` (a LoRA of rank ``r`` has ``r·(d_in + d_out)``).

In flax layout (``kernel = Wᵀ``, shape ``[d_in, d_out]``; a Conv kernel is viewed as ``[kh·kw·c_in, c_out]``)
the same update is ``ΔK[j·b+s, i·b+q] = Σ_p K[j·b+p, i·b+q] · B_i[p, s] + B_i[q, s]``. The adapter tree stores
``B`` as PEFT does, ``[d_out / b, b, b]`` per adapted kernel (PEFT's ``miss_block``), keyed by the kernel path.

API::

    adapters = bone_init(params, BoneConfig(block_size=8, include=r"Dense_[01]/kernel$"))   # {path: zeros}
    params_eff = bone_merge(params, adapters)     # W + ΔW for every adapted kernel (forward = apply(params_eff))
    params = bone_unmerge(params_eff, adapters)   # exact inverse (up to float rounding of the b×b solve)
    loss = lambda adapters: loss_fn(bone_merge(params, adapters))   # optax sees only ``adapters``
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxmodels.adapters._papers import as_matrix, check_finite, check_positive_int, kernel_paths
from jaxmodels.tree import flatten, unflatten

PyTree = Any

__all__ = ["BoneConfig", "bone_init", "bone_delta", "bone_merge", "bone_unmerge", "bone_num_params"]


@dataclasses.dataclass(frozen=True)
class BoneConfig:
    """``block_size`` is the paper's ``b`` (PEFT's ``r``); ``include`` / ``exclude`` are path regexes over the
    params (as :func:`jaxmodels.select`)."""

    block_size: int = 8
    include: str | None = r"kernel$"
    exclude: str | None = None

    def __post_init__(self):
        check_positive_int(self.block_size, "block_size", "bone")


def _blocks(shape, b: int, path: str):
    d_in, d_out = math.prod(shape[:-1]), shape[-1]
    if d_in % b or d_out % b:
        raise ValueError(f"bone: kernel {path!r} of shape {tuple(shape)} (as [{d_in}, {d_out}]) is not divisible "
                         f"into [{b}, {b}] blocks")
    return d_in, d_out


def bone_init(params: PyTree, config: BoneConfig, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Zero ``B`` blocks ``[d_out / b, b, b]`` for every kernel selected by ``config`` (flat ``{path: B}``)."""
    b = config.block_size
    flat = flatten(params)
    out = {}
    for p in kernel_paths(params, config.include, config.exclude, "bone"):
        _, d_out = _blocks(flat[p].shape, b, p)
        out[p] = jnp.zeros((d_out // b, b, b), dtype)
    return out


def bone_delta(kernel: jax.Array, block: jax.Array) -> jax.Array:
    """``ΔK`` (kernel layout, ``kernel``'s shape) of ``ΔW_ij = W_ij B_i + B_i``, computed in float32."""
    nb, b, b2 = block.shape
    K = as_matrix(kernel).astype(jnp.float32)
    d_in, d_out = K.shape
    if b != b2 or d_in % b or d_out != nb * b:
        raise ValueError(f"bone: block {tuple(block.shape)} does not fit kernel {tuple(kernel.shape)}")
    B = block.astype(jnp.float32)
    K4 = K.reshape(d_in // b, b, nb, b)  # [j, p, i, q] = W[i·b+q, j·b+p]
    guided = jnp.einsum("jpiq,ips->jsiq", K4, B)  # (W_ij B_i)[q, s] placed at ΔK[j·b+s, i·b+q]
    shift = jnp.transpose(B, (2, 0, 1))[None]  # B_i[q, s] at [j, s, i, q]
    return (guided + shift).reshape(kernel.shape)


def _check(params, adapters, method):
    flat = flatten(params)
    for p, blk in adapters.items():
        if p not in flat:
            raise ValueError(f"{method}: adapter path {p!r} is not a leaf of params")
        _blocks(flat[p].shape, blk.shape[-1], p)
        if blk.ndim != 3 or blk.shape[1] != blk.shape[2] or blk.shape[0] * blk.shape[1] != flat[p].shape[-1]:
            raise ValueError(f"{method}: block at {p!r} has shape {tuple(blk.shape)}, expected "
                             f"[{flat[p].shape[-1]} / b, b, b] for kernel {tuple(flat[p].shape)}")
    check_finite(params, "params", method)
    check_finite(adapters, "adapters", method)
    return flat


def bone_merge(params: PyTree, adapters: dict[str, jax.Array]) -> PyTree:
    """``W' = W + ΔW`` for every adapted kernel (dtype kept); other leaves unchanged. Inputs are not modified."""
    flat = dict(_check(params, adapters, "bone_merge"))
    for p, blk in adapters.items():
        k = flat[p]
        flat[p] = (k.astype(jnp.float32) + bone_delta(k, blk)).astype(k.dtype)
    return unflatten(flat, like=params)


def bone_unmerge(params: PyTree, adapters: dict[str, jax.Array]) -> PyTree:
    """Invert :func:`bone_merge`: ``W_ij = (W'_ij − B_i)(I + B_i)⁻¹`` (a ``b × b`` solve per output block;
    ``I + B_i`` must be invertible)."""
    flat = dict(_check(params, adapters, "bone_unmerge"))
    for p, blk in adapters.items():
        k = flat[p]
        nb, b, _ = blk.shape
        K = as_matrix(k).astype(jnp.float32)
        d_in = K.shape[0]
        B = blk.astype(jnp.float32)
        # W'_ij[q, :] − B_i[q, :] = W_ij[q, :] (I + B_i)  ->  row vectors: solve (I + B_i)ᵀ x = (W'_ij − B_i)[q]ᵀ
        Wp = jnp.transpose(K.reshape(d_in // b, b, nb, b), (2, 3, 0, 1))  # [i, q, j, p] = W'_ij[q, p]
        rhs = Wp - B[:, :, None, :]  # (W'_ij − B_i)[q, p]
        M = jnp.eye(b, dtype=jnp.float32)[None] + B  # [i, p, s]
        # W_ij = rhs_ij M_i⁻¹  <=>  M_iᵀ W_ijᵀ = rhs_ijᵀ
        rhs_t = jnp.transpose(rhs, (0, 3, 1, 2)).reshape(nb, b, -1)  # [i, p, (q, j)]
        sol = jnp.linalg.solve(jnp.transpose(M, (0, 2, 1)), rhs_t)  # [i, s, (q, j)] = W_ij[q, s]
        W = jnp.transpose(sol.reshape(nb, b, b, d_in // b), (3, 1, 0, 2))  # [j, s, i, q] as K4
        flat[p] = W.reshape(k.shape).astype(k.dtype)
    return unflatten(flat, like=params)


def bone_num_params(adapters: dict[str, jax.Array]) -> int:
    """Trainable parameters: ``Σ d_out · b`` over the adapted kernels."""
    return int(sum(x.size for x in adapters.values()))
