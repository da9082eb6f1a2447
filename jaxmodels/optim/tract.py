"""TrAct: train the first layer's pre-activations instead of its weights.

Petersen, Borgelt, Ermon, "TrAct: Making First-layer Pre-Activations Trainable" (NeurIPS 2024). For the first
Dense / Conv layer z = A W (A: the n input rows — batch x positions, each a flattened input patch of size d;
W: the kernel as [d, out], the Flax layout), TrAct takes the step that moves the *activations* z along -∂L/∂z as
closely as possible (least squares with ridge λ), which in closed form replaces the weight gradient G = Aᵀ ∂L/∂z by

    G_TrAct = (Aᵀ A / n + λ I_d)^{-1} G                                   (paper Eq. 8, λ = 0.1 by default)

(the reference code's ``grad_W @ inverse(aᵀa/n + λI)`` in PyTorch's [out, d] layout). The transform is applied to the
leaf selected by ``path`` (the first layer's kernel) and needs the layer's input as the ``tract_inputs`` extra
argument: ``tx.update(grads, state, params, tract_inputs=x)``. For a Conv kernel ``[kh, kw, in, out]`` the input is an
NHWC image and the rows of A are its ``kh x kw`` patches (``strides``/``padding`` as in the layer). Everything else
passes through, so chain it *before* the optimizer: ``optax.chain(scale_by_tract(...), optax.adam(...))``.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from jaxmodels.optim._common import check_range
from jaxmodels.tree import map_with_path

__all__ = ["tract_patches", "tract_precondition", "scale_by_tract"]


def tract_patches(x: jax.Array, kernel_shape: Sequence[int], strides: Sequence[int] = (1, 1),
                  padding: str = "VALID") -> jax.Array:
    """Rows of A for a kernel of shape ``[d]``+``[out]`` (Dense: ``x [..., d]`` -> ``[n, d]``) or ``[kh, kw, c, out]``
    (Conv: NHWC ``x`` -> ``[B·H'·W', kh·kw·c]``, ordered like ``kernel.reshape(-1, out)``)."""
    if len(kernel_shape) == 2:
        if x.shape[-1] != kernel_shape[0]:
            raise ValueError(f"tract: input feature size {x.shape[-1]} != kernel input size {kernel_shape[0]}")
        return x.reshape(-1, x.shape[-1])
    if len(kernel_shape) != 4 or x.ndim != 4:
        raise ValueError(f"tract: need a Dense [d, out] or Conv [kh, kw, c, out] kernel with NHWC input, got kernel "
                         f"{tuple(kernel_shape)} and input {x.shape}")
    kh, kw, c, _ = kernel_shape
    if x.shape[-1] != c:
        raise ValueError(f"tract: input channels {x.shape[-1]} != kernel input channels {c}")
    sh, sw = strides
    if padding == "SAME":
        pads = []
        for size, k, s in ((x.shape[1], kh, sh), (x.shape[2], kw, sw)):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    elif padding != "VALID":
        raise ValueError(f"tract: padding must be 'VALID' or 'SAME', got {padding!r}")
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    cols = [x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :] for i in range(kh) for j in range(kw)]
    patches = jnp.stack(cols, axis=3)  # [B, ho, wo, kh*kw, c]
    return patches.reshape(-1, kh * kw * c)


def tract_precondition(grad: jax.Array, inputs: jax.Array, lam: float = 0.1, strides=(1, 1),
                       padding: str = "VALID") -> jax.Array:
    """``(AᵀA/n + λI)^{-1} G`` for one kernel gradient ``G`` (float32, Cholesky solve)."""
    a = tract_patches(inputs, grad.shape, strides, padding).astype(jnp.float32)
    d = a.shape[1]
    m = a.T @ a / a.shape[0] + lam * jnp.eye(d, dtype=jnp.float32)
    g = grad.reshape(d, -1).astype(jnp.float32)
    cho = jax.scipy.linalg.cho_factor(m)
    return jax.scipy.linalg.cho_solve(cho, g).reshape(grad.shape).astype(grad.dtype)


def scale_by_tract(path: str = r"^(params/)?(Dense|Conv)_0/kernel$", lam: float = 0.1, strides=(1, 1),
                   padding: str = "VALID") -> optax.GradientTransformationExtraArgs:
    """Replace the gradient of the leaf(s) matching ``path`` by the TrAct direction (module docstring);
    ``update(..., tract_inputs=x)`` is required."""
    check_range("lam", lam, 0.0, lo_open=True)
    pattern = re.compile(path)

    def update_fn(updates, state, params=None, tract_inputs=None, **extra):
        del params, extra
        if tract_inputs is None:
            raise ValueError("scale_by_tract: pass the first layer's input as update(..., tract_inputs=x)")
        hits = []

        def one(p, g):
            if pattern.search(p):
                hits.append(p)
                return tract_precondition(g, tract_inputs, lam, strides, padding)
            return g

        out = map_with_path(one, updates)
        if not hits:
            raise ValueError(f"scale_by_tract: no leaf matches {path!r}")
        return out, state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)
