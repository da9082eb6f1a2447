"""Gaussian weight sampling (GaussWS): pseudo-quantization noise from a rounded normal, applied by an addition and
a floating-point cast.

Ahn & Yoo, "Gaussian Weight Sampling for Scalable, Efficient and Stable Pseudo-Quantization Training",
arXiv 2505.11170 (2025); revised by the same authors as "Differentiable, Stable and Efficient Floating-Point
Quantization" (ICLR 2026 submission, openreview.net/forum?id=K05emrAWGe, withdrawn). Pseudo-quantization training
(PQT) replaces the rounding of quantization-aware training by random noise of the size of the quantization error, so
the forward pass stays differentiable without a straight-through estimator (as in DiffQ, ``W + U(-1/2, 1/2) Delta``)::

    R ~ round(N(0, 1) / 2)                      (the revision's abstract: "R ~= round(N(0,1)/2)")
    W_hat = cast_fp(W + R * Delta)              (an addition, then a cast to the operator format, e.g. BF16)

``R`` takes integer values: ``P(R = k) = Phi(2k + 1) - Phi(2k - 1)``, so ``P(R = 0) = erf(1/sqrt 2) ~= 0.683`` (about
two weights in three are left unperturbed at each step), ``P(|R| = 1) ~= 0.315``,
``P(|R| = 2) ~= 0.0027``; ``E[R] = 0`` and ``Var(R) = sum_k k^2 P(R = k) ~= 0.3254`` (:data:`R_VARIANCE`).
``Delta`` is one step per block, proportional to the block's absolute maximum (reviewers of the revision: "per-block
noise scaled by the block max"; :func:`block_absmax` computes it over micro-scaling blocks).

What is NOT taken from the paper: the exact map from bit width and block maximum to ``Delta`` was not available to us
(only the abstracts and the reviews of the revision were), so :func:`gaussws_fake_quant` takes ``Delta`` from the
caller, e.g. ``block_absmax(w, 32) * 2.0 ** (1 - bits)`` for the step of a symmetric ``bits``-bit grid. The random
numbers come from ``jax.random.normal`` (the revision generates ``R`` with bit operations instead, per its reviews).
Nor is the paper's "stochastic precision annealing" schedule implemented here (its definition was not available).

Gradient: ``d W_hat / d W = 1`` (the cast passes gradients through unchanged) plus, when ``Delta`` is computed from
``W``, the term through ``Delta`` (``R dDelta/dW``), as in DiffQ; wrap ``Delta`` in ``jax.lax.stop_gradient`` to drop
it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rounded_normal", "rounded_normal_pmf", "R_VARIANCE", "block_absmax", "gaussws_fake_quant"]


def rounded_normal_pmf(k) -> np.ndarray:
    """``P(R = k) = Phi(2k + 1) - Phi(2k - 1)`` for ``R = round(N(0, 1) / 2)`` (NumPy, float64)."""
    k = np.asarray(k, np.float64)
    erf = np.vectorize(math.erf)
    return 0.5 * (erf((2 * k + 1) / math.sqrt(2)) - erf((2 * k - 1) / math.sqrt(2)))


#: ``Var(R) = E[R^2]`` of ``R = round(N(0, 1) / 2)`` (terms beyond ``|k| = 6`` are below 1e-40).
R_VARIANCE: float = float(np.sum(np.arange(-6, 7) ** 2 * rounded_normal_pmf(np.arange(-6, 7))))


def rounded_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Integer-valued noise ``R = round(N(0, 1) / 2)`` of the given shape (float ``dtype``)."""
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
    return jnp.round(jax.random.normal(key, tuple(shape), jnp.float32) * 0.5).astype(dtype)


def block_absmax(w: jax.Array, block_size: int = 32, axis: int = -2) -> jax.Array:
    """``max |w|`` over consecutive blocks of ``block_size`` elements along ``axis`` (the reduction axis: ``-2`` for
    ``[in, out]`` Dense kernels; 32 is the micro-scaling block), broadcast back to ``w.shape``. 1-D inputs use
    ``axis=0``."""
    w = jnp.asarray(w)
    if w.ndim == 0:
        raise ValueError("block_absmax needs at least one axis")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    ax = 0 if w.ndim == 1 else axis % w.ndim
    n = w.shape[ax]
    if n % block_size:
        raise ValueError(f"axis {ax} has {n} elements, not a multiple of block_size={block_size}")
    a = jnp.moveaxis(jnp.abs(w), ax, -1)
    m = a.reshape(*a.shape[:-1], n // block_size, block_size).max(-1, keepdims=True)
    m = jnp.broadcast_to(m, (*a.shape[:-1], n // block_size, block_size)).reshape(a.shape)
    return jnp.moveaxis(m, -1, ax)


def gaussws_fake_quant(w: jax.Array, key: jax.Array, step, dtype=jnp.bfloat16) -> jax.Array:
    """GaussWS fake quantization ``cast_dtype(w + R * step)`` with ``R = round(N(0, 1) / 2)`` drawn fresh from
    ``key`` (one draw per element of ``w``).

    ``step`` (``Delta``) is a scalar or an array broadcastable to ``w.shape`` (e.g. :func:`block_absmax` times a
    per-bit-width factor of your choice; see the module docstring for what the paper leaves unstated). The addition is
    done in at least float32, then the sum is cast to ``dtype`` (BF16 by default, the paper's operator format).
    """
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be floating point, got {w.dtype}")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
    step = jnp.asarray(step)
    try:
        out_shape = jnp.broadcast_shapes(step.shape, w.shape)
    except ValueError as e:
        raise ValueError(f"step of shape {step.shape} does not broadcast to w's shape {w.shape}") from e
    if out_shape != w.shape:
        raise ValueError(f"step of shape {step.shape} would broadcast w {w.shape} to {out_shape}")
    acc = jnp.promote_types(w.dtype, jnp.float32)
    r = rounded_normal(key, w.shape, acc)
    return (w.astype(acc) + r * step.astype(acc)).astype(dtype)
