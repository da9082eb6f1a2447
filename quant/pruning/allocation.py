"""Layer-adaptive sparsity by joint optimization (Xu et al., 2023, "Efficient Joint Optimization of Layer-Adaptive
Weight Pruning in Deep Neural Networks", ICCV; reference Akimoto-Cris/RD_PRUNE ``tools/pruners.py: gen_rd_curves``,
``tools/algo.py: dp_pruning``).

Rate-distortion curves: for every prunable layer l and candidate sparsity s = d / levels (d = 0 .. levels − 1),
magnitude-prune layer l ALONE (exactly ⌊n_l·s⌋ of its weights, :mod:`quant.pruning.masks`) and measure the output
distortion of the model on calibration data::

    D_l(s) = mean_t ‖F(x_t; W) − F(x_t; W with layer l pruned at s)‖² / dim          (the reference's
                                                                                     ``((Y − Y_hat)²).mean()``)

The paper's additivity: pruning several layers together distorts the output by ≈ Σ_l D_l(s_l) (check it with
:func:`joint_distortion`). So the allocation is the multiple-choice knapsack

    min Σ_l D_l(s_l)   s.t.   Σ_l n_l (1 − s_l) ≤ (1 − S) Σ_l n_l

solved exactly by :func:`quant.ptq.allocate_knapsack` (the HAWQ-V2 dynamic program of mixed precision, with
"bits" = kept fraction in units of 1/levels). The reference's DP over surviving-weight counts solves the same
problem; it also allows pruning a whole layer (s = 1), here s < 1 as everywhere in :mod:`quant.pruning`, and its
iterative mode (sparsities never below the previous round's, ``prev_pc``) is not reproduced: one-shot only.
``model`` is a :class:`quant.ptq.blocks.BlockModel` (its blocks' linears are the layers; F = ``model.forward``,
padding tokens excluded) or any ``model(params, calib) -> outputs`` (every 2-D leaf matching ``include``).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import flatten, unflatten

from .masks import check_sparsity, layer_record, num_pruned, pruning_report

__all__ = ["AllocationConfig", "distortion_curves", "allocate_sparsity", "prune_with_sparsities",
           "layer_adaptive_prune", "joint_distortion"]


@dataclasses.dataclass(frozen=True)
class AllocationConfig:
    """``sparsity``: the global target S in [0, 1); ``levels``: candidate sparsities ``d / levels``,
    ``d = 0 .. levels − 1`` (the reference's ``maxsps``); ``max_sparsity``: no layer pruned beyond it;
    ``include``: the path regex of the prunable kernels when ``model`` is a callable."""

    sparsity: float = 0.5
    levels: int = 20
    max_sparsity: float = 0.95
    include: str = r"kernel$"

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        check_sparsity(self.max_sparsity)
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2:
            raise ValueError(f"levels must be an integer >= 2, got {self.levels!r}")
        if self.sparsity > self.max_sparsity:
            raise ValueError(f"sparsity {self.sparsity} exceeds max_sparsity {self.max_sparsity}")

    def candidates(self) -> list[float]:
        """The candidate sparsities ``d / levels`` up to ``max_sparsity``."""
        return [d / self.levels for d in range(self.levels) if d / self.levels <= self.max_sparsity + 1e-12]


@jax.jit
def _ranks(w):
    """Rank of every |w| in the stable ascending order of the ``W[out, in]`` row-major flattening: pruning the
    ranks < k is exactly ``top_k_mask(|W|, n − k, ties="last")`` (ties: lowest index pruned first)."""
    a = jnp.abs(jnp.asarray(w, jnp.float32)).T.reshape(-1)
    order = jnp.argsort(a, stable=True)
    return jnp.zeros(a.shape[0], jnp.int32).at[order].set(jnp.arange(a.shape[0], dtype=jnp.int32)).reshape(
        w.shape[1], w.shape[0]).T


@jax.jit
def _prune_ranked(w, ranks, k):
    keep = ranks >= k
    return jnp.where(keep, w, jnp.zeros((), w.dtype)), keep


def _targets(params, model, include):
    flat = flatten(params)
    if hasattr(model, "block_paths"):
        from .magnitude import block_kernel_shapes

        return list(block_kernel_shapes(params, model))
    return [p for p, v in flat.items() if re.search(include, p) and getattr(v, "ndim", 0) == 2]


def _fwd_impl(model_id, params, calib):
    model = model_id.model
    if hasattr(model, "block_paths"):
        _, ctx = model.embed(params, calib)
        return model.forward(params, calib), model.token_weight(ctx)
    y = model(params, calib)
    return y, jnp.ones(y.shape[:-1] if y.ndim > 1 else (1,), jnp.float32)


_fwd = jax.jit(_fwd_impl, static_argnums=0)  # one compile per (model object, params / batch shapes)


def _forward_fn(model, calib):
    """``params -> (outputs [..., dim] float32, token weights [...])``: the BlockModel's ``forward`` (token weights:
    0 on padding) or ``model(params, calib)`` (all weights 1)."""
    from quant.ptq.blocks import ByIdentity

    key = ByIdentity(model)
    calib = jax.tree_util.tree_map(jnp.asarray, calib)
    return lambda p: _fwd(key, p, calib)


@jax.jit
def _distortion(y, y_hat, tok):
    d = jnp.mean((jnp.asarray(y, jnp.float32) - jnp.asarray(y_hat, jnp.float32)) ** 2, axis=-1).reshape(-1)
    m = jnp.asarray(tok, jnp.float32).reshape(-1)
    return jnp.sum(m * d) / jnp.maximum(jnp.sum(m), 1e-12)


def distortion_curves(params, model, calib, sparsities, *, include: str = r"kernel$") -> dict[str, dict[float, float]]:
    """``{kernel_path: {s: D_l(s)}}``: the output distortion of pruning each layer alone by magnitude at each
    sparsity in ``sparsities`` (module docstring). ``params`` is not modified."""
    for s in sparsities:
        check_sparsity(s)
    fwd = _forward_fn(model, calib)
    y, tok = fwd(params)
    flat = dict(flatten(params))
    curves = {}
    for p in _targets(params, model, include):
        w = flat[p]
        r = _ranks(w)
        n = int(np.size(w))
        curves[p] = {}
        for s in sparsities:
            k = num_pruned(n, s)
            if k == 0:  # nothing pruned: no distortion, no forward pass
                curves[p][float(s)] = 0.0
                continue
            w_hat, _ = _prune_ranked(w, r, jnp.int32(k))
            y_hat, _ = fwd(unflatten({**flat, p: w_hat}, like=params))
            curves[p][float(s)] = float(_distortion(y, y_hat, tok))
    return curves


def allocate_sparsity(curves: dict[str, dict[float, float]], sizes: dict[str, int], sparsity: float,
                      levels: int) -> dict[str, float]:
    """The per-layer sparsities minimizing Σ_l D_l(s_l) under Σ_l n_l (1 − s_l) ≤ (1 − S) Σ_l n_l, every s_l a key
    of ``curves[l]`` and a multiple of ``1/levels``: :func:`quant.ptq.allocate_knapsack` with "bits" = kept
    fraction · levels. Raises if no choice fits the budget."""
    from quant.ptq.mixed_precision_allocation import allocate_knapsack

    check_sparsity(sparsity)
    costs = {}
    for p, c in curves.items():
        costs[p] = {}
        for s, dist in c.items():
            d = round(float(s) * levels)
            if abs(d - float(s) * levels) > 1e-9:
                raise ValueError(f"allocate_sparsity: {p} sparsity {s} is not a multiple of 1/{levels}")
            costs[p][levels - d] = float(dist)
    # kept levels: Σ n_l b_l ≤ levels (1 − S) Σ n_l; the 1e-9 only absorbs the float rounding of the budget
    kept = allocate_knapsack(costs, sizes, levels * (1.0 - float(sparsity)) + 1e-9)
    return {p: (levels - b) / levels for p, b in kept.items()}


def prune_with_sparsities(params, sparsities: dict[str, float]):
    """Magnitude-prune each kernel ``path`` of ``sparsities`` at its own sparsity (exact ⌊n·s⌋, per layer).
    Returns ``(params, report)`` (:func:`quant.pruning.masks.pruning_report`)."""
    flat = dict(flatten(params))
    for p, s in sparsities.items():
        check_sparsity(s)
        if p not in flat or getattr(flat[p], "ndim", 0) != 2:
            raise ValueError(f"prune_with_sparsities: {p!r} is not a 2-D leaf of the params")
    layers = {}
    for p, s in sparsities.items():
        w = flat[p]
        w_hat, keep = _prune_ranked(w, _ranks(w), jnp.int32(num_pruned(int(np.size(w)), s)))
        layers[p] = layer_record(w_hat, keep, None, layer_sparsity=float(s))
        flat[p] = w_hat
    return unflatten(flat, like=params), pruning_report("magnitude_per_layer", dict(sparsities), layers, params)


def joint_distortion(params, pruned, model, calib) -> float:
    """The output distortion of ``pruned`` against ``params`` (all layers pruned together): compare with
    Σ_l D_l(s_l) for the paper's additivity."""
    fwd = _forward_fn(model, calib)
    y, tok = fwd(params)
    return float(_distortion(y, fwd(pruned)[0], tok))


def layer_adaptive_prune(params, model, calib, config: AllocationConfig = AllocationConfig()):
    """Curves (:func:`distortion_curves` at ``config.candidates()``), allocation (:func:`allocate_sparsity` at the
    global ``config.sparsity``), magnitude pruning at the allocated sparsities. Returns ``(pruned params, report)``
    with ``report["allocation"]`` ``{path: s}``, ``report["curves"]`` and ``report["predicted_distortion"]``
    (Σ_l D_l(s_l)); ``params`` is not modified."""
    if not isinstance(config, AllocationConfig):
        raise TypeError(f"config must be an AllocationConfig, got {type(config).__name__}")
    config.validate()
    if calib is None:
        raise ValueError("layer_adaptive_prune needs calibration data")
    flat = flatten(params)
    targets = _targets(params, model, config.include)
    if not targets:
        raise ValueError("layer_adaptive_prune: no 2-D kernel to prune")
    curves = distortion_curves(params, model, calib, config.candidates(), include=config.include)
    alloc = allocate_sparsity(curves, {p: int(np.size(flat[p])) for p in targets}, config.sparsity, config.levels)
    out, rep = prune_with_sparsities(params, alloc)
    rep.update(method="layer_adaptive", config=dataclasses.asdict(config), allocation=alloc, curves=curves,
               predicted_distortion=float(sum(curves[p][s] for p, s in alloc.items())))
    return out, rep

