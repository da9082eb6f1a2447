"""NormGrad saliency: where in the image the gradient of a layer's weights comes from.

Rebuffi, Fong, Ji & Vedaldi, "There and Back Again: Revisiting Backpropagation Saliency Methods" (CVPR 2020), with
the rules of the authors' implementation in TorchRay (github.com/ruthcfong/TorchRay,
``torchray/attribution/norm_grad.py``, ``common.py``, ``weighted_saliency.py``).

For a conv layer ``y = conv(x; W)`` the weight gradient is a sum over output locations ``u`` of outer products,
``∂ℓ/∂W = Σ_u g_u ⊗ x̃_u`` (``g_u = ∂ℓ/∂y_u`` ``[M]``, ``x̃_u`` the input patch at ``u`` ``[kh·kw·C]``), and NormGrad
keeps the Frobenius norm of each location's contribution::

    variant="conv"      s_u = ‖g_u‖₂ · ‖x̃_u‖₂                 (TorchRay's norm_grad_proper: unfolded input patches)
    variant="identity"  s_u = ‖g_u‖₂ · ‖y_u‖₂                 (the "virtual identity" 1x1 layer after the layer:
                                                                 its input is y itself, norms over channels)
    variant="selective" s_u = ‖ max(y_u ⊙ g_u, 0) ‖₂          (norm_grad_selective)

``ℓ`` is the logit of the explained class (TorchRay's one-hot backward gradient on the model output), by default
the predicted class. The gradient of ``Σ_b logit_b[target_b]`` is taken for the whole batch at once, so the model
must treat examples independently (eval-mode BatchNorm, no batch statistics). Maps are ``[B, H', W']`` at the
layer's resolution; ``output_size`` (or ``True``: the input's ``H, W``) resizes them bilinearly (half-pixel centres,
PyTorch's ``align_corners=False``). :func:`normgrad_combined` combines layers as TorchRay's ``weighted_saliency``:
each resized map min-max normalised (here per example; TorchRay normalises over its batch of one), weights
normalised to sum 1, then a weighted sum (``"sum"``) or a weighted geometric mean (``"product"``; TorchRay's
product accumulator starts at 0, a bug, and is started at 1 here).

The layer is named by its module path (``"block_1/conv2"``, what :func:`jaxmodels.capture.module_path` prints); it
must be called exactly once per forward pass and return NHWC activations. Activations are tapped with a Flax method
interceptor, so no model code changes.

API::

    apply_fn = lambda p, x: model.apply({"params": p, "batch_stats": bs}, x)
    s = normgrad_saliency(apply_fn, params, x, "block_1/conv2")                      # [B, H', W']
    s = normgrad_saliency(apply_fn, params, x, "stem_conv", variant="conv", output_size=True)
    s = normgrad_combined(apply_fn, params, x, {"stem_conv": 0.5, "block_2/conv2": 0.5})
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.analysis.spectral import _check_float_array
from jaxmodels.capture import layer_input_matrix, module_path
from jaxmodels.tree import is_concrete

PyTree = Any
VARIANTS = ("identity", "conv", "selective")

__all__ = ["VARIANTS", "normgrad_saliency", "normgrad_map", "normgrad_combined", "resize_saliency",
           "layer_output_shape"]


def normgrad_map(activation: jax.Array, gradient: jax.Array, *, selective: bool = False) -> jax.Array:
    """``‖g_u‖₂ · ‖a_u‖₂`` (or ``‖max(a_u ⊙ g_u, 0)‖₂`` with ``selective``) over the last (channel) axis of
    ``[..., C]`` activations and their gradients: ``[...]``.

    >>> normgrad_map(y, dy)        # y, dy: [B, H, W, C] -> [B, H, W]
    """
    _check_float_array(activation, "activation", 1)
    _check_float_array(gradient, "gradient", 1)
    a, g = activation.astype(jnp.float32), gradient.astype(jnp.float32)
    if selective:
        if a.shape != g.shape:
            raise ValueError(f"activation {a.shape} and gradient {g.shape} must have the same shape")
        return jnp.linalg.norm(jnp.maximum(a * g, 0.0), axis=-1)
    if a.shape[:-1] != g.shape[:-1]:
        raise ValueError(f"activation {a.shape} and gradient {g.shape} must share all but the last axis")
    return jnp.linalg.norm(g, axis=-1) * jnp.linalg.norm(a, axis=-1)


def resize_saliency(saliency: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of ``[B, h, w]`` maps to ``[B, *size]`` (half-pixel centres, no antialiasing: PyTorch's
    ``interpolate(mode="bilinear", align_corners=False)`` when upsampling)."""
    _check_float_array(saliency, "saliency", 3, 3)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with H, W >= 1, got {size}")
    return jax.image.resize(saliency, saliency.shape[:1] + size, "linear", antialias=False)


def _interceptor(layer: str, on_call: Callable):
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or module_path(mod) != layer:
            return next_fun(*args, **kwargs)
        return on_call(mod, next_fun, args, kwargs)

    return intercept


def layer_output_shape(apply_fn: Callable, params: PyTree, x: jax.Array, layer: str) -> tuple[int, ...]:
    """The shape of ``layer``'s output in ``apply_fn(params, x)`` (abstract evaluation, no compute); raises if the
    module is not called exactly once."""
    shapes = []

    def on_call(mod, next_fun, args, kwargs):
        y = next_fun(*args, **kwargs)
        shapes.append(tuple(y.shape) if hasattr(y, "shape") else None)
        return y

    def run(p, xx):
        with nn.intercept_methods(_interceptor(layer, on_call)):
            return apply_fn(p, xx)

    jax.eval_shape(run, params, x)
    if len(shapes) != 1:
        raise ValueError(f"normgrad: layer {layer!r} was called {len(shapes)} times in apply_fn (needs exactly 1); "
                         "name it by its module path, e.g. 'block_1/conv2'")
    if shapes[0] is None or len(shapes[0]) != 4:
        raise ValueError(f"normgrad: layer {layer!r} must return NHWC activations [B, H, W, C], got {shapes[0]}")
    return shapes[0]


def _check_inputs(x, target, variant, output_size):
    _check_float_array(x, "x", 2)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if target is not None:
        if not hasattr(target, "shape") or tuple(target.shape) != tuple(x.shape[:1]):
            raise ValueError(f"target must be integer labels of shape {x.shape[:1]}, got "
                             f"{getattr(target, 'shape', type(target))}")
        if not jnp.issubdtype(target.dtype, jnp.integer):
            raise TypeError(f"target must be integer labels, got dtype {target.dtype}")
        if is_concrete(target) and target.size and int(jnp.min(target)) < 0:
            raise ValueError("target holds negative labels")
    if output_size not in (None, True, False):
        size = tuple(output_size)
        if len(size) != 2 or min(int(s) for s in size) < 1:
            raise ValueError(f"output_size must be None, True or (H, W), got {output_size}")
    if output_size is True and x.ndim != 4:
        raise ValueError(f"output_size=True needs NHWC images x, got shape {x.shape}")


def normgrad_saliency(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, x: jax.Array, layer: str, *,
             target: jax.Array | None = None, variant: str = "identity",
             output_size: Sequence[int] | bool | None = None) -> jax.Array:
    """NormGrad saliency ``[B, H', W']`` of ``layer`` (module docstring) for ``apply_fn(params, x) -> logits
    [B, classes]``; ``target`` int labels ``[B]`` (default: the predicted classes); ``variant`` "identity"
    (virtual identity after the layer), "conv" (the layer's own weight gradient: it must be an ``nn.Conv``) or
    "selective"; ``output_size`` ``(H, W)`` or ``True`` (the input's) resizes bilinearly. Jit-able.

    >>> s = normgrad_saliency(lambda p, x: model.apply({"params": p, "batch_stats": bs}, x), params, x, "block_1/conv2")
    """
    _check_inputs(x, target, variant, output_size)
    layer_output_shape(apply_fn, params, x, layer)  # validates the layer before any work
    if output_size is True:
        output_size = x.shape[1:3]
    size = None if output_size in (None, False) else tuple(int(v) for v in output_size)
    return _normgrad(apply_fn, params, x, layer, target, variant, size)


@functools.partial(jax.jit, static_argnums=(0, 3, 5, 6))
def _normgrad(apply_fn, params, x, layer, target, variant, size):
    out_shape = layer_output_shape(apply_fn, params, x, layer)
    delta0 = jnp.zeros(out_shape, jnp.float32)

    def objective(delta):
        taps = {}

        def on_call(mod, next_fun, args, kwargs):
            if variant == "conv":
                if not isinstance(mod, nn.Conv):
                    raise ValueError(f"normgrad_saliency(variant='conv'): layer {layer!r} is a "
                                     f"{type(mod).__name__}, not an nn.Conv (use variant='identity')")
                xin = args[0] if args else kwargs["inputs"]
                patches = layer_input_matrix(mod, xin).astype(jnp.float32)
                taps["patch_norm"] = jnp.linalg.norm(patches, axis=-1).reshape(out_shape[:3])
            y = next_fun(*args, **kwargs)
            y = y + delta.astype(y.dtype)  # the virtual identity: d logits / d delta = d logits / d y
            taps["y"] = y
            return y

        with nn.intercept_methods(_interceptor(layer, on_call)):
            logits = apply_fn(params, x)
        if not hasattr(logits, "ndim") or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"apply_fn(params, x) must return logits [batch, classes], got "
                             f"{getattr(logits, 'shape', logits)}")
        logits = logits.astype(jnp.float32)
        t = jnp.argmax(logits, -1) if target is None else target
        score = jnp.sum(jnp.take_along_axis(logits, t[:, None].astype(jnp.int32), 1))
        return score, taps

    g, taps = jax.grad(objective, has_aux=True)(delta0)
    y = jax.lax.stop_gradient(taps["y"]).astype(jnp.float32)
    if variant == "conv":
        s = jnp.linalg.norm(g, axis=-1) * taps["patch_norm"]
    else:
        s = normgrad_map(y, g, selective=variant == "selective")
    return s if size is None else resize_saliency(s, size)


def _minmax(s):
    lo = s.min(axis=(1, 2), keepdims=True)
    hi = s.max(axis=(1, 2), keepdims=True)
    return (s - lo) / jnp.where(hi > lo, hi - lo, 1.0)


def normgrad_combined(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, x: jax.Array,
                      layer_weights: Mapping[str, float], *, target: jax.Array | None = None,
                      variant: str = "identity", accumulation: str = "sum",
                      output_size: Sequence[int] | None = None) -> jax.Array:
    """Saliency combined over layers ``{layer: weight}`` at the input resolution (or ``output_size``): each map
    resized, min-max normalised per example, weights normalised to sum 1; ``accumulation`` "sum" (weighted sum) or
    "product" (weighted geometric mean). ``[B, H, W]``.

    >>> normgrad_combined(apply_fn, params, x, {"stem_conv": 1.0, "block_2/conv2": 1.0})
    """
    if not isinstance(layer_weights, Mapping) or not layer_weights:
        raise ValueError("layer_weights must be a non-empty {layer: weight} mapping")
    w = {k: float(v) for k, v in layer_weights.items()}
    if any(not v >= 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"layer weights must be >= 0 with a positive sum, got {w}")
    if accumulation not in ("sum", "product"):
        raise ValueError(f"accumulation must be 'sum' or 'product', got {accumulation!r}")
    size = output_size if output_size is not None else True
    total = sum(w.values())
    acc = None
    for layer, wt in w.items():
        s = _minmax(normgrad_saliency(apply_fn, params, x, layer, target=target, variant=variant, output_size=size))
        term = wt / total * s if accumulation == "sum" else s ** (wt / total)
        acc = term if acc is None else (acc + term if accumulation == "sum" else acc * term)
    return acc
