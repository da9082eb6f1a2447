"""Magnitude pruning: the data-free baseline of Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for
Large Language Models", locuslab/wanda ``lib/prune.py: prune_magnitude``) and SparseGPT (Frantar & Alistarh, 2023).

    score_ij = |W_ij|;   keep = the |g| − ⌊|g|·s⌋ largest scores of every comparison group g

with the group the whole layer (``scope="layer"``, the reference's per-matrix threshold), each output row
(``scope="row"``), every kernel of the model at once (``scope="global"``: one threshold over all of them), or N:M
(``nm="2:4"``: ``n`` of every ``m`` consecutive input weights of a row pruned, the reference's ``topk(|W|[:, ii:ii+m],
prune_n, largest=False)``). Exact counts and tie order: :mod:`quant.pruning.masks` (the reference's
``|W| <= sort(|W|)[int(n·s)]`` prunes one entry more, and every tie of the threshold; here exactly ``⌊n·s⌋``).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp

from jaxmodels.tree import flatten, unflatten

from .masks import (
    check_layer_shapes, check_sparsity, layer_record, num_pruned, parse_nm, pruning_report, select_keep,
)

__all__ = ["MagnitudeConfig", "magnitude_prune_weight", "prune_magnitude", "block_kernel_shapes"]

SCOPES = ("layer", "row", "global")


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig:
    """``sparsity`` in [0, 1) (ignored with ``nm``); ``nm``: ``None`` (unstructured), ``"n:m"`` or ``(n, m)``;
    ``scope``: ``"layer"`` | ``"row"`` | ``"global"`` (the comparison group of unstructured pruning)."""

    sparsity: float = 0.5
    nm: str | tuple | None = None
    scope: str = "layer"

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        parse_nm(self.nm)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")


def _abs_oi(w):
    return jnp.abs(jnp.asarray(w, jnp.float32)).T


@jax.jit
def _zero_pruned(w, keep):
    return jnp.where(keep, w, jnp.zeros((), w.dtype))


def _magnitude(w, sparsity, nm, group):
    return select_keep(_abs_oi, w, sparsity=sparsity, nm=nm, group=group)


def magnitude_prune_weight(w, stats=None, config: MagnitudeConfig = MagnitudeConfig()) -> dict:
    """Magnitude-prune one Flax kernel ``w[in, out]`` (``stats``: unused, the layer-function convention
    ``(w, stats, config) -> record``; ``scope="global"`` is per layer here). Returns the record of
    :func:`quant.pruning.masks.pruning_report` (``weight``, ``mask``, ``sparsity``, ``pattern``)."""
    if not isinstance(config, MagnitudeConfig):
        raise TypeError(f"config must be a MagnitudeConfig, got {type(config).__name__}")
    config.validate()
    w = jnp.asarray(w)
    check_layer_shapes({"w": w.shape}, config.nm, where="magnitude_prune_weight")
    nm = parse_nm(config.nm)
    w_hat, keep = _magnitude(w, float(config.sparsity), nm, "row" if config.scope == "row" else "layer")
    return layer_record(w_hat, keep, nm)


@functools.partial(jax.jit, static_argnames=("sparsity",))
def _global_keep(ws, sparsity):
    """One threshold over every kernel: exactly ⌊N·s⌋ of the N weights pruned (ties: lowest index of the
    concatenation of the ``W[out, in]`` row-major flattenings, in path order)."""
    from jaxmodels.selection import top_k_mask

    flat = jnp.concatenate([jnp.abs(jnp.asarray(w, jnp.float32)).T.reshape(-1) for w in ws])
    n = flat.shape[0]
    keep = top_k_mask(flat, n - num_pruned(n, sparsity), ties="last")
    out, i = [], 0
    for w in ws:
        k = w.shape[0] * w.shape[1]
        out.append(keep[i:i + k].reshape(w.shape[1], w.shape[0]).T)
        i += k
    return tuple(out)


def block_kernel_shapes(params, model) -> dict[str, tuple]:
    """``{kernel_path: shape}`` of every linear of ``model``'s blocks (what the engine prunes)."""
    from quant.ptq.blocks import dense_names, get_sub

    if not model.block_paths:
        raise ValueError("the BlockModel has no blocks")
    flat = flatten(params)
    return {f"{bp}/{nm}/kernel": tuple(flat[f"{bp}/{nm}/kernel"].shape) for bp in model.block_paths
            for nm in dense_names(get_sub(params, bp))}


def prune_magnitude(params, model=None, calib=None, config: MagnitudeConfig = MagnitudeConfig(), *,
                    include: str = r"kernel$", progress: bool | None = None):
    """Magnitude-prune ``params``: every 2-D leaf whose path matches ``include``, or, with ``model`` (a
    :class:`quant.ptq.blocks.BlockModel`), the linears of its blocks; with ``calib`` too, each record gets the
    relative output error on the calibration tokens (the walk of :mod:`quant.ptq.engine`, each block fed the
    pruned model's stream). Returns ``(pruned params, report)`` (:func:`quant.pruning.masks.pruning_report`);
    ``params`` is not modified."""
    if not isinstance(config, MagnitudeConfig):
        raise TypeError(f"config must be a MagnitudeConfig (prune_magnitude(params, model, calib, "
                        f"MagnitudeConfig(sparsity))), got {type(config).__name__}")
    config.validate()
    flat = dict(flatten(params))
    if model is None:
        shapes = {p: tuple(v.shape) for p, v in flat.items() if re.search(include, p) and getattr(v, "ndim", 0) == 2}
    else:
        shapes = block_kernel_shapes(params, model)
    check_layer_shapes(shapes, config.nm, where="prune_magnitude")
    nm = parse_nm(config.nm)
    paths = list(shapes)
    if config.scope == "global" and nm is None:
        keeps = _global_keep(tuple(flat[p] for p in paths), float(config.sparsity))
        pruned = {p: (_zero_pruned(flat[p], k), k) for p, k in zip(paths, keeps)}
    else:
        group = "row" if config.scope == "row" else "layer"
        pruned = {p: _magnitude(flat[p], float(config.sparsity), nm, group) for p in paths}
    if model is None or calib is None:
        layers = {p: layer_record(w_hat, keep, nm) for p, (w_hat, keep) in pruned.items()}
        flat.update({p: r["weight"] for p, r in layers.items()})
        return unflatten(flat, like=params), pruning_report("magnitude", config, layers, params)
    from quant.ptq.engine import quantize_layers

    def layer(w, stats, fixed):  # this path's pruned kernel and mask (layer_config below), fixed before the walk
        return layer_record(*fixed, nm)

    out, rep = quantize_layers(params, model, calib, layer, None, layer_config=lambda path: pruned[path],
                               needs=None, feed="quantized", progress=progress, desc="magnitude", method="magnitude")
    return out, pruning_report("magnitude", config, rep["layers"], params)
