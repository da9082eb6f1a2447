"""Dense and Conv layers whose kernel passes through a parameter transform before use (weight reparameterization).

``y = x W' + b`` (Dense) or ``y = conv(x, W') + b`` (Conv) with ``W' = transform(W)`` where ``W`` is the stored
parameter ``kernel``. ``transform`` is either a plain function ``kernel -> kernel`` (e.g.
:func:`jaxmodels.layers.weight_standardize`) or a linen module called on the kernel, whose own parameters (learnable
hyper-parameters of the transform, e.g. the gain of :class:`jaxmodels.layers.ScaledWS`) live under ``transform``.
Weight Compander (Cakaj et al., 2023), the transform this hook was made for, is not built: its reparameterization
function is not in the abstract, and its text could not be sourced here. Flax layouts: Dense ``[in, out]``, Conv ``[*kernel_size, in, out]``, NHWC inputs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.tree import select

PyTree = Any

__all__ = ["ReparamDense", "ReparamConv", "transformed_kernel", "reparameterize_tree"]


def reparameterize_tree(params: PyTree, transform: Callable, include: str | Sequence[str] = r"kernel$",
                        exclude: str | Sequence[str] | None = None, min_ndim: int = 2) -> PyTree:
    """Apply a parameter transform to every leaf of ANY pytree whose path matches ``include`` (and not
    ``exclude``) and has at least ``min_ndim`` axes, e.g. ``reparameterize_tree(params, weight_standardize)`` gives
    the kernels a weight-standardized model actually uses (to export or fold a trained reparameterized model into
    plain Dense/Conv layers). Other leaves are returned as they are; the input is not modified."""
    if not callable(transform):
        raise TypeError(f"transform must be callable, got {type(transform).__name__}")
    mask = select(params, include=include, exclude=exclude)
    return jax.tree.map(lambda m, x: transform(x) if m and jnp.ndim(x) >= min_ndim else x, mask, params)


def transformed_kernel(module: nn.Module, shape, transform, kernel_init) -> jax.Array:
    """Declare ``module``'s float32 ``"kernel"`` parameter of ``shape`` (initialised by ``kernel_init``) and return
    ``transform(kernel)`` (the kernel itself when ``transform`` is None): the weight the layer uses,
    ``W = transform(V)``. ``TypeError`` if ``transform`` is not callable, ``ValueError`` if it changes the shape.
    Call it from inside a compact ``__call__``."""
    kernel = module.param("kernel", kernel_init, shape, jnp.float32)
    if transform is None:
        return kernel
    if not callable(transform):
        raise TypeError(f"transform must be callable, got {type(transform).__name__}")
    out = transform(kernel)
    if out.shape != kernel.shape:
        raise ValueError(f"transform changed the kernel shape {kernel.shape} -> {out.shape}")
    return out


class ReparamDense(nn.Module):
    """``y = x transform(W) + b``."""

    features: int
    transform: Callable | None = None
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        w = transformed_kernel(self, (x.shape[-1], self.features), self.transform, self.kernel_init)
        y = jnp.dot(x, w.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(x.dtype)
        return y


class ReparamConv(nn.Module):
    """``y = conv(x, transform(W)) + b`` for channels-last inputs with 1 to 3 spatial axes; ``padding`` is
    ``"SAME"``, ``"VALID"`` or explicit ``[(lo, hi), ...]``."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] | None = None
    padding: str | Sequence[tuple[int, int]] = "SAME"
    transform: Callable | None = None
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        nd = len(self.kernel_size)
        if not 1 <= nd <= 3:
            raise ValueError(f"ReparamConv supports 1 to 3 spatial axes, got kernel_size={self.kernel_size}")
        if x.ndim != nd + 2:
            raise ValueError(f"expected [B, {nd} spatial axes, C] input, got {x.shape}")
        w = transformed_kernel(self, (*self.kernel_size, x.shape[-1], self.features), self.transform,
                               self.kernel_init)
        spatial = "DHW"[3 - nd:]
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
        y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), tuple(self.strides or (1,) * nd), self.padding,
                                         dimension_numbers=dn)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(x.dtype)
        return y
