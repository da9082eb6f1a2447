"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"), as mergekit.

With base ``w_0`` and N ≥ 2 fine-tuned ``w_i``, offsets ``δ_i = w_i - w_0``, ``cos θ`` the mean pairwise cosine of
the offsets (per tensor, or per row with ``filter_wise``)::

    t   = N cos θ / (1 + (N - 1) cos θ)
    θ_H = t · mean_i(w_i) + (1 - t) · w_0     (t = 0 where |1 + (N-1) cos θ| < 1e-6)
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.tree import compute_in_float32
from merging import _common as C
from merging.registry import register

__all__ = ["model_stock", "model_stock_ratio"]


def model_stock_ratio(w0, ws, filter_wise: bool = False):
    """The interpolation ratio t (scalar, or one per row with ``filter_wise``) and the reshaped inputs."""
    if filter_wise:
        if w0.ndim == 1:
            w0 = w0[None]
            ws = [w[None] for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            num = jnp.sum(offs[i] * offs[j], axis=-1)
            den = jnp.linalg.norm(offs[i], axis=-1) * jnp.linalg.norm(offs[j], axis=-1)
            cos.append(jnp.clip(num / jnp.maximum(den, 1e-6), -1.0, 1.0))
    c = jnp.stack(cos).mean(0)[..., None]
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = jnp.abs(den) < 1e-6  # no finite estimate: keep the base (t = 0), as mergekit
    return jnp.where(singular, 0.0, n * c / jnp.where(singular, 1.0, den)), w0, ws


@functools.partial(jax.jit, static_argnames=("filter_wise",))
def _stock_leaf(b, xs, *, filter_wise):
    shape = b.shape
    w0 = b.astype(jnp.float32)
    ws = [x.astype(jnp.float32) for x in xs]
    t, w0, ws = model_stock_ratio(w0, ws, filter_wise)
    avg = sum(ws) / len(ws)
    return (t * avg + (1 - t) * w0).reshape(shape)


@register("model_stock", needs_base=True, defaults={"filter_wise": False})
def model_stock(base: Any, models: Sequence[Any], *, filter_wise: bool = False, check_finite: bool = True) -> Any:
    """Model Stock of ``models`` (N ≥ 2 fine-tuned) around the pre-trained ``base`` (required)."""
    models = C.as_models(models, 2, "model_stock")
    if base is None:
        raise ValueError("model_stock: needs the pre-trained model as `base`")
    C.validate_trees(base, models, "model_stock", check_finite=check_finite)
    C.check_leaf_dtypes(base, models, "model_stock")

    @compute_in_float32
    def run(base, models):
        return C.map_leaves(lambda p, b, xs: _stock_leaf(b, xs, filter_wise=bool(filter_wise)), base, models)

    return run(base, models)
