"""Kernel orthogonality of convolutions: the OCNN regularizer and the spectrum of the convolution operator.

Wang, Chen, Chakraborty & Yu, "Orthogonal Convolutional Neural Networks" (CVPR 2020), as the authors' code computes
it (github.com/samaonline/Orthogonal-Convolutional-Neural-Networks, ``imagenet/utils.py``: ``deconv_orth_dist``,
``orth_dist``); the stability of the term is the subject of Achour, Malgouyres & Mamalet, "Existence, Stability and
Scalability of Orthogonal Convolutional Neural Networks" (JMLR 2022).

**Kernel orthogonality.** A conv layer with kernel ``K`` (PyTorch layout ``[M, C, k, k]``: ``M`` output and ``C``
input channels; Flax's ``[k, k, C, M]`` is transposed first) is the doubly-block-Toeplitz matrix ``𝒦``; its rows are
orthonormal iff the kernel convolved with itself is the identity at the centre (Wang et al., eq. 7)::

    L_orth(K) = ‖ Conv(K, K, padding=P, stride=S) − I_r0 ‖_F²,       P = ⌊(k − 1) / S⌋ · S

``Conv(K, K)`` treats the ``M`` filters ``K[m]`` (``C x k x k`` each) as a batch of images and convolves (PyTorch's
cross-correlation, ``conv2d``) them with the same ``M`` filters: the result ``Z [M, M, r, r]`` with ``r = 2P/S + 1``
holds every inner product ``<K[m], shift_{S·u}(K[m'])>`` of a filter with a stride-``S`` shift of another; ``I_r0``
is zero except ``I_r0[m, m, c, c] = 1`` at the centre ``c = ⌊r / 2⌋``. ``padding`` overrides ``P``: the authors'
code always uses ``padding=1`` (so ``r = 3`` for ``k = 3, S = 1``: only the shifts by one pixel), and returns the
*unsquared* Frobenius norm ``‖Z − I_r0‖_F``; ``squared=False`` gives that, the default is the paper's squared norm.
The same rule on a matrix (a Dense kernel, or a 1x1 convolution as the authors use for the downsampling
shortcuts, ``orth_dist``) is ``‖WᵀW − I‖_F²`` on the Gram matrix of the smaller side.

**Conditioning.** The layer's singular values: with circular padding and stride 1 on an ``n x n`` image they are the
singular values of the ``n²`` matrices ``P(u, v) = Σ_{h,w} K[h, w] e^{-2πi(uh + vw)/n}`` (``C x M`` each; Sedghi,
Gupta & Long 2019), computed by a 2-D FFT of the zero-padded kernel; for any other padding (``"SAME"``,
``"VALID"``) or stride the explicit operator matrix (the layer applied to the ``n²C`` basis images) is built and
decomposed. :class:`ConvConditioning` reports ``σ_max``, ``σ_min``, the condition number ``σ_max / σ_min`` and the
isometry error ``sqrt(mean (σ − 1)²)`` (0 for an orthogonal layer).

API::

    loss = conv_orthogonality_loss(params["conv"]["kernel"], stride=1)      # jnp scalar, differentiable
    total = orthogonality_penalty(params, strides={r"block_3/conv1": 2})    # Σ over every conv kernel of a tree
    loss_fn = lambda p: ce(p) + 0.1 * orthogonality_penalty(p)              # any train step
    c = conv_conditioning(kernel, (8, 8))                                   # ConvConditioning of jnp scalars
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.analysis.spectral import _check_float_array
from jaxmodels.tree import flatten, select

PyTree = Any
_MAX_OPERATOR = 8192  # rows of an explicit operator matrix (n²·C) we are willing to decompose

__all__ = [
    "ConvConditioning",
    "conv_orthogonality_loss",
    "matrix_orthogonality_loss",
    "orthogonality_penalty",
    "conv_singular_values",
    "conv_conditioning",
    "default_padding",
]


class ConvConditioning(NamedTuple):
    """Singular-value summary of a convolution operator (all jnp float32 scalars)."""

    sigma_max: jax.Array
    sigma_min: jax.Array
    condition_number: jax.Array  # σ_max / σ_min (inf if σ_min == 0)
    isometry_error: jax.Array  # sqrt(mean (σ − 1)²)


def _check_conv_kernel(kernel, name="kernel"):
    _check_float_array(kernel, name, 4, 4)


def _pair(v, name) -> tuple[int, int]:
    t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(t) != 2 or any(not isinstance(i, (int, np.integer)) or int(i) < 1 for i in t):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return int(t[0]), int(t[1])


def default_padding(kernel_size: int, stride: int) -> int:
    """Wang et al.'s padding ``P = ⌊(k − 1) / S⌋ · S``: every stride-``S`` shift at which two filters overlap."""
    if kernel_size < 1 or stride < 1:
        raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size}, {stride}")
    return ((kernel_size - 1) // stride) * stride


def conv_orthogonality_loss(kernel: jax.Array, stride: int | Sequence[int] = 1,
                            padding: int | Sequence[int] | None = None, *, squared: bool = True) -> jax.Array:
    """``‖Conv(K, K, padding=P, stride=S) − I_r0‖_F²`` for a Flax conv kernel ``[kh, kw, C, M]`` (module docstring);
    ``padding=None`` is the paper's ``P = ⌊(k − 1)/S⌋·S`` per spatial axis, an int (or pair) overrides it (the
    authors' code: 1); ``squared=False`` returns the norm itself. Differentiable, jit-able, float32.

    >>> k = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 16)) / 12
    >>> conv_orthogonality_loss(k, stride=1)            # 0 iff the layer's rows are orthonormal
    """
    _check_conv_kernel(kernel)
    kh, kw, _, _ = kernel.shape
    sh, sw = _pair(stride, "stride")
    if padding is None:
        ph, pw = default_padding(kh, sh), default_padding(kw, sw)
    else:
        p = (padding, padding) if isinstance(padding, (int, np.integer)) else tuple(padding)
        if len(p) != 2 or any(not isinstance(i, (int, np.integer)) or int(i) < 0 for i in p):
            raise ValueError(f"padding must be a non-negative int or a pair of them, got {padding!r}")
        ph, pw = int(p[0]), int(p[1])
    return _conv_orth(kernel, (sh, sw), (ph, pw), bool(squared))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _conv_orth(kernel, stride, padding, squared):
    (sh, sw), (ph, pw) = stride, padding
    k = jnp.transpose(kernel.astype(jnp.float32), (3, 2, 0, 1))  # [M, C, kh, kw]: PyTorch's OIHW
    z = jax.lax.conv_general_dilated(k, k, (sh, sw), [(ph, ph), (pw, pw)], dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                     precision=jax.lax.Precision.HIGHEST)  # [M, M, rh, rw]
    m, rh, rw = z.shape[0], z.shape[2], z.shape[3]
    target = jnp.zeros_like(z).at[:, :, rh // 2, rw // 2].set(jnp.eye(m, dtype=z.dtype))
    sq = jnp.sum((z - target) ** 2)
    return sq if squared else jnp.sqrt(sq)


def matrix_orthogonality_loss(kernel: jax.Array, *, squared: bool = True) -> jax.Array:
    """``‖WᵀW − I‖_F²`` on the Gram matrix of the smaller side of ``W = kernel.reshape(-1, out)`` (a Dense kernel
    ``[in, out]`` or a conv kernel, e.g. a 1x1 shortcut; the authors' ``orth_dist``, whose tie ``in == out`` takes
    ``W Wᵀ``); ``squared=False`` returns the norm.

    >>> matrix_orthogonality_loss(jnp.eye(4))           # 0.0
    """
    _check_float_array(kernel, "kernel", 2)
    return _matrix_orth(kernel, bool(squared))


@functools.partial(jax.jit, static_argnums=(1,))
def _matrix_orth(kernel, squared):
    w = kernel.astype(jnp.float32).reshape(-1, kernel.shape[-1])  # [d_in, out]; PyTorch's weight is wᵀ
    hi = jax.lax.Precision.HIGHEST
    g = jnp.dot(w.T, w, precision=hi) if w.shape[1] < w.shape[0] else jnp.dot(w, w.T, precision=hi)
    sq = jnp.sum((g - jnp.eye(g.shape[0], dtype=g.dtype)) ** 2)
    return sq if squared else jnp.sqrt(sq)


def _stride_for(path: str, strides) -> int:
    if strides is None:
        return 1
    if isinstance(strides, (int, np.integer)):
        return int(strides)
    for pat, s in strides.items():
        if re.search(pat, path):
            return int(s)
    return 1


def orthogonality_penalty(params: PyTree, *, include: str | Sequence[str] | None = None,
                          exclude: str | Sequence[str] | None = None,
                          strides: int | Mapping[str, int] | None = None, padding: int | None = None,
                          dense: bool = False, squared: bool = True) -> jax.Array:
    """Σ of the orthogonality losses over a params tree: :func:`conv_orthogonality_loss` for every 4-D ``kernel``
    leaf with a spatial extent > 1 (stride from ``strides``: an int for all, or ``{regex: stride}``, first match,
    default 1), :func:`matrix_orthogonality_loss` for 1x1 kernels and, with ``dense=True``, 2-D kernels.
    ``include`` / ``exclude`` are path regexes (``re.search``). A plain differentiable function: add
    ``λ · orthogonality_penalty(params)`` to any loss (the paper's λ: 0.01 – 0.1 on CIFAR / ImageNet).

    >>> loss = ce + 0.1 * orthogonality_penalty(params, strides={r"block_3/conv1": 2})
    """
    if strides is not None and not isinstance(strides, (int, np.integer, Mapping)):
        raise ValueError(f"strides must be an int or a {{regex: int}} mapping, got {type(strides).__name__}")
    if isinstance(strides, Mapping) and any(int(s) < 1 for s in strides.values()):
        raise ValueError(f"strides must be >= 1, got {dict(strides)}")
    if isinstance(strides, (int, np.integer)) and int(strides) < 1:
        raise ValueError(f"strides must be >= 1, got {strides}")
    chosen = flatten(select(params, include, exclude))
    total, seen = jnp.zeros((), jnp.float32), 0
    for path, leaf in flatten(params).items():
        if not chosen[path] or path.split("/")[-1] != "kernel" or not hasattr(leaf, "ndim"):
            continue
        if leaf.ndim == 4 and leaf.shape[0] * leaf.shape[1] > 1:
            total = total + conv_orthogonality_loss(leaf, _stride_for(path, strides), padding, squared=squared)
        elif leaf.ndim == 4 or (dense and leaf.ndim == 2):
            total = total + matrix_orthogonality_loss(leaf, squared=squared)
        else:
            continue
        seen += 1
    if seen == 0:
        raise ValueError("orthogonality_penalty: no kernel leaf matched (4-D conv kernels, or 2-D with dense=True)")
    return total


def _conv_apply(kernel, x, stride, padding):
    """Cross-correlation of NHWC ``x`` with a Flax kernel; ``padding`` "circular" / "SAME" / "VALID"."""
    if padding == "circular":
        kh, kw = kernel.shape[:2]
        x = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)), mode="wrap")
        padding = "VALID"
    return jax.lax.conv_general_dilated(x, kernel, stride, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def conv_singular_values(kernel: jax.Array, input_shape: Sequence[int], stride: int | Sequence[int] = 1,
                         padding: str = "circular") -> jax.Array:
    """All singular values (descending) of the linear map ``x [H, W, C] -> conv(x, kernel) [H', W', M]`` of a
    Flax kernel ``[kh, kw, C, M]`` on ``input_shape = (H, W)``. Circular padding with stride 1: the FFT rule
    (``H·W·min(C, M)`` values); otherwise (``"SAME"``, ``"VALID"``, or a stride) the SVD of the explicit operator
    (at most 8192 input dimensions ``H·W·C``).

    >>> s = conv_singular_values(kernel, (8, 8))      # circular, exact
    """
    _check_conv_kernel(kernel)
    h, w = _pair(tuple(input_shape), "input_shape")
    stride = _pair(stride, "stride")
    if padding not in ("circular", "SAME", "VALID"):
        raise ValueError(f"padding must be 'circular', 'SAME' or 'VALID', got {padding!r}")
    kh, kw, c, m = kernel.shape
    if padding == "circular" and (kh > h or kw > w):
        raise ValueError(f"kernel {kh}x{kw} larger than the {h}x{w} input of a circular convolution")
    if padding == "VALID" and (kh > h or kw > w):
        raise ValueError(f"kernel {kh}x{kw} larger than the {h}x{w} input of a VALID convolution")
    n_in = h * w * c
    if not (padding == "circular" and stride == (1, 1)) and n_in > _MAX_OPERATOR:
        raise ValueError(f"explicit operator of {n_in} input dimensions exceeds {_MAX_OPERATOR}; use circular "
                         "padding with stride 1 (FFT) or a smaller input_shape")
    return _singular_values(kernel, (h, w), stride, padding)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _singular_values(kernel, input_shape, stride, padding):
    (h, w), (_, _, c, m) = input_shape, kernel.shape
    k = kernel.astype(jnp.float32)
    if padding == "circular" and stride == (1, 1):
        # circular correlation: y[p] = Σ_d K[d + off] x[p + d]; its transfer matrices are P(ω) up to a phase
        tr = jnp.fft.fft2(k, s=(h, w), axes=(0, 1))  # [h, w, C, M] complex
        s = jnp.linalg.svd(tr.reshape(h * w, c, m), compute_uv=False).reshape(-1)
        return jnp.sort(s)[::-1]
    n_in = h * w * c
    basis = jnp.eye(n_in, dtype=jnp.float32).reshape(n_in, h, w, c)
    op = _conv_apply(k, basis, stride, padding).reshape(n_in, -1)  # row i = image of basis vector i
    return jnp.linalg.svd(op, compute_uv=False)


def conv_conditioning(kernel: jax.Array, input_shape: Sequence[int], stride: int | Sequence[int] = 1,
                      padding: str = "circular") -> ConvConditioning:
    """:class:`ConvConditioning` of :func:`conv_singular_values` (same arguments); the ``min(rows, cols)`` singular
    values of the operator are used, so zero singular values of a rank-deficient layer count.

    >>> conv_conditioning(kernel, (8, 8)).condition_number
    """
    return _conditioning(conv_singular_values(kernel, input_shape, stride, padding))


@jax.jit
def _conditioning(s):
    smax, smin = s[0], s[-1]
    cond = jnp.where(smin > 0, smax / jnp.where(smin > 0, smin, 1.0), jnp.inf)
    return ConvConditioning(smax, smin, cond, jnp.sqrt(jnp.mean((s - 1.0) ** 2)))
