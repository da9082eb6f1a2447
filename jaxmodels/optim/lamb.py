"""LAMB: layer-wise adaptive moments for large-batch training.

You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes" (ICLR 2020), Algorithm 2::

    m_t = b1 m_{t-1} + (1 - b1) g_t,        v_t = b2 v_{t-1} + (1 - b2) g_t^2
    r_t = m̂_t / (sqrt(v̂_t) + eps)                                   (Adam direction, bias corrected)
    u_t = r_t + λ x_t                                                (decoupled weight decay)
    x_{t+1} = x_t - η_t · φ(‖x_t‖) / ‖u_t‖ · u_t                      (layer-wise trust ratio, per leaf)

with φ(z) = z by default or φ(z) = min(max(z, γ_l), γ_u) (``phi_bounds``, the paper's Section 3 choice). Zero norms:

* φ = identity (no ``phi_bounds``): optax's convention, the ratio is 1 when ‖x_t‖ = 0 or ‖u_t‖ = 0 (the paper's
  ratio would be 0/‖u‖ = 0 and a freshly zero-initialised bias would never move).
* ``phi_bounds=(γ_l, γ_u)``: the paper as written, φ(0) = γ_l, so a zero leaf gets the ratio γ_l / ‖u_t‖ (and 0 if
  γ_l = 0). Only ‖u_t‖ = 0 (a zero update, which stays zero whatever the ratio) uses ratio 1.

Differences from ``optax.lamb`` (with defaults this module *equals* ``optax.lamb``; tested):

* ``trust_ratio_on_undecayed=False`` skips the trust ratio on leaves excluded from weight decay (biases, norm scales
  via ``exclude=r"(bias|scale)$"``), as NVIDIA's and HuggingFace's LAMB do; optax applies it to every leaf.
* ``trust_clip`` caps the ratio (LAMBC, Fong et al. 2020, "Improving LAMB with trust ratio clipping": ratio ≤ c,
  typically c = 1).
* ``max_grad_norm`` clips the global gradient norm before the Adam moments (NVIDIA's pre-normalisation).
* ``phi_bounds`` implements the paper's clipped scaling function φ.

"Layer" means pytree leaf (as in optax): a scanned/stacked kernel ``[L, ...]`` gets one trust ratio for the stack.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxmodels.optim._common import NO_PARAMS_MSG, check_range, norm, path_mask

PyTree = Any

__all__ = ["scale_by_layerwise_trust_ratio", "lamb"]


def scale_by_layerwise_trust_ratio(
    phi_bounds: tuple[float, float] | None = None,
    trust_clip: float | None = None,
    trust_coefficient: float = 1.0,
    eps: float = 0.0,
    mask: PyTree | Callable | None = None,
) -> optax.GradientTransformation:
    """Scale each leaf's update by ``c · φ(‖w‖) / (‖u‖ + eps)``, capped at ``trust_clip``. Zero norms (module
    docstring): ratio 1 if ‖u‖ = 0, and if ‖w‖ = 0 without ``phi_bounds``; with ``phi_bounds`` φ(0) = γ_l.

    ``mask`` (tree of bools or callable, as in ``optax.masked``) selects the leaves that get the ratio; others pass
    through unchanged. Norms are per leaf and computed in float32.
    """
    check_range("trust_coefficient", trust_coefficient, 0.0, lo_open=True)
    check_range("eps", eps, 0.0)
    if trust_clip is not None:
        check_range("trust_clip", trust_clip, 0.0, lo_open=True)
    if phi_bounds is not None:
        lo, hi = phi_bounds
        if not 0.0 <= lo <= hi:
            raise ValueError(f"phi_bounds must satisfy 0 <= lower <= upper, got {phi_bounds}")

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(NO_PARAMS_MSG)

        def one(u, w):
            w_norm = norm(w)
            u_norm = norm(u)
            phi = w_norm if phi_bounds is None else jnp.clip(w_norm, phi_bounds[0], phi_bounds[1])
            ratio = trust_coefficient * phi / (u_norm + eps)
            # φ = identity: optax's ratio 1 at ‖w‖ = 0; clipped φ: the paper's φ(0) = γ_l (see module docstring).
            zero = (u_norm == 0.0) if phi_bounds is not None else (w_norm == 0.0) | (u_norm == 0.0)
            ratio = jnp.where(zero, 1.0, ratio)
            if trust_clip is not None:
                ratio = jnp.minimum(ratio, trust_clip)
            return (u * ratio.astype(u.dtype)) if u is not None else None

        return jax.tree.map(one, updates, params), state

    tx = optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: PyTree | Callable | None = None,
    exclude: str | None = None,
    trust_ratio_on_undecayed: bool = True,
    trust_clip: float | None = None,
    phi_bounds: tuple[float, float] | None = None,
    max_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """LAMB (see module docstring). ``mask``/``exclude`` choose the leaves that get weight decay: ``exclude`` is a path
    regex (e.g. ``r"(bias|scale)$"``) combined with ``mask`` by AND. With ``trust_ratio_on_undecayed=False`` the
    same leaves also skip the trust ratio (update = η r_t there)."""
    check_range("b1", b1, 0.0, 1.0, hi_open=True)
    check_range("b2", b2, 0.0, 1.0, hi_open=True)
    check_range("eps", eps, 0.0)
    check_range("eps_root", eps_root, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    if max_grad_norm is not None:
        check_range("max_grad_norm", max_grad_norm, 0.0, lo_open=True)
    decay_mask = path_mask(mask, exclude)
    parts = []
    if max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts += [
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        optax.add_decayed_weights(weight_decay, decay_mask),
        scale_by_layerwise_trust_ratio(phi_bounds=phi_bounds, trust_clip=trust_clip,
                                       mask=None if trust_ratio_on_undecayed else decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    ]
    return optax.chain(*parts)
