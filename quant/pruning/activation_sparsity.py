"""Training-free activation sparsity: WINA (Chen et al., 2025, "WINA: Weight Informed Neuron Activation for
Accelerating Large Language Model Inference", arXiv 2505.19427; microsoft/wina) and its baseline TEAL (Liu et al.,
2024, "Training-Free Activation Sparsity in Large Language Models", arXiv 2408.14690; FasterDecoding/TEAL).

For a linear ``y = x W`` (Flax kernel ``W[in, out]``, input ``x[..., in]``) both methods zero input features, so
only the kept rows of ``W`` are multiplied (a sparse GEMV at decode time)::

    ŷ = (x ⊙ m) W,     m_j ∈ {0, 1}
    TEAL:  score_j = |x_j|
    WINA:  score_j = |x_j| · ‖W_{j,:}‖₂       (ℓ2 norm of the kernel row x_j multiplies = the column norm of the
                                               reference's torch ``weight[out, in]``, ``weight.norm(dim=0)``)

Selection of ``m`` (``mode``):

* ``"topk"`` -- per token, keep the ``k = n − ⌊n·s⌋`` largest scores of its ``n`` features (the WINA reference's
  default ``mask_by='topk'``, used there for both methods); ties: the lowest index is pruned first (the order of
  :mod:`quant.pruning.masks`).
* ``"threshold"`` -- ``m_j = 1[score_j > t]`` with one threshold per layer calibrated on calibration activations
  (TEAL): ``t`` is the ``⌊N·s⌋``-th smallest of the ``N`` calibration scores (every feature of every real token,
  padding excluded), so a fraction ``s`` of the calibration entries is pruned. TEAL takes
  ``t = F⁻¹(0.5 + s/2)`` from a histogram of the signed activations, assumed zero-mean and symmetric: that is this
  quantile of ``|x|``; here it is the exact empirical quantile (one sort of the calibration scores).

Why the weight: ``‖x W − (x ⊙ m) W‖₂ = ‖Σ_{j: m_j = 0} x_j W_{j,:}‖₂ ≤ Σ_{j: m_j = 0} |x_j| ‖W_{j,:}‖₂``, WINA keeps
the terms with the largest bound; when the rows of ``W`` are orthogonal the error is exactly
``(Σ_{m_j=0} x_j² ‖W_{j,:}‖²)^{1/2}`` and WINA's top-k is the optimal k-subset (the paper's theorem). The paper makes
the rows orthogonal by an SVD rotation: ``W = U S Vᵀ`` and ``x W = (x U)(Uᵀ W)`` with ``Uᵀ W = S Vᵀ`` row-orthogonal
(:func:`wina_orthogonalize`, per layer). The reference folds that rotation into the network: it rotates the
residual stream by the SVD of ``k_proj`` / ``gate_proj`` (SliceGPT-style, with per-layer shortcut rotations, after
fusing the norm scales into the linears) and then weighs only those two layers by their column norms (the others by
1). That network-wide fold needs changes to the model code and is not implemented; ``transform=True`` emulates it
exactly per linear, online: ``x ↦ x U_l``, ``W_l ↦ U_lᵀ W_l`` with ``U_l`` from the SVD of that linear's own kernel
(same outputs when nothing is pruned, one extra ``[in, in]`` matmul per linear: a statement about accuracy, not
speed), and every linear is weighed by its own norms (the paper's equation). TEAL with ``transform=True`` is the
reference's ``teal_transform`` baseline.

Decoder (:func:`calibrate_activation_sparsity`, :class:`SparseForward`): every ``nn.Dense`` inside the blocks of a
:class:`quant.ptq.blocks.BlockModel` (q/k/v/o and gate/up/down for the Llama family; not the LM head) gets its input
sparsified, each with its own mask (q, k, v share an input but not a mask under WINA). Thresholds are calibrated on
the inputs of the dense model, block by block, on the :func:`quant.ptq.engine.walk_blocks` walk (``feed="float"``,
as TEAL's ``grab_acts``); the report gives each linear's realized calibration sparsity and relative output error
``‖XW − X̂W‖² / ‖XW‖²``. TEAL's greedy per-layer sparsity allocation and its decode-only sparsification of the
prompt are not implemented (every token is sparsified, at one uniform sparsity).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import is_concrete
from quant.ptq.blocks import BlockModel, get_sub
from quant.ptq.engine import report, walk_blocks

from .masks import check_sparsity, nm_keep, num_pruned

__all__ = ["METHODS", "MODES", "ActivationSparsityConfig", "Orthogonalized", "row_norms", "activation_scores",
           "topk_mask", "calibrate_threshold", "threshold_mask", "activation_mask", "sparse_dense", "output_error",
           "wina_orthogonalize", "calibrate_activation_sparsity", "SparseForward", "sparse_forward"]

PyTree = Any
METHODS = ("wina", "teal")
MODES = ("topk", "threshold")


@dataclasses.dataclass(frozen=True)
class ActivationSparsityConfig:
    """``sparsity`` in [0, 1): fraction of input features zeroed; ``method``: ``"wina"`` | ``"teal"``; ``mode``:
    ``"topk"`` (exact count per token) | ``"threshold"`` (calibrated per layer); ``transform``: rotate each linear's
    input by the SVD of its kernel first (decoder wrapper only; module docstring). Validated on construction.

    >>> cfg = ActivationSparsityConfig(0.5, "wina", "threshold", transform=True)
    """

    sparsity: float = 0.5
    method: str = "wina"
    mode: str = "topk"
    transform: bool = False

    def __post_init__(self):
        check_sparsity(self.sparsity)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.transform, bool):
            raise ValueError(f"transform must be a bool, got {self.transform!r}")


class Orthogonalized(NamedTuple):
    """``x W = (x Q) kernel``: ``Q[in, in]`` orthogonal, ``kernel = Qᵀ W`` with orthogonal rows."""

    Q: jax.Array
    kernel: jax.Array


# ------------------------------------------------------------------------------------------------ checks

def _check_kernel(w, where: str):
    if np.ndim(w) != 2:
        raise ValueError(f"{where}: the kernel must be 2-D [in, out], got shape {tuple(np.shape(w))}")


def _check_x(x, n_in: int | None, where: str):
    if np.ndim(x) < 1:
        raise ValueError(f"{where}: x must have a feature axis [..., in], got a scalar")
    if n_in is not None and np.shape(x)[-1] != n_in:
        raise ValueError(f"{where}: x has {np.shape(x)[-1]} features, the kernel {n_in} inputs")


def _check_finite(a, name: str, where: str):
    if is_concrete(a):
        ok = jnp.all(jnp.isfinite(jnp.asarray(a)))
        if is_concrete(ok) and not bool(ok):
            raise ValueError(f"{where}: {name} has NaN or Inf values")


# ------------------------------------------------------------------------------------------------ one layer

@jax.jit
def row_norms(w: jax.Array) -> jax.Array:
    """``‖W_{j,:}‖₂`` for every input feature ``j`` of a Flax kernel ``[in, out]`` (float32 ``[in]``).

    >>> row_norms(jnp.array([[3.0, 4.0], [0.0, 1.0]]))   # [5., 1.]
    """
    return jnp.linalg.norm(jnp.asarray(w, jnp.float32), axis=1)


def activation_scores(x: jax.Array, w: jax.Array | None = None, method: str = "wina") -> jax.Array:
    """Selection scores ``[..., in]`` (float32): TEAL ``|x_j|``, WINA ``|x_j|·‖W_{j,:}‖₂`` (``w`` needed).

    >>> s = activation_scores(x, w, "wina")     # x [T, in], w [in, out]
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "wina":
        if w is None:
            raise ValueError("activation_scores: WINA needs the kernel w")
        _check_kernel(w, "activation_scores")
    _check_x(x, None if w is None else np.shape(w)[0], "activation_scores")
    a = jnp.abs(jnp.asarray(x, jnp.float32))
    return a if method == "teal" else a * row_norms(w)


def topk_mask(scores: jax.Array, sparsity: float) -> jax.Array:
    """Bool mask (True = kept) of ``scores[..., n]``: per token the ``n − ⌊n·s⌋`` largest; ties: lowest index pruned
    first. Jit-able with ``sparsity`` static.

    >>> keep = topk_mask(activation_scores(x, w), 0.5)     # exactly n/2 kept per token
    """
    s = check_sparsity(sparsity)
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim < 1:
        raise ValueError("topk_mask: scores must have a feature axis [..., n]")
    return nm_keep(scores, num_pruned(scores.shape[-1], s))


def _real_entries(scores, token_weights):
    """``(scores with padding entries set to 0 (flat), #padding entries, #real entries)``."""
    n = scores.shape[-1]
    flat = scores.reshape(-1, n)
    if token_weights is None:
        return flat.reshape(-1), jnp.asarray(0, jnp.int32), jnp.asarray(flat.size, jnp.int32)
    tw = jnp.asarray(token_weights).reshape(-1)
    real = tw > 0
    n_real = jnp.sum(real, dtype=jnp.int32) * n
    return jnp.where(real[:, None], flat, 0.0).reshape(-1), flat.size - n_real, n_real


def calibrate_threshold(scores: jax.Array, sparsity: float, token_weights: jax.Array | None = None) -> jax.Array:
    """TEAL's per-layer threshold (module docstring): the ``⌊N·s⌋``-th smallest of the ``N`` calibration scores of
    the real tokens (``token_weights > 0``; shape ``scores.shape[:-1]``), float32 scalar; 0 when ``⌊N·s⌋ = 0``.
    Pruning ``score <= t`` then removes a fraction ``s`` of the calibration entries (up to ties).

    >>> t = calibrate_threshold(activation_scores(x_calib, method="teal"), 0.5)
    """
    s = check_sparsity(sparsity)
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim < 1 or scores.size == 0:
        raise ValueError("calibrate_threshold: scores must be a non-empty [..., n] array")
    if token_weights is not None and tuple(np.shape(token_weights)) != tuple(scores.shape[:-1]):
        raise ValueError(f"calibrate_threshold: token_weights shape {tuple(np.shape(token_weights))} != scores "
                         f"shape without the feature axis {tuple(scores.shape[:-1])}")
    _check_finite(scores, "scores", "calibrate_threshold")
    if is_concrete(scores) and bool(jnp.any(scores < 0)):
        raise ValueError("calibrate_threshold: scores must be non-negative (|x| or |x|·‖W_j‖)")
    return _threshold(scores, token_weights, s)


@jax.jit
def _threshold_impl(scores, token_weights, s):
    flat, n_pad, n_real = _real_entries(scores, token_weights)
    n_prune = jnp.floor(n_real.astype(jnp.float32) * s).astype(jnp.int32)
    # the (n_pad + n_prune)-th smallest entry (the padding zeros sort lowest)
    t = jnp.sort(flat)[jnp.clip(n_pad + n_prune - 1, 0, flat.shape[0] - 1)]
    return jnp.where(n_prune > 0, t, 0.0)


def _threshold(scores, token_weights, s):
    return _threshold_impl(scores, token_weights, jnp.float32(s))


def threshold_mask(scores: jax.Array, threshold) -> jax.Array:
    """``scores > threshold`` (True = kept), the calibrated TEAL / WINA rule.

    >>> keep = threshold_mask(activation_scores(x, method="teal"), t)
    """
    return jnp.asarray(scores, jnp.float32) > jnp.asarray(threshold, jnp.float32)


def activation_mask(x: jax.Array, w: jax.Array, config: ActivationSparsityConfig, threshold=None) -> jax.Array:
    """Kept-features mask ``[..., in]`` of ``x`` for kernel ``w`` under ``config`` (``threshold`` needed, and
    only used, in ``"threshold"`` mode).

    >>> keep = activation_mask(x, w, ActivationSparsityConfig(0.5, "wina"))
    """
    if not isinstance(config, ActivationSparsityConfig):
        raise ValueError(f"config must be an ActivationSparsityConfig, got {type(config).__name__}")
    _check_kernel(w, "activation_mask")
    _check_x(x, np.shape(w)[0], "activation_mask")
    _check_finite(x, "x", "activation_mask")
    if config.mode == "threshold":
        if threshold is None:
            raise ValueError("activation_mask: mode='threshold' needs a calibrated threshold "
                             "(calibrate_threshold / calibrate_activation_sparsity)")
        if np.ndim(threshold) != 0:
            raise ValueError(f"activation_mask: threshold must be a scalar, got shape {np.shape(threshold)}")
        if is_concrete(threshold) and not float(threshold) >= 0:
            raise ValueError(f"activation_mask: threshold must be a finite number >= 0, got {threshold}")
    return _mask(x, w, config, threshold)


def _mask(x, w, config, threshold):
    sc = activation_scores(x, w, config.method)
    if config.mode == "topk":
        return topk_mask(sc, config.sparsity)
    return threshold_mask(sc, threshold)


def sparse_dense(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
                 config: ActivationSparsityConfig = ActivationSparsityConfig(), threshold=None) -> jax.Array:
    """The sparsified Dense forward ``ŷ = (x ⊙ m) W + b`` (``m`` = :func:`activation_mask`), in ``x``'s dtype.

    >>> y_hat = sparse_dense(x, w, b, config=ActivationSparsityConfig(0.5, "wina"))
    """
    m = activation_mask(x, w, config, threshold)
    if bias is not None and tuple(np.shape(bias)) != (np.shape(w)[1],):
        raise ValueError(f"sparse_dense: bias shape {tuple(np.shape(bias))} != ({np.shape(w)[1]},)")
    y = jnp.where(m, x, jnp.zeros((), jnp.asarray(x).dtype)) @ jnp.asarray(w, jnp.asarray(x).dtype)
    return y if bias is None else y + bias


def output_error(x: jax.Array, w: jax.Array, keep: jax.Array, token_weights: jax.Array | None = None) -> jax.Array:
    """Relative output error ``Σ_t m_t ‖x_t W − (x_t ⊙ keep_t) W‖² / Σ_t m_t ‖x_t W‖²`` (float32 scalar; ``m``:
    token weights, default 1).

    >>> e = output_error(x, w, activation_mask(x, w, cfg))
    """
    _check_kernel(w, "output_error")
    _check_x(x, np.shape(w)[0], "output_error")
    if tuple(np.shape(keep)) != tuple(np.shape(x)):
        raise ValueError(f"output_error: keep shape {tuple(np.shape(keep))} != x shape {tuple(np.shape(x))}")
    tw = jnp.ones(np.shape(x)[:-1], jnp.float32) if token_weights is None else token_weights
    if tuple(np.shape(tw)) != tuple(np.shape(x)[:-1]):
        raise ValueError(f"output_error: token_weights shape {tuple(np.shape(tw))} != {tuple(np.shape(x)[:-1])}")
    return _error(x, w, keep, tw)


@jax.jit
def _error(x, w, keep, tw):
    x = jnp.asarray(x, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    tw = jnp.asarray(tw, jnp.float32)[..., None]
    d = jnp.where(keep, 0.0, x) @ w  # x W − (x ⊙ m) W = (x ⊙ (1 − m)) W
    return jnp.sum(tw * d**2) / jnp.maximum(jnp.sum(tw * (x @ w) ** 2), 1e-30)


def wina_orthogonalize(w: jax.Array) -> Orthogonalized:
    """WINA's orthogonalizing rotation of one layer: ``W = U S Vᵀ`` (SVD of the Flax kernel ``[in, out]``), ``Q = U``
    ``[in, in]`` and ``kernel = Qᵀ W = S Vᵀ`` (rows orthogonal, norms the singular values, 0 past ``rank``), so that
    ``x W = (x Q) kernel`` and WINA's top-k on ``x Q`` is the optimal k-subset for that kernel.

    >>> Q, w_rot = wina_orthogonalize(w); y_hat = sparse_dense(x @ Q, w_rot, config=cfg)
    """
    _check_kernel(w, "wina_orthogonalize")
    _check_finite(w, "w", "wina_orthogonalize")
    return _orthogonalize(w)


@jax.jit
def _orthogonalize(w):
    # U from the eigendecomposition W Wᵀ = U S² Uᵀ (the left singular vectors; ~10x cheaper than an SVD on
    # XLA:CPU), columns in decreasing singular value; U is orthogonal whatever its accuracy, so x W = (x U)(Uᵀ W)
    w32 = jnp.asarray(w, jnp.float32)
    _, U = jnp.linalg.eigh(w32 @ w32.T)
    U = U[:, ::-1]
    return Orthogonalized(U, (U.T @ w32).astype(jnp.asarray(w).dtype))


# ------------------------------------------------------------------------------------------------ decoder

def _rotate(x, Q):
    return jnp.asarray(x, jnp.float32) @ Q

@functools.partial(jax.jit, static_argnums=3)
def _calibrate_layer(x, w, tok, config):
    """``(threshold or 0, realized sparsity on the real tokens, relative output error)`` of one linear."""
    if config.transform:
        Q, w = _orthogonalize(w)
        x = _rotate(x, Q)
    t = _threshold_impl(activation_scores(x, w, config.method), tok, config.sparsity) if config.mode == "threshold" \
        else jnp.zeros((), jnp.float32)
    keep = _mask(x, w, config, t)
    real = jnp.asarray(tok, jnp.float32) > 0
    n_real = jnp.maximum(jnp.sum(real) * keep.shape[-1], 1)
    kept = jnp.sum(keep & real[..., None])
    return t, 1.0 - kept / n_real, _error(x, w, keep, real)


def _thresholds_check(thresholds, config):
    if config.mode == "threshold" and not thresholds:
        raise ValueError("mode='threshold' needs the thresholds of calibrate_activation_sparsity")


def calibrate_activation_sparsity(params: PyTree, model: BlockModel, calib, config: ActivationSparsityConfig,
                                  *, progress: bool | None = None):
    """Calibrate every block linear of ``model`` (module docstring) on ``calib`` (one batch or a list, padding
    weighs 0). Returns ``(thresholds, report)``: ``thresholds = {"block/linear": float32 scalar}`` (the linear's
    kernel path without ``/kernel``; ``{}`` in ``"topk"`` mode, which needs none) and ``report = {"method",
    "config", "layers": {kernel_path: {"threshold", "sparsity", "error"}}, "sparsity", "error"}`` with the realized
    calibration sparsity and relative output error per layer and their token-weighted means. ``params`` unchanged.

    >>> thr, rep = calibrate_activation_sparsity(params, block_model(model), calib, ActivationSparsityConfig(0.5))
    >>> ppl = evaluate_perplexity(SparseForward(bm, cfg), {"params": params, "thresholds": thr}, tokens, 128)
    """
    if not isinstance(config, ActivationSparsityConfig):
        raise ValueError(f"config must be an ActivationSparsityConfig, got {type(config).__name__}")
    if calib is None:
        raise ValueError("calibrate_activation_sparsity needs calibration data")
    thresholds: dict[str, jax.Array] = {}

    def step(view):
        recs = {}
        for nm in view.names:
            st = view.inputs(nm)
            t, sp, err = _calibrate_layer(st.x, get_sub(view.params, nm)["kernel"], st.tok, config)
            if config.mode == "threshold":
                thresholds[f"{view.path}/{nm}"] = t
            recs[nm] = {"threshold": float(t) if config.mode == "threshold" else None, "sparsity": float(sp),
                        "error": float(err)}
        return view.params, recs, None

    _, layers, _ = walk_blocks(params, model, calib, step, feed="float", progress=progress,
                               desc=f"{config.method} calibration")
    rep = report(config.method, config, layers, sparsity=float(np.mean([r["sparsity"] for r in layers.values()])),
                 error=float(np.mean([r["error"] for r in layers.values()])))
    return thresholds, rep


class SparseForward:
    """``fn(state, batch) -> model output`` of a :class:`~quant.ptq.blocks.BlockModel` with the input of every block
    linear sparsified by ``config`` (``state = {"params": params, "thresholds": {...}}``, thresholds from
    :func:`calibrate_activation_sparsity`; ``{}`` in ``"topk"`` mode). Hashable by (model identity, config): a static
    jit argument, so :func:`jaxmodels.perplexity.evaluate_perplexity` takes it as its callable model.

    >>> ppl = evaluate_perplexity(SparseForward(bm, cfg), {"params": params, "thresholds": thr}, tokens, 128)
    """

    def __init__(self, model: BlockModel, config: ActivationSparsityConfig):
        if not isinstance(config, ActivationSparsityConfig):
            raise ValueError(f"config must be an ActivationSparsityConfig, got {type(config).__name__}")
        self.model, self.config = model, config

    def __hash__(self):
        return hash((id(self.model), self.config))

    def __eq__(self, other):
        return isinstance(other, SparseForward) and other.model is self.model and other.config == self.config

    def __call__(self, state, batch):
        params, thresholds = state["params"], state.get("thresholds") or {}
        model, cfg = self.model, self.config
        h, ctx = model.embed(params, batch)
        for i, bp in enumerate(model.block_paths):
            block = get_sub(params, bp)

            def interceptor(next_fun, args, kwargs, context, bp=bp, block=block):
                if not (isinstance(context.module, nn.Dense) and context.method_name == "__call__"):
                    return next_fun(*args, **kwargs)
                name = "/".join(context.module.path)
                x, w = args[0], get_sub(block, name)["kernel"]
                t = thresholds.get(f"{bp}/{name}")
                if cfg.mode == "threshold" and t is None:
                    raise ValueError(f"SparseForward: no threshold for {bp}/{name}")
                if not cfg.transform:
                    keep = _mask(x, w, cfg, t)
                    return next_fun(jnp.where(keep, x, jnp.zeros((), x.dtype)), *args[1:], **kwargs)
                Q, wr = _orthogonalize(w)  # x W + b = (x Q)(Qᵀ W) + b, sparsified in the rotated basis
                xr = _rotate(x, Q)
                keep = _mask(xr, wr, cfg, t)
                y = jnp.where(keep, xr, 0.0) @ jnp.asarray(wr, jnp.float32)
                b = get_sub(block, name).get("bias")
                return (y if b is None else y + b).astype(x.dtype)

            with nn.intercept_methods(interceptor):
                h = model.block.apply({"params": block}, h, **model.block_ctx(i, ctx))
        return model.head(params, h, ctx)


_forward = jax.jit(lambda fn, state, batch: fn(state, batch), static_argnums=0)


def sparse_forward(params: PyTree, model: BlockModel, batch, config: ActivationSparsityConfig,
                   thresholds: dict | None = None) -> jax.Array:
    """``model.forward(params, batch)`` with every block linear's input sparsified (jitted :class:`SparseForward`).

    >>> logits = sparse_forward(params, bm, {"input_ids": ids}, ActivationSparsityConfig(0.5, "wina"))
    """
    fn = SparseForward(model, config)
    _thresholds_check(thresholds, config)
    return _forward(fn, {"params": params, "thresholds": dict(thresholds or {})}, batch)
