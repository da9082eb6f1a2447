"""Wanda: pruning by weights and activations (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large
Language Models"; locuslab/wanda ``lib/prune.py: prune_wanda``, ``lib/layerwrapper.py: WrappedGPT``).

For a linear ``y = x W`` (Flax kernel ``W[in, out]``; the reference's ``weight[out, in]`` is its transpose) with
calibration inputs ``X[n, in]``::

    ‖X_j‖₂² = Σ_t m_t x_tj² / Σ_t m_t                  (the reference's ``scaler_row``; m_t = 0 on padding)
    S_ij   = |W_ij| · ‖X_j‖₂                            (score of the weight from input j to output i)
    keep   = the C − ⌊C·s⌋ largest S_i· of every output row i    (``group="row"``: the paper's per-output
                                                                   comparison group, the reference's default)
           | the n·C − ⌊n·C·s⌋ largest of the whole layer        (``group="layer"``, the paper's ablation)
           | per row, the m − n largest of every m consecutive inputs   (``nm="n:m"``, e.g. 2:4)

No weight update: the kept weights are unchanged. The normalization of ``‖X_j‖²`` (the reference divides by the
number of calibration *sequences*, here by the number of real tokens) is one positive factor per layer, so the
masks are the same. The walk is the one of :mod:`quant.ptq.engine`, as in the reference: all linears of a block
are scored on the inputs of the unpruned block, and the next block gets the pruned block's outputs. Selection:
:mod:`quant.pruning.masks` (exact counts; ties: lowest index pruned first, as the reference's stable sort).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .masks import check_layer_shapes, check_sparsity, layer_record, parse_nm, pruning_report, select_keep

__all__ = ["WandaConfig", "wanda_prune_weight", "wanda", "input_sq_norms"]

GROUPS = ("row", "layer")


@dataclasses.dataclass(frozen=True)
class WandaConfig:
    """``sparsity`` in [0, 1) (ignored with ``nm``); ``nm``: ``None`` | ``"n:m"`` | ``(n, m)``; ``group``:
    ``"row"`` (per output, the paper's default) or ``"layer"``."""

    sparsity: float = 0.5
    nm: str | tuple | None = None
    group: str = "row"

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        parse_nm(self.nm)
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {self.group!r}")


def _wanda_score_oi(w, sq):
    """``S = |W| · sqrt(E[x_j²])`` in the ``[out, in]`` layout."""
    return (jnp.abs(jnp.asarray(w, jnp.float32)) * jnp.sqrt(jnp.asarray(sq, jnp.float32))[:, None]).T


def _wanda(w, sq, sparsity, nm, group):
    return select_keep(_wanda_score_oi, w, sq, sparsity=sparsity, nm=nm, group=group)


def _sq_norms(stats, n_in: int):
    """``E[x_j²]`` ``[in]`` from a 1-D array, a Hessian ``H = 2 E[x xᵀ]`` (its diagonal / 2) or a
    :class:`quant.ptq.engine.LayerStats` (its ``H``, or its inputs ``x`` with token weights ``tok``)."""
    if hasattr(stats, "H") and hasattr(stats, "x"):
        if stats.H is not None:
            stats = stats.H
        elif stats.x is not None:
            return input_sq_norms(stats.x, stats.tok)
        else:
            raise ValueError("wanda: the LayerStats hold neither H nor x")
    if stats is None:
        raise ValueError("wanda needs the calibration inputs' squared norms (or the layer Hessian)")
    a = jnp.asarray(stats)
    if a.ndim == 2:
        if a.shape != (n_in, n_in):
            raise ValueError(f"wanda: Hessian shape {a.shape} does not match the layer's {n_in} input features")
        return jnp.diagonal(a) / 2.0
    if a.shape != (n_in,):
        raise ValueError(f"wanda: squared input norms of shape {a.shape}, the layer has {n_in} input features")
    return a


@jax.jit
def _weighted_sq(x, m):
    x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    m = jnp.asarray(m, jnp.float32).reshape(-1)
    return jnp.sum(m[:, None] * x * x, axis=0), jnp.sum(m)


@jax.jit
def _add_sq(acc, x, m):
    s, c = _weighted_sq(x, m)
    return acc[0] + s, acc[1] + c


def _accumulate_sq(acc, x, m):
    """Running ``(Σ_t m_t x_t², Σ_t m_t)`` over the calibration batches (one compiled program per input shape)."""
    return _weighted_sq(x, m) if acc is None else _add_sq(acc, x, m)


@jax.jit
def _mean_sq(s, n):
    return s / jnp.maximum(n, 1e-12)


def input_sq_norms(x, token_weights=None) -> jax.Array:
    """``Σ_t m_t x_tj² / Σ_t m_t`` per input feature of ``x[..., in]`` (``m_t = 1`` without token weights)."""
    x = jnp.asarray(x)
    m = jnp.ones(x.shape[:-1], jnp.float32) if token_weights is None else token_weights
    return _mean_sq(*_weighted_sq(x, m))


def wanda_prune_weight(w, stats, config: WandaConfig = WandaConfig()) -> dict:
    """Wanda on one Flax kernel ``w[in, out]``; ``stats``: the squared input norms ``E[x_j²]`` ``[in]``, a layer
    Hessian ``2 E[x xᵀ]`` (its diagonal is used) or a :class:`quant.ptq.engine.LayerStats`. Returns the record
    (``weight``, ``mask``, ``sparsity``, ``pattern``) of :func:`quant.pruning.masks.pruning_report`."""
    if not isinstance(config, WandaConfig):
        raise TypeError(f"config must be a WandaConfig, got {type(config).__name__}")
    config.validate()
    w = jnp.asarray(w)
    check_layer_shapes({"w": w.shape}, config.nm, where="wanda_prune_weight")
    sq = _sq_norms(stats, w.shape[0])
    nm = parse_nm(config.nm)
    w_hat, keep = _wanda(w, sq, float(config.sparsity), nm, config.group)
    return layer_record(w_hat, keep, nm)


def wanda(params, model, calib, config: WandaConfig = WandaConfig(), *, progress: bool | None = None):
    """Wanda every linear of ``model``'s blocks (a :class:`quant.ptq.blocks.BlockModel`), block by block on the
    walk of :mod:`quant.ptq.engine`: the squared input norms are accumulated over the calibration batches (no
    Hessian), each block sees the pruned previous blocks' outputs. Returns ``(pruned params, report)``
    (:func:`quant.pruning.masks.pruning_report`, with each layer's relative output error); ``params`` is not
    modified."""
    from quant.ptq.blocks import get_sub, set_kernels
    from quant.ptq.engine import walk_blocks

    from .magnitude import block_kernel_shapes

    if not isinstance(config, WandaConfig):
        raise TypeError(f"config must be a WandaConfig (wanda(params, model, calib, WandaConfig(sparsity))), got "
                        f"{type(config).__name__}")
    config.validate()
    if calib is None:
        raise ValueError("wanda needs calibration data")
    check_layer_shapes(block_kernel_shapes(params, model), config.nm, where="wanda")

    def step(view):
        acc = {}
        for b in range(view.n_batches):
            rec = view.records(b)
            for nm in view.names:
                acc[nm] = _accumulate_sq(acc.get(nm), rec[nm][0], view.tok(b))
        recs, new_k, pairs = {}, {}, {}
        for nm in view.names:
            k = get_sub(view.params, nm)["kernel"]
            recs[nm] = wanda_prune_weight(k, _mean_sq(*acc[nm]), config)
            new_k[nm] = recs[nm]["weight"]
            pairs[nm] = (k, new_k[nm])
        for nm, e in view.errors(pairs).items():
            recs[nm]["error"] = e
        return set_kernels(view.params, new_k), recs, None

    out, layers, _ = walk_blocks(params, model, calib, step, feed="quantized", progress=progress, desc="Wanda")
    return out, pruning_report("wanda", config, layers, params)

