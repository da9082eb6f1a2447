"""Error feedback for compressed updates (EF21 and classic EF) with top-k and layer-wise adaptive ratios (L-GreCo).

EF21 (Richtárik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically Faster Error
Feedback", 2021; analysed with the arithmetic mean of smoothness constants in Richtárik et al., "Error Feedback
Reloaded: From Quadratic to Arithmetic Mean of Smoothness Constants", ICLR 2024). Each node keeps an estimate
g_t of its gradient and only transmits a compressed correction::

    c_t = C(∇f(x_t) - g_{t-1}),     g_t = g_{t-1} + c_t,     output g_t                  (g_0 = 0)

Classic error feedback (Seide et al. 2014; Stich et al. 2018, "EF14") carries the residual instead::

    p_t = ∇f(x_t) + e_{t-1},        c_t = C(p_t),     e_t = p_t - c_t,     output c_t    (e_0 = 0)

``C`` is top-k by magnitude per leaf (k = ⌈ratio · size⌉) or any user function ``compressor(x) -> x̂``. The transform
models one node (under data parallelism the input is the all-reduced gradient); what a node would send is ``c_t``.

L-GreCo (Alimohammadi et al., "L-GreCo: Layerwise-Adaptive Gradient Compression for Efficient and Accurate Deep
Learning", MLSys 2024): instead of one ratio for all layers, every ``adapt_every`` steps choose per-leaf ratios r_l
from ``candidates`` minimizing the total compression error subject to the same total number of kept entries as the
uniform ratio::

    min_{r_l ∈ candidates}  Σ_l ‖x_l - topk(x_l, ⌈r_l n_l⌉)‖²    s.t.  Σ_l ⌈r_l n_l⌉ ≤ ⌈ratio · Σ_l n_l⌉

solved exactly by dynamic programming (a knapsack over ``budget_bins`` budget units, sizes rounded up so the budget
always holds) on the current input to the compressor. Everything is jit-safe: k is data, top-k an exact selection.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.optim._common import check_range
from jaxmodels.selection import top_k_mask

PyTree = Any

__all__ = ["ErrorFeedbackState", "top_k", "lgreco_allocate", "error_feedback", "sgd_ef21"]


class ErrorFeedbackState(NamedTuple):
    """State of :func:`error_feedback`: ``count`` (int32 step counter), ``memory`` (per leaf: EF21's estimate
    ``g_t``, or classic EF's residual ``e_t``) and ``k`` (per leaf, an int32 scalar: the entries top-k keeps;
    L-GreCo adapts it)."""

    count: jax.Array
    memory: PyTree  # EF21: the estimate g_t; EF: the residual e_t
    k: PyTree  # int32 scalar per leaf: entries kept by top-k (adapted by L-GreCo)


def top_k(x: jax.Array, k) -> jax.Array:
    """Keep exactly the ``k`` largest-magnitude entries of ``x`` (``k`` may be traced; clipped to [1, size]); ties
    at the threshold go to the lowest flat indices. The exact selection of :func:`jaxmodels.selection.top_k_mask`
    (radix select on the float32 bits, no sort on large leaves), so that ``‖x - top_k(x, k)‖²`` is the tail sum
    that L-GreCo's errors assume."""
    keep = top_k_mask(jnp.abs(x.astype(jnp.float32)), k, ties="first")
    return jnp.where(keep, x, jnp.zeros_like(x))


def _topk_errors(x: jax.Array, ks: jax.Array) -> jax.Array:
    """‖x - topk(x, k)‖² for each k in ``ks`` (sorted squared magnitudes, one cumulative sum)."""
    sq = jnp.sort(jnp.square(x.reshape(-1).astype(jnp.float32)))[::-1]
    csum = jnp.concatenate([jnp.zeros(1), jnp.cumsum(sq)])
    return csum[-1] - csum[jnp.clip(ks, 0, sq.size)]


def lgreco_allocate(errors: jax.Array, costs: np.ndarray, budget: int) -> jax.Array:
    """Exact DP: choose one candidate per layer minimizing Σ errors[l, c] with Σ costs[l, c] ≤ budget.

    ``errors`` [layers, candidates] (may be traced), ``costs`` [layers, candidates] non-negative ints (static),
    ``budget`` int. Returns the chosen candidate index per layer (int32). Infeasible -> the cheapest candidates."""
    costs = np.asarray(costs, np.int64)
    n_layers, n_cand = costs.shape
    inf = jnp.float32(jnp.inf)
    dp = jnp.zeros(budget + 1, jnp.float32)  # dp[b]: best error of layers so far using at most b units
    choices = []
    b = np.arange(budget + 1)
    for layer in range(n_layers):
        cand = []
        for c in range(n_cand):
            cost = int(costs[layer, c])
            shifted = jnp.where(b >= cost, dp[np.clip(b - cost, 0, budget)], inf)
            cand.append(shifted + errors[layer, c])
        cand = jnp.stack(cand)  # [cand, budget+1]
        choices.append(jnp.argmin(cand, axis=0))
        dp = jnp.min(cand, axis=0)
    # backtrack from the full budget
    out = []
    rem = jnp.asarray(budget)
    for layer in reversed(range(n_layers)):
        c = choices[layer][rem]
        out.append(c)
        rem = rem - jnp.asarray(costs[layer])[c]
    out = jnp.stack(out[::-1]).astype(jnp.int32)
    feasible = jnp.isfinite(dp[budget])
    return jnp.where(feasible, out, jnp.asarray(np.argmin(costs, axis=1), jnp.int32))


def error_feedback(
    ratio: float = 0.01,
    variant: str = "ef21",
    compressor: Callable[[jax.Array], jax.Array] | None = None,
    adapt_every: int | None = None,
    candidates: Sequence[float] = (0.001, 0.002, 0.003, 0.005, 0.007, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06,
                                   0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0),
    budget_bins: int = 200,
) -> optax.GradientTransformation:
    """Compress updates with error feedback (see module docstring). ``adapt_every=N`` enables L-GreCo ratios."""
    check_range("ratio", ratio, 0.0, 1.0, lo_open=True)
    if variant not in ("ef21", "ef"):
        raise ValueError(f"error_feedback: variant must be 'ef21' or 'ef', got {variant!r}")
    if adapt_every is not None:
        if compressor is not None:
            raise ValueError("error_feedback: L-GreCo adaptation needs the built-in top-k compressor")
        if int(adapt_every) != adapt_every or adapt_every < 1:
            raise ValueError(f"error_feedback: adapt_every must be a positive integer, got {adapt_every!r}")
        if not candidates or any(not 0.0 < c <= 1.0 for c in candidates):
            raise ValueError(f"error_feedback: candidates must be ratios in (0, 1], got {candidates}")
        if budget_bins < 1:
            raise ValueError("error_feedback: budget_bins must be >= 1")
    cands = np.asarray(sorted(candidates), np.float64)

    def k_of(x, r):
        return int(max(1, np.ceil(r * x.size)))

    def init_fn(params):
        return ErrorFeedbackState(
            count=jnp.zeros([], jnp.int32),
            memory=jax.tree.map(jnp.zeros_like, params),
            k=jax.tree.map(lambda x: jnp.asarray(k_of(x, ratio), jnp.int32), params))

    def compress(x, k):
        if compressor is not None:
            return compressor(x)
        return top_k(x, k)

    def adapt(inputs, ks):
        leaves, treedef = jax.tree.flatten(inputs)
        sizes = np.asarray([x.size for x in leaves])
        total_k = int(sum(k_of(x, ratio) for x in leaves))
        unit = max(1, int(np.ceil(total_k / budget_bins)))
        cand_k = np.asarray([[k_of(x, c) for c in cands] for x in leaves], np.int64)  # [layers, cands]
        costs = -(-cand_k // unit)  # round sizes *up* so the chosen set never exceeds the uniform budget
        budget = total_k // unit
        errors = jnp.stack([_topk_errors(x, jnp.asarray(cand_k[i])) for i, x in enumerate(leaves)])
        choice = lgreco_allocate(errors, costs, budget)
        new_k = [jnp.asarray(cand_k[i])[choice[i]].astype(jnp.int32) for i in range(len(leaves))]
        del sizes
        return jax.tree.unflatten(treedef, new_k)

    def update_fn(updates, state, params=None):
        del params
        if variant == "ef21":
            inputs = jax.tree.map(lambda g, m: g - m.astype(g.dtype), updates, state.memory)
        else:
            inputs = jax.tree.map(lambda g, m: g + m.astype(g.dtype), updates, state.memory)
        ks = state.k
        if adapt_every is not None:
            ks = jax.lax.cond(state.count % adapt_every == 0, lambda: adapt(inputs, ks), lambda: ks)
        c = jax.tree.map(compress, inputs, ks)
        if variant == "ef21":
            memory = jax.tree.map(lambda m, ci: m + ci.astype(m.dtype), state.memory, c)
            out = jax.tree.map(lambda m, g: m.astype(g.dtype), memory, updates)
        else:
            memory = jax.tree.map(lambda p, ci: (p - ci).astype(p.dtype), inputs, c)
            out = c
        return out, ErrorFeedbackState(optax.safe_increment(state.count), memory, ks)

    return optax.GradientTransformation(init_fn, update_fn)


def sgd_ef21(learning_rate: optax.ScalarOrSchedule, ratio: float = 0.01, momentum: float | None = None,
             **ef_kwargs) -> optax.GradientTransformation:
    """EF21-SGD: ``chain(error_feedback(ratio), sgd(lr, momentum))``."""
    return optax.chain(error_feedback(ratio, **ef_kwargs), optax.sgd(learning_rate, momentum=momentum))
