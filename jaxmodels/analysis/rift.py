"""RiFT: module robust criticality (MRC), fine-tuning the least robust-critical module, and interpolating back.

Zhu, Zhang, Li et al., "Improving Generalization of Adversarial Training via Robust Critical Fine-Tuning" (ICCV
2023), as the authors' code does it (github.com/microsoft/robustlearn, ``RiFT/main.py`` ``layer_sharpness``,
``RiFT/utils.py`` ``interpolation``). For an adversarially trained model ``θ`` and a loss ``L(θ)`` on adversarial
examples of ``θ`` (generated once, the reference's ``generate_adv_dataset``), the MRC of module ``i`` (one weight
leaf; the reference perturbs Conv / Linear weights, not biases) is the worst-case loss increase when only that
module moves within a ball relative to its norm::

    MRC(θ_i) = max_{‖Δ‖₂ ≤ ε‖θ_i‖₂}  L(θ + Δ·e_i) − L(θ)                                 (ε = 0.1 in the paper)

computed by projected gradient ascent on the module's perturbation (the reference: SGD with lr 1 on ``-L``, the
perturbation projected back onto the ball after each epoch, for 10 epochs; the maximum loss seen is kept)::

    Δ_0 = 0,   Δ_{t+1} = Π_ε( Δ_t + lr ∇_Δ L(θ + Δ_t e_i) ),   MRC = max_{t ≥ 1} L(θ + Δ_t e_i) − L(θ)

where ``Π_ε`` rescales ``Δ`` to norm ``ε‖θ_i‖`` when it is longer. The module with the lowest MRC is the
"non-robust-critical" one; RiFT fine-tunes only it (on clean data: ``finetune_module``) to ``θ_ft`` and then picks
the interpolation ``θ(α) = (1 − α) θ + α θ_ft`` over a grid (``α ∈ {0, 0.1, .., 1}`` as the reference) with the
best generalization metric among those that keep adversarial robustness (``select_interpolation``: the highest
``metric_fn`` with ``constraint_fn(θ(α)) ≥ constraint_fn(θ) − tolerance``; the reference logs the grid and the
paper picks by hand). Here ``lr`` and ``steps`` are full-batch steps of the given ``data``.

API::

    crit = module_robust_criticality(loss_fn, params, (x_adv, y))      # {path: ModuleCriticality}, tree order
    path = least_critical_module(crit)
    ft = finetune_module(loss_fn, params, (x, y), path, optax.adam(1e-3), steps=100)
    best = select_interpolation(params, ft.params, clean_acc_fn, constraint_fn=robust_acc_fn, tolerance=0.01)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.tree import filter_paths, flatten, is_concrete, unflatten

PyTree = Any

__all__ = ["ModuleCriticality", "FinetuneResult", "InterpolationChoice", "module_robust_criticality",
           "least_critical_module", "finetune_module", "interpolate", "select_interpolation"]


class ModuleCriticality(NamedTuple):
    """One module's MRC: ``mrc = perturbed_loss − base_loss``, and ``‖Δ‖ / ‖θ_i‖`` of the maximizing step."""

    mrc: jax.Array
    base_loss: jax.Array
    perturbed_loss: jax.Array
    relative_norm: jax.Array


class FinetuneResult(NamedTuple):
    """Parameters after fine-tuning one module, and the loss before each step ``[steps]``."""

    params: PyTree
    losses: jax.Array


class InterpolationChoice(NamedTuple):
    """The chosen ``alpha`` and ``params = (1 − alpha) θ + alpha θ_ft``, with the grid ``alphas``, ``metrics`` and
    ``constraints`` (NaN without a ``constraint_fn``) evaluated at every grid point."""

    alpha: jax.Array
    params: PyTree
    alphas: jax.Array
    metrics: jax.Array
    constraints: jax.Array


def _check_params(params):
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params has no leaves")
    for p, leaf in flatten(params).items():
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"params leaf {p!r} must be a floating-point array")
        if is_concrete(leaf) and not np.isfinite(np.asarray(leaf, np.float32)).all():
            raise ValueError(f"params leaf {p!r} holds NaN or Inf")


def _replace(params, path, leaf):
    flat = dict(flatten(params))
    flat[path] = leaf
    return unflatten(flat, like=params)


def module_robust_criticality(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, data: Any, *,
                              modules: str | Sequence[str] = r"kernel$", exclude: str | Sequence[str] | None = None,
                              epsilon: float = 0.1, steps: int = 10, lr: float = 1.0) -> dict[str, ModuleCriticality]:
    """MRC of every leaf of ``params`` whose path matches ``modules`` (regex, ``re.search``; default the Dense / Conv
    kernels) and no ``exclude``: projected gradient ascent of ``loss_fn(params, data)`` (a scalar; on adversarial
    examples in RiFT) on that leaf's perturbation within ``‖Δ‖ ≤ epsilon·‖θ_i‖``, ``steps`` steps of size ``lr``
    (module docstring). Returns ``{path: ModuleCriticality}`` in tree order; ``params`` is not modified. One
    compilation per module shape and ``loss_fn`` (keep the same function object).

    >>> crit = module_robust_criticality(lambda p, d: ce(apply(p, d[0]), d[1]), params, (x_adv, y), epsilon=0.1)
    >>> {k: float(v.mrc) for k, v in crit.items()}
    """
    _check_params(params)
    if not float(epsilon) > 0.0 or not np.isfinite(float(epsilon)):
        raise ValueError(f"epsilon must be a finite value > 0, got {epsilon}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not float(lr) > 0.0 or not np.isfinite(float(lr)):
        raise ValueError(f"lr must be a finite value > 0, got {lr}")
    chosen = filter_paths(params, modules, exclude)
    if not chosen:
        raise ValueError(f"no leaf of params matches modules={modules!r} (exclude={exclude!r})")
    out = {}
    for path in chosen:
        out[path] = _mrc(loss_fn, path, params, data, jnp.float32(epsilon), jnp.float32(lr), steps=int(steps))
    return out


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("steps",))
def _mrc(loss_fn, path, params, data, epsilon, lr, *, steps):
    theta = flatten(params)[path]
    radius = epsilon * jnp.linalg.norm(theta.astype(jnp.float32))

    def loss_at(delta):
        return loss_fn(_replace(params, path, (theta + delta).astype(theta.dtype)), data).astype(jnp.float32)

    base = loss_at(jnp.zeros_like(theta))

    def body(carry, _):
        delta, best, best_norm = carry
        delta = delta + lr * jax.grad(loss_at)(delta)
        norm = jnp.linalg.norm(delta.astype(jnp.float32))
        delta = delta * jnp.minimum(1.0, radius / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)).astype(delta.dtype)
        val = loss_at(delta)
        better = val > best
        rel = jnp.linalg.norm(delta.astype(jnp.float32)) / jnp.maximum(radius / epsilon, jnp.finfo(jnp.float32).tiny)
        return (delta, jnp.where(better, val, best), jnp.where(better, rel, best_norm)), None

    init = (jnp.zeros_like(theta), jnp.float32(-jnp.inf), jnp.float32(0.0))
    (_, best, rel), _ = jax.lax.scan(body, init, None, length=steps)
    return ModuleCriticality(best - base, base, best, rel)


def least_critical_module(criticality: Mapping[str, ModuleCriticality]) -> str:
    """The path with the lowest MRC (RiFT's non-robust-critical module; ties: the first in tree order).

    >>> path = least_critical_module(module_robust_criticality(loss_fn, params, adv_data))
    """
    if not criticality:
        raise ValueError("criticality is empty")
    vals = {k: float(v.mrc) for k, v in criticality.items()}
    if not all(np.isfinite(v) for v in vals.values()):
        raise ValueError(f"criticality holds a non-finite MRC: {vals}")
    return min(vals, key=vals.get)


def finetune_module(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, data: Any, module: str,
                    tx: optax.GradientTransformation, *, steps: int) -> FinetuneResult:
    """``steps`` full-batch steps of ``tx`` on ``loss_fn(params, data)`` updating only the leaf ``module`` (a path
    of :func:`jaxmodels.tree.flatten`); every other leaf is returned unchanged. Call again with new ``data`` for
    minibatches (the optimizer state restarts).

    >>> ft = finetune_module(clean_loss, params, (x, y), "Dense_1/kernel", optax.adam(1e-3), steps=100)
    """
    _check_params(params)
    if module not in flatten(params):
        raise ValueError(f"module {module!r} is not a leaf path of params; paths: {list(flatten(params))}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _finetune(loss_fn, module, tx, params, data, steps=int(steps))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("steps",))
def _finetune(loss_fn, module, tx, params, data, *, steps):
    def loss_leaf(leaf):
        return loss_fn(_replace(params, module, leaf), data)

    def body(carry, _):
        leaf, state = carry
        loss, g = jax.value_and_grad(loss_leaf)(leaf)
        upd, state = tx.update(g, state, leaf)
        return (optax.apply_updates(leaf, upd), state), loss

    leaf0 = flatten(params)[module]
    (leaf, _), losses = jax.lax.scan(body, (leaf0, tx.init(leaf0)), None, length=steps)
    return FinetuneResult(_replace(params, module, leaf), losses.astype(jnp.float32))


def interpolate(params_a: PyTree, params_b: PyTree, alpha) -> PyTree:
    """``(1 − alpha)·params_a + alpha·params_b`` leaf by leaf (in each leaf's dtype; ``alpha`` may be traced).

    >>> mid = interpolate(params_at, params_ft, 0.5)
    """
    if jax.tree_util.tree_structure(params_a) != jax.tree_util.tree_structure(params_b):
        raise ValueError("params_a and params_b must have the same tree structure")
    for (p, a), b in zip(flatten(params_a).items(), jax.tree_util.tree_leaves(params_b)):
        if a.shape != b.shape:
            raise ValueError(f"leaf {p!r}: shapes {a.shape} and {b.shape} differ")
    return jax.tree.map(lambda a, b: ((1 - alpha) * a.astype(jnp.float32) + alpha * b.astype(jnp.float32))
                        .astype(a.dtype), params_a, params_b)


def select_interpolation(params: PyTree, params_ft: PyTree, metric_fn: Callable[[PyTree], jax.Array], *,
                         constraint_fn: Callable[[PyTree], jax.Array] | None = None, tolerance: float = 0.0,
                         alphas: Sequence[float] | None = None) -> InterpolationChoice:
    """RiFT's last step: over the grid ``alphas`` (default ``0, 0.1, .., 1``) of ``θ(α) = (1 − α) params +
    α params_ft``, the ``α`` with the highest ``metric_fn(θ(α))`` (e.g. clean validation accuracy) among those with
    ``constraint_fn(θ(α)) ≥ constraint_fn(params) − tolerance`` (e.g. robust accuracy; every α when None). Ties go
    to the smallest α; α = 0 (``params`` itself) is chosen when no other point qualifies.

    >>> best = select_interpolation(p_at, ft.params, val_acc, constraint_fn=val_robust_acc, tolerance=0.01)
    """
    if float(tolerance) < 0 or not np.isfinite(float(tolerance)):
        raise ValueError(f"tolerance must be a finite value >= 0, got {tolerance}")
    grid = np.round(np.arange(0.0, 1.0 + 1e-9, 0.1), 10) if alphas is None else np.asarray(alphas, np.float32)
    if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all():
        raise ValueError(f"alphas must be a non-empty 1-D sequence of finite values, got {alphas}")
    if not np.any(grid == 0.0):
        grid = np.concatenate([[0.0], grid])
    _check_params(params)
    _check_params(params_ft)
    interpolate(params, params_ft, 0.0)  # structure / shape check
    grid = jnp.asarray(grid, jnp.float32)

    def evaluate(a):
        p = interpolate(params, params_ft, a)
        m = jnp.asarray(metric_fn(p), jnp.float32)
        c = jnp.asarray(constraint_fn(p), jnp.float32) if constraint_fn is not None else jnp.float32(jnp.nan)
        return m, c

    metrics, constraints = jax.lax.map(evaluate, grid)
    if constraint_fn is None:
        ok = jnp.ones_like(metrics, bool)
    else:
        ok = constraints >= constraints[jnp.argmin(jnp.abs(grid))] - float(tolerance)
    ok = ok | (grid == 0.0)
    idx = jnp.argmax(jnp.where(ok, metrics, -jnp.inf))
    alpha = grid[idx]
    return InterpolationChoice(alpha, interpolate(params, params_ft, alpha), grid, metrics, constraints)
