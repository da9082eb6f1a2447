"""GradNormLoRP: weight-normalised weights, low-rank (GaLore) projection of the direction gradient.

Huang, Shen, Zhu, Rudinac, Kanoulas, "Gradient Weight-normalized Low-rank Projection for Efficient LLM Training"
(AAAI 2025; code: github.com/Jhhuangkay/Gradient-Weight-normalized-Low-rank-Projection-for-Efficient-LLM-Training,
``GradNormLoRP/LowRankWeightNormAdamW.py`` + ``galore_projector.py``). Each selected weight is reparameterised
column-wise (per output channel) as ``w = δ v/‖v‖`` (Salimans & Kingma's weight normalisation); the gradient of the
direction v is projected to rank r with the gradient's SVD (GaLore), Adam runs in the r-dimensional space and its
step is projected back; the per-channel magnitude δ gets a full (tiny) Adam. Per step t, for a weight with matrix
view W ∈ R^{m×n} (m = input, n = output channels), gradient G, learning rate η_t, weight decay λ::

    δ ← ‖v‖_c                                              (reference code: the magnitude is reset every step)
    ∇v = G δ/‖v‖_c,   ∇δ = Σ_rows G ⊙ v/‖v‖_c                  (per output column c)
    every T steps:  P_t, Q_t = top-r singular vectors of ∇v    (compact SVD; kept in between)
    R = P_tᵀ ∇v   |  ∇v Q_t   |  P_tᵀ ∇v Q_t                   ("input" | "output" | "full" projection)
    N = α · back(Adam(R)),  back(X) = P_t X | X Q_tᵀ | P_t X Q_tᵀ
    v ← (v − η_t N)(1 − η_t λ),   δ ← (δ − η_t Adam(∇δ))(1 − η_t λ)
    w ← δ v/‖v‖_c

where Adam is the reference's (HuggingFace AdamW, ``correct_bias=True``): ``m/(√s + ε) · √(1−β₂ᵗ)/(1−β₁ᵗ)``
(:func:`scale_by_adam_hf`). Within one projector period the accumulated direction update lies in span(P_t), so
``v = 𝒲₀ + IJ`` with ``I = P_t`` and the weight is the paper's low-rank form ``𝒲 = ℳ (𝒲₀ + IJ)/‖𝒲₀ + IJ‖_c``; the
paper's two-sided projection ``D̃_t = U_t η_t(U_tᵀ D_t V_t) V_tᵀ`` is ``proj_type="full"``.

Where this follows the reference code rather than the paper's text:

* ``δ ← ‖v‖_c`` at the start of every step (``state['g'].data = norm_v``): the learned magnitude acts for one step
  and the norm of v carries the scale between steps; hence ∇v = G exactly. ``reset_magnitude=False`` keeps δ as
  an independent parameter as in the paper's ``w = δ v/‖v‖`` (then ∇v = G δ/‖v‖, still without the tangent
  projection of Salimans & Kingma, as in the code).
* projection sides follow ``GaLoreProjector`` (``proj_type`` "std": the smaller of input/output, ties → input;
  "reverse_std": the larger, ties → output; "input"; "output"; "full"), ``scale`` = the reference's α, the SVD is
  recomputed when ``count % update_proj_gap == 0`` (first step included) from the NaN-cleaned gradient, and the
  low-rank Adam moments are kept across projector refreshes.
* weight decay after the step on v and δ with the plain learning rate, as the code does.

Differences of layout and bookkeeping (same arithmetic):

* Flax kernels are ``[in, out]`` (PyTorch ``[out, in]``): the per-channel norm is over every axis but the last
  (Conv ``[kh, kw, in, out]`` → ``[kh·kw·in, out]``), the matrix view is ``[m = in, n = out]``. PyTorch's "right"
  projector (on the input side of ``[out, in]``) is ``"input"`` here, "left" is ``"output"``.
* v is not stored: its columns are parallel to w's, so ``v = ρ ⊙ w`` with one float32 ratio ``ρ = ‖v‖_c/δ`` per
  output channel (the reference keeps a full copy of v). Optimizer state per projected ``[m, n]`` leaf: the
  projector (r·m, r·n, or both) + 2 low-rank moments + 3n (ρ and δ's moments), vs. AdamW's 2mn.
* The signs of the singular vectors are fixed (largest-|entry| of each positive): the low-rank moments persist
  across refreshes, so the reference's result depends on the backend's arbitrary SVD signs; here it does not.
* Leaves whose path matches ``stacked`` have a leading layer axis (``nn.scan`` layout ``[L, ...]``): each layer
  gets its own norms, SVD and projector (batched), as separate PyTorch Linear layers would.
* The reference weight-normalises every parameter (1-D ones over the whole vector; a zero-initialised bias gives
  0/0). Here ``weight_norm`` and ``project`` choose leaves (default: Flax ``kernel`` leaves); the others get the
  reference's AdamW (``p ← (p − η·Adam(G))(1 − ηλ)``). A weight-normalised column that is exactly zero stays zero.

Relation to ``optax.contrib.galore``: its projection is this module's ``proj_type="reverse_std"`` without weight norm
(tested equal, with the same base Adam), but it cannot project the smaller side (the reference's default "std") or
both sides (the paper's equation), its base optimizer never sees the magnitudes, and the weight-norm step is not
linear in the learning rate, so the projection is written here (SVD, slice, two einsums) with the same
``base_optimizer`` contract. Projectors are stored in the params' dtype (as GaLore and optax do), the SVD and all
arithmetic run in float32, updates come back in the params' dtype.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jaxmodels.optim._common import check_range
from jaxmodels.tree import flatten, select, unflatten

PyTree = Any
MaskSpec = str | Callable[[PyTree], PyTree] | PyTree | None

__all__ = ["GradNormLoRPState", "scale_by_adam_hf", "scale_by_gradnorm_lorp", "gradnorm_lorp", "PROJ_TYPES"]

PROJ_TYPES = ("std", "reverse_std", "input", "output", "full")


def scale_by_adam_hf(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
    """The Adam direction of the GradNormLoRP reference code (Huang et al. 2025, ``LowRankWeightNormAdamW``; the same as
    HuggingFace's ``AdamW(correct_bias=True)`` and GaLore's AdamW)::

        m_t = b1 m + (1 − b1) g,   s_t = b2 s + (1 − b2) g²,   u_t = m_t/(√s_t + ε) · √(1 − b2ᵗ)/(1 − b1ᵗ)

    i.e. ``m̂/(√ŝ + ε/√(1 − b2ᵗ))``; ``optax.scale_by_adam`` adds ε to √ŝ instead (they agree for ε = 0).
    Moments are stored in the updates' dtype, arithmetic is float32. State: ``optax.ScaleByAdamState``."""
    check_range("b1", b1, 0.0, 1.0, hi_open=True)
    check_range("b2", b2, 0.0, 1.0, hi_open=True)
    check_range("eps", eps, 0.0)

    def init_fn(params):
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params),
                                      jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        f32 = jnp.float32
        count = optax.safe_increment(state.count)
        t = count.astype(f32)
        step = jnp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        mu = jax.tree.map(lambda m, g: (b1 * m.astype(f32) + (1 - b1) * g.astype(f32)), state.mu, updates)
        nu = jax.tree.map(lambda s, g: (b2 * s.astype(f32) + (1 - b2) * jnp.square(g.astype(f32))), state.nu, updates)
        out = jax.tree.map(lambda m, s, g: (m / (jnp.sqrt(s) + eps) * step).astype(g.dtype), mu, nu, updates)
        mu = jax.tree.map(lambda m, g: m.astype(g.dtype), mu, updates)
        nu = jax.tree.map(lambda s, g: s.astype(g.dtype), nu, updates)
        return out, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


class GradNormLoRPState(NamedTuple):
    """State of :func:`scale_by_gradnorm_lorp`: ``count`` (int32 step counter; the projectors refresh when
    ``count % update_proj_gap == 0``), ``rho`` (``{path: ‖v‖_c / δ}``, float32 ``[*layers, n]``, for the
    weight-normalised leaves), ``projector`` (``{path: P [*layers, m, r] | Q [*layers, n, r] | (P, Q)}``, for the
    projected leaves) and ``base`` (the base optimizer's state over ``{"direction": {path: R or G}, "magnitude":
    {path: ∇δ}}``)."""

    count: jax.Array  # int32 step counter (projectors refresh when count % update_proj_gap == 0)
    rho: dict  # {path: ‖v‖_c / δ}, float32, shape [*layers, n], for the weight-normalised leaves
    projector: dict  # {path: P [*layers, m, r] | Q [*layers, n, r] | (P, Q)}, for the projected leaves
    base: Any  # base optimizer state over {"direction": {path: R or G}, "magnitude": {path: ∇δ}}


class _Leaf(NamedTuple):  # static description of one leaf
    batch: tuple  # leading layer axes (stacked leaves: (L,))
    m: int  # rows of the matrix view (input side)
    n: int  # columns (output channels)
    wn: bool
    side: str | None  # "input" | "output" | "full" | None (not projected)
    r: int  # effective rank


def _resolve_mask(spec: MaskSpec, params: PyTree) -> dict:
    if spec is None:
        return {k: False for k in flatten(params)}
    if isinstance(spec, str):
        return flatten(select(params, include=spec))
    tree = spec(params) if callable(spec) else spec
    return {k: bool(v) for k, v in flatten(tree).items()}


def _side(proj_type: str, m: int, n: int) -> str:
    if proj_type == "std":  # project the smaller dimension (reference: out >= in -> "right" = input side)
        return "input" if m <= n else "output"
    if proj_type == "reverse_std":  # the larger one (reference: out >= in -> "left" = output side)
        return "input" if m > n else "output"
    return proj_type


def _describe(path: str, x, wn: bool, proj: bool, stacked: re.Pattern | None, rank: int, proj_type: str) -> _Leaf:
    shape = tuple(x.shape)
    nb = 1 if (stacked is not None and stacked.search(path)) else 0
    if nb and len(shape) < 1:
        raise ValueError(f"gradnorm_lorp: stacked leaf {path!r} has no leading layer axis (shape {shape})")
    batch, core = shape[:nb], shape[nb:]
    if len(core) >= 2:
        m, n = math.prod(core[:-1]), core[-1]
    else:  # vectors / scalars: one "column" (the reference's whole-vector norm of 1-D weights)
        m, n = max(math.prod(core), 1), 1
    side, r = None, 0
    if proj:
        if len(core) < 2:
            raise ValueError(f"gradnorm_lorp: cannot project {path!r} of shape {shape}: low-rank projection needs a "
                             f"matrix (ndim >= 2{' after the layer axis' if nb else ''}); exclude it from `project`")
        side, r = _side(proj_type, m, n), min(rank, m, n)
    return _Leaf(batch, m, n, wn, side, r)


def _canonical_signs(u: jax.Array) -> jax.Array:
    """Flip each column of ``u [..., d, r]`` so that its largest-magnitude entry is positive."""
    idx = jnp.argmax(jnp.abs(u), axis=-2)[..., None, :]
    s = jnp.sign(jnp.take_along_axis(u, idx, axis=-2))
    return u * jnp.where(s == 0, 1.0, s)


def _projector(a: jax.Array, side: str, r: int, dtype) -> Any:
    """Top-r singular vectors of ``a [..., m, n]`` (float32 SVD of the NaN-cleaned matrix, as the reference)."""
    a = jnp.nan_to_num(a.astype(jnp.float32), nan=1e-9)
    u, _, vh = jnp.linalg.svd(a, full_matrices=False)
    p = _canonical_signs(u[..., :, :r]).astype(dtype)
    q = _canonical_signs(jnp.swapaxes(vh[..., :r, :], -1, -2)).astype(dtype)
    return {"input": p, "output": q, "full": (p, q)}[side]


def _down(a, proj, side):
    f = lambda x: x.astype(jnp.float32)  # noqa: E731
    if side == "input":
        return jnp.einsum("...mr,...mn->...rn", f(proj), a)
    if side == "output":
        return jnp.einsum("...mn,...nr->...mr", a, f(proj))
    return jnp.einsum("...mr,...mn,...ns->...rs", f(proj[0]), a, f(proj[1]))


def _up(x, proj, side):
    f = lambda y: y.astype(jnp.float32)  # noqa: E731
    if side == "input":
        return jnp.einsum("...mr,...rn->...mn", f(proj), x)
    if side == "output":
        return jnp.einsum("...mr,...nr->...mn", x, f(proj))
    return jnp.einsum("...mr,...rs,...ns->...mn", f(proj[0]), x, f(proj[1]))


def _low_shape(d: _Leaf) -> tuple:
    return d.batch + {"input": (d.r, d.n), "output": (d.m, d.r), "full": (d.r, d.r)}[d.side]


def _zeros_projector(d: _Leaf, dtype):
    p, q = jnp.zeros(d.batch + (d.m, d.r), dtype), jnp.zeros(d.batch + (d.n, d.r), dtype)
    return {"input": p, "output": q, "full": (p, q)}[d.side]


def scale_by_gradnorm_lorp(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    weight_decay: float = 0.0,
    reset_magnitude: bool = True,
    base_optimizer: optax.GradientTransformation | None = None,
    weight_norm: MaskSpec = r"kernel$",
    project: MaskSpec = r"kernel$",
    stacked: str | None = r"(^|/)layers/",
) -> optax.GradientTransformation:
    """GradNormLoRP (Huang et al., AAAI 2025), one step as in the module docstring, returning ``w_{t+1} − w_t``::

        w = δ v/‖v‖_c,   v ← (v − η α P·B(Pᵀ∇v))(1 − ηλ),   δ ← (δ − η B(∇δ))(1 − ηλ)     (B: base_optimizer)

    The learning rate (float or schedule of the step count) is applied inside: the weight-norm reconstruction
    ``w = δ v/‖v‖`` is not linear in it. ``base_optimizer`` (default :func:`scale_by_adam_hf`) is a gradient-only
    transform run on ``{"direction": {path: low-rank R, or G for unprojected leaves}, "magnitude": {path: ∇δ}}``
    (as with ``optax.contrib.scale_by_galore``'s ``base_optimizer``; do not put weight decay or a learning rate in it).

    ``weight_norm`` / ``project`` select the leaves that are weight-normalised / low-rank projected: a path regex
    (``re.search`` on ``jaxmodels.flatten`` paths), a tree of bools, a callable ``params -> tree of bools``, or None
    (no leaf). Leaves matching ``stacked`` carry a leading layer axis and are handled per layer.
    """
    for name, value in (("rank", rank), ("update_proj_gap", update_proj_gap)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"gradnorm_lorp: {name} must be a positive integer, got {value!r}")
    rank, update_proj_gap = int(rank), int(update_proj_gap)
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"gradnorm_lorp: proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    check_range("learning_rate", learning_rate, 0.0)
    check_range("scale", scale, 0.0, lo_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    base = scale_by_adam_hf() if base_optimizer is None else base_optimizer
    stacked_re = re.compile(stacked) if stacked is not None else None

    def describe(params) -> dict[str, _Leaf]:
        flat = flatten(params)
        wn, pr = _resolve_mask(weight_norm, params), _resolve_mask(project, params)
        return {k: _describe(k, x, wn[k], pr[k], stacked_re, rank, proj_type) for k, x in flat.items()}

    def init_fn(params):
        flat, desc = flatten(params), describe(params)
        rho = {k: jnp.ones(d.batch + (d.n,), jnp.float32) for k, d in desc.items() if d.wn}
        projector = {k: _zeros_projector(d, flat[k].dtype) for k, d in desc.items() if d.side}
        proxy = {"direction": {k: jnp.zeros(_low_shape(d), x.dtype) if d.side else jnp.zeros_like(x)
                               for (k, x), d in zip(flat.items(), desc.values())},
                 "magnitude": {k: jnp.zeros(d.batch + (d.n,), flat[k].dtype) for k, d in desc.items() if d.wn}}
        return GradNormLoRPState(jnp.zeros([], jnp.int32), rho, projector, base.init(proxy))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("gradnorm_lorp: update needs `params` (the weights are reparameterised)")
        chex.assert_trees_all_equal_shapes(updates, params)
        flat_g, flat_p, desc = flatten(updates), flatten(params), describe(params)
        f32 = jnp.float32
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, f32)
        decay = 1.0 - lr * weight_decay

        def view(x, d):
            return x.astype(f32).reshape(d.batch + (d.m, d.n))

        # 1. weight-norm split: v = ρ w, δ, ∇v, ∇δ (matrix views [..., m, n], columns = output channels)
        v, delta, grad_v, grad_delta = {}, {}, {}, {}
        for k, d in desc.items():
            g, w = view(flat_g[k], d), view(flat_p[k], d)
            if not d.wn:
                v[k], grad_v[k] = w, g
                continue
            rho = state.rho[k]
            vk = w * rho[..., None, :]
            nv = jnp.sqrt(jnp.sum(vk * vk, axis=-2))
            safe = jnp.where(nv > 0, nv, 1.0)
            if reset_magnitude:  # δ ← ‖v‖ (reference): ∇v = G δ/‖v‖ = G
                dk, gv = nv, g
            else:
                dk = jnp.where(rho != 0, nv / jnp.where(rho != 0, rho, 1.0), 0.0)
                gv = g * (dk / safe)[..., None, :]
            v[k], delta[k], grad_v[k] = vk, dk, gv
            grad_delta[k] = jnp.sum(g * vk / safe[..., None, :], axis=-2)

        # 2. projectors: refreshed from the SVD of ∇v every update_proj_gap steps (one cond for all leaves)
        proj_keys = [k for k, d in desc.items() if d.side]

        def refresh():
            return {k: _projector(grad_v[k], desc[k].side, desc[k].r, flat_p[k].dtype) for k in proj_keys}

        projector = state.projector
        if proj_keys:
            projector = jax.lax.cond(state.count % update_proj_gap == 0, refresh, lambda: state.projector)

        # 3. base optimizer (Adam) on the low-rank direction gradients and the magnitudes' gradients
        direction_in = {}
        for k, d in desc.items():
            dt = flat_p[k].dtype
            if d.side:
                direction_in[k] = _down(grad_v[k], projector[k], d.side).astype(dt)
            else:
                direction_in[k] = grad_v[k].reshape(flat_p[k].shape).astype(dt)
        base_in = {"direction": direction_in,
                   "magnitude": {k: grad_delta[k].astype(flat_p[k].dtype) for k in grad_delta}}
        base_out, base_state = base.update(base_in, state.base)

        # 4. project back, step, decay, reconstruct w = δ v/‖v‖
        out, new_rho = {}, {}
        for k, d in desc.items():
            u = base_out["direction"][k].astype(f32)
            u = scale * _up(u, projector[k], d.side) if d.side else u.reshape(d.batch + (d.m, d.n))
            v_new = (v[k] - lr * u) * decay
            if d.wn:
                d_new = (delta[k] - lr * base_out["magnitude"][k].astype(f32)) * decay
                n_new = jnp.sqrt(jnp.sum(v_new * v_new, axis=-2))
                w_new = v_new * (d_new / jnp.where(n_new > 0, n_new, 1.0))[..., None, :]
                new_rho[k] = jnp.where(d_new != 0, n_new / jnp.where(d_new != 0, d_new, 1.0), 0.0)
            else:
                w_new = v_new
            w_old = view(flat_p[k], d)
            out[k] = (w_new - w_old).reshape(flat_p[k].shape).astype(flat_g[k].dtype)

        new_state = GradNormLoRPState(optax.safe_increment(state.count), new_rho, projector, base_state)
        return unflatten(out, like=updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def gradnorm_lorp(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    reset_magnitude: bool = True,
    weight_norm: MaskSpec = r"kernel$",
    project: MaskSpec = r"kernel$",
    stacked: str | None = r"(^|/)layers/",
) -> optax.GradientTransformation:
    """GradNormLoRP (Huang et al., AAAI 2025) with the reference's AdamW (``LowRankWeightNormAdamW``; defaults as its
    ``__init__`` and ``optax.contrib.galore``): :func:`scale_by_gradnorm_lorp` with
    ``base_optimizer=scale_by_adam_hf(b1, b2, eps)``, i.e. for each selected kernel (module docstring)::

        w = δ v/‖v‖_c,   v ← (v − η α P·Adam(Pᵀ∇v))(1 − ηλ),   δ ← (δ − η Adam(∇δ))(1 − ηλ)

    With ``project=None`` it is the reference's weight-normalised AdamW (``rank=None``); with
    ``weight_norm=None, project=None`` the reference's AdamW (``p ← (p − η·u)(1 − ηλ)``)."""
    return scale_by_gradnorm_lorp(learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                                  proj_type=proj_type, weight_decay=weight_decay, reset_magnitude=reset_magnitude,
                                  base_optimizer=scale_by_adam_hf(b1, b2, eps), weight_norm=weight_norm,
                                  project=project, stacked=stacked)
