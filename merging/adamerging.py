"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024).

Merged model from task vectors ``τ_k = θ_k − θ_0`` with learned coefficients:

* task-wise:  ``θ = θ_0 + Σ_k λ_k τ_k``
* layer-wise: ``θ^l = θ_0^l + Σ_k λ_k^l τ_k^l`` (one coefficient per parameter tensor ``l`` per task, as in the
  paper's code)

``λ`` minimizes the Shannon entropy of the merged model's predictions on *unlabeled* test batches of every task::

    min_λ  Σ_k  E_{x ∈ B_k} H(softmax(f(θ(λ), x))),      H(p) = −Σ_c p_c log p_c

with Adam (optax), ``λ`` initialized to ``init`` (paper: 0.3) and clipped to ``[0, 1]`` at use as in the paper's code
(``clamp=None`` disables it).

:func:`learn_coefficients` is the shared engine (also used by :mod:`merging.atlas`). Calling convention (package
docstring): ``adamerging(base, models, apply_fn, batches)``; ``base`` is the pre-trained ``θ_0`` the task vectors are
relative to (required); returns ``MergeResult(params, info)`` with ``info["coefficients"]`` (per parameter path:
``[K]`` λ as used, i.e. clipped; task-wise: ``{"*": [K]}``) and ``info["losses"]`` (the objective per step).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.progress import progress_bar
from jaxmodels.tree import flatten, unflatten
from merging._common import cycle_batches, validate_trees
from merging.result import MergeResult

PyTree = Any

__all__ = ["adamerging", "entropy", "learn_coefficients", "merge_with_coefficients"]


def entropy(logits: jax.Array) -> jax.Array:
    """Mean Shannon entropy of ``softmax(logits)`` over all leading axes."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1).mean()


def _combine(base_leaves, tv_leaves, coeffs, granularity, clamp):
    if clamp is not None:
        coeffs = jnp.clip(coeffs, clamp[0], clamp[1])
    out = []
    for l, b in enumerate(base_leaves):
        c = coeffs if granularity == "task" else coeffs[:, l]
        acc = b.astype(jnp.float32)
        for k in range(len(tv_leaves)):
            acc = acc + c[k] * tv_leaves[k][l].astype(jnp.float32)
        out.append(acc.astype(b.dtype))
    return out


# one compiled program each (cached by shapes) instead of one per leaf op, or one per call of a fresh lambda
_combine_jit = jax.jit(_combine, static_argnums=(3, 4))
_task_vectors = jax.jit(lambda ms, b: [[m - x for m, x in zip(mm, b)] for mm in ms])


def merge_with_coefficients(base: PyTree, models: Sequence[PyTree], coefficients, *,
                            granularity: str = "layer", clamp=None) -> PyTree:
    """``θ_0 + Σ_k λ_k (θ_k − θ_0)``: ``coefficients`` is ``[K]`` (task-wise) or ``[K, n_leaves]`` (layer-wise, in
    ``jaxmodels.flatten`` order)."""
    fb = flatten(base)
    tvs = [[(m - b) for m, b in zip(flatten(mm).values(), fb.values())] for mm in models]
    leaves = _combine(list(fb.values()), tvs, jnp.asarray(coefficients, jnp.float32), granularity, clamp)
    return unflatten(dict(zip(fb.keys(), leaves)), like=base)


def learn_coefficients(base: PyTree, models: Sequence[PyTree], objective: Callable[[PyTree, Sequence[Any]], jax.Array],
                       batches: Sequence[Iterable], *, granularity: str = "layer",
                       init: float = 0.3, steps: int = 100, optimizer: optax.GradientTransformation | None = None,
                       learning_rate: float = 1e-3, clamp: tuple[float, float] | None = (0.0, 1.0),
                       check_finite: bool = True, progress: bool | None = None,
                       desc: str = "merge coefficients") -> MergeResult:
    """Minimize ``objective(merged_params, [one batch per batch stream])`` over the merge coefficients with optax.

    ``batches``: one re-iterable per stream (e.g. per task), cycled; each step takes the next batch of every
    stream. ``granularity``: ``"task"`` (``λ [K]``) or ``"layer"`` (``λ [K, n_leaves]``, one per parameter tensor).
    Returns ``MergeResult(params, {"coefficients": ..., "losses": ...})`` (see the module docstring).
    """
    models = list(models)
    if not models:
        raise ValueError(f"{desc}: needs at least one model")
    if granularity not in ("task", "layer"):
        raise ValueError(f"{desc}: granularity must be 'task' or 'layer', got {granularity!r}")
    if steps < 1:
        raise ValueError(f"{desc}: steps must be >= 1, got {steps}")
    if clamp is not None and not clamp[0] <= clamp[1]:
        raise ValueError(f"{desc}: clamp must be (low, high) with low <= high, got {clamp}")
    if not batches:
        raise ValueError(f"{desc}: needs at least one batch stream")
    if base is None:
        raise ValueError(f"{desc}: needs `base`, the pre-trained model the task vectors are relative to")
    validate_trees(base, models, desc, check_finite=check_finite)
    fb = flatten(base)
    keys = list(fb)
    base_leaves = list(fb.values())
    tvs = _task_vectors([list(flatten(m).values()) for m in models], base_leaves)
    K, L = len(models), len(keys)
    coeffs = jnp.full((K,) if granularity == "task" else (K, L), init, jnp.float32)
    tx = optimizer if optimizer is not None else optax.adam(learning_rate)
    opt_state = tx.init(coeffs)

    def loss_fn(c, bl, tv, bs):
        params = unflatten(dict(zip(keys, _combine(bl, tv, c, granularity, clamp))), like=base)
        return objective(params, bs)

    @jax.jit
    def step(c, s, bl, tv, bs):
        loss, g = jax.value_and_grad(loss_fn)(c, bl, tv, bs)
        u, s = tx.update(g, s, c)
        return optax.apply_updates(c, u), s, loss

    streams = [cycle_batches(b, "learn_coefficients") for b in batches]
    losses = []
    for _ in progress_bar(range(steps), progress, desc=desc, leave=False):
        bs = [next(s) for s in streams]
        coeffs, opt_state, loss = step(coeffs, opt_state, base_leaves, tvs, bs)
        losses.append(float(loss))
    final = _combine_jit(base_leaves, tvs, coeffs, granularity, None if clamp is None else tuple(clamp))
    used = coeffs if clamp is None else jnp.clip(coeffs, *clamp)
    used = np.asarray(used)
    coef = {"*": used} if granularity == "task" else {k: used[:, i] for i, k in enumerate(keys)}
    return MergeResult(unflatten(dict(zip(keys, final)), like=base),
                       {"coefficients": coef, "losses": np.asarray(losses)})


def adamerging(base: PyTree, models: Sequence[PyTree], apply_fn: Callable, batches: Sequence[Iterable], *,
               granularity: str = "layer", init: float = 0.3, steps: int = 100, learning_rate: float = 1e-3,
               clamp: tuple[float, float] | None = (0.0, 1.0), check_finite: bool = True,
               progress: bool | None = None) -> MergeResult:
    """AdaMerging: ``batches[k]`` are unlabeled input batches of task ``k`` (arrays ``apply_fn`` accepts; a tuple
    ``(x, y)`` is also accepted and its labels ignored). Objective: ``Σ_k mean entropy(f(θ(λ), x_k))``."""
    if len(batches) != len(models):
        raise ValueError(f"adamerging: {len(batches)} batch streams for {len(models)} models (one per task)")

    def objective(params, bs):
        total = 0.0
        for b in bs:
            x = b[0] if isinstance(b, (tuple, list)) else b
            total = total + entropy(apply_fn(params, x))
        return total

    return learn_coefficients(base, models, objective, batches, granularity=granularity, init=init, steps=steps,
                              learning_rate=learning_rate, clamp=clamp, check_finite=check_finite, progress=progress,
                              desc="adamerging")
