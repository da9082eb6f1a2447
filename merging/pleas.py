"""PLeaS: merging two models of different initializations with partial permutations and least squares
(Nasery, Hayase, Koh, Oh, "PLeaS — Merging Models with Permutations and Least Squares", 2024).

For MLP chains ``h_{l+1} = act(h_l W_l + b_l)`` (the ``Dense_0 .. Dense_L`` layers of
:class:`jaxmodels.models.MLP`) of two models A and B with hidden widths ``n_l``:

1. *Partial permutation matching per layer.* On the union of both models' data, correlate A's and B's hidden units
   (post-activation), match them one-to-one with ``linear_sum_assignment`` (maximum total correlation), and merge only
   the ``k_l = 2 n_l − w_l`` best-correlated pairs; the other ``n_l − k_l`` units of each model are kept as they are.
   The merged layer has the target width ``w_l ∈ [n_l, 2 n_l]`` (``width_ratio = w_l / n_l``): 1 is a full merge
   (Git Re-Basin size), 2 keeps both models side by side.
2. *Layer-wise least squares.* Layer by layer in forward order, the merged weights solve::

       [W_l^M; b_l^M] = argmin_W  Σ_{x ∈ D_A ∪ D_B} || [h_l^M(x), 1] W − t_l(x) ||² + ρ ||W||²

   where ``h_l^M`` is the *merged* model's input to layer ``l`` (so the errors of earlier merged layers are
   corrected) and the target ``t_l`` holds, per merged unit, the average of the matched A and B pre-activations
   (merged pairs) or the source model's own pre-activation (kept units); for the output layer the target is the
   average of both models' logits. ``ρ = ridge · tr(XᵀX) / d`` is a tiny Tikhonov term for rank-deficient inputs.

The merged model is an ``MLP(features=widths)``. Computed in float64 NumPy on host (the solves are small).

Calling convention (package docstring): ``pleas_mlp(base, [params_a, params_b], [x_a, x_b])``; ``base`` is ignored
(the two models come from different initializations); returns ``MergeResult(params, info)`` where ``params`` are
the ``{"Dense_i": {"kernel", "bias"}}`` of ``MLP(features=info["widths"])`` and ``info["merged_pairs"]`` holds
``k_l`` per hidden layer.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from jaxmodels.tree import check_compatible
from merging.result import MergeResult

PyTree = Any

__all__ = ["pleas_mlp", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3))),
    "tanh": np.tanh,
}


def _layers(params) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    i = 0
    while f"Dense_{i}" in params:
        d = params[f"Dense_{i}"]
        out.append((np.asarray(d["kernel"], np.float64), np.asarray(d["bias"], np.float64)))
        i += 1
    if len(out) < 2 or len(out) != len(params):
        raise ValueError(f"pleas_mlp: expected an MLP params dict Dense_0..Dense_L (L >= 1), got keys {sorted(params)}")
    return out


def _corr(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    za = (za - za.mean(0)) / (za.std(0) + 1e-8)
    zb = (zb - zb.mean(0)) / (zb.std(0) + 1e-8)
    return za.T @ zb / za.shape[0]


def _lstsq(X: np.ndarray, T: np.ndarray, ridge: float) -> np.ndarray:
    G = X.T @ X
    rho = ridge * np.trace(G) / G.shape[0]
    return np.linalg.solve(G + rho * np.eye(G.shape[0]), X.T @ T)


def pleas_mlp(base: PyTree | None, models: Sequence[PyTree], inputs: Sequence[np.ndarray], *,
              width_ratio: float | Sequence[float] = 1.5, activation: str | Callable = "relu",
              ridge: float = 1e-8) -> MergeResult:
    """Merge two MLPs ``models = [params_a, params_b]`` (``Dense_0 .. Dense_L`` params, same shapes) with PLeaS.
    ``base`` is ignored. ``inputs = [x_a, x_b]``: each model's (unlabeled) data, ``[N, d_in]``. ``width_ratio``:
    ``w_l / n_l`` in ``[1, 2]``, one value or one per hidden layer. ``activation``: "relu" | "gelu" (tanh
    approximation, flax's default) | "tanh" | a NumPy callable. Returns ``MergeResult(params, {"widths",
    "merged_pairs"})``."""
    del base  # two models of different initializations: no shared base
    if not isinstance(models, (list, tuple)) or len(models) != 2:
        raise ValueError(f"pleas_mlp: merges exactly two models ([params_a, params_b]), got "
                         f"{len(models) if isinstance(models, (list, tuple)) else type(models).__name__}")
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
        raise ValueError("pleas_mlp: `inputs` must be [x_a, x_b], one data array per model")
    params_a, params_b = models
    x_a, x_b = inputs
    check_compatible(params_a, params_b, names=["model_0", "model_1"], check_dtype=False)
    la, lb = _layers(params_a), _layers(params_b)
    L = len(la) - 1
    ratios = [float(width_ratio)] * L if np.ndim(width_ratio) == 0 else [float(r) for r in width_ratio]
    if len(ratios) != L:
        raise ValueError(f"pleas_mlp: {len(ratios)} width ratios for {L} hidden layers")
    if any(not 1.0 <= r <= 2.0 for r in ratios):
        raise ValueError(f"pleas_mlp: width_ratio must be in [1, 2], got {ratios}")
    if not ridge >= 0:
        raise ValueError(f"pleas_mlp: ridge must be >= 0, got {ridge}")
    act = ACTIVATIONS[activation] if isinstance(activation, str) else activation
    X = np.concatenate([np.asarray(x_a, np.float64).reshape(len(x_a), -1),
                        np.asarray(x_b, np.float64).reshape(len(x_b), -1)])
    ha, hb, hm = X, X, X  # inputs of the current layer for A, B and the merged model
    out, widths, pairs = {}, [], []
    ones = np.ones((X.shape[0], 1))
    for l in range(L + 1):
        (Wa, ba), (Wb, bb) = la[l], lb[l]
        ya, yb = ha @ Wa + ba, hb @ Wb + bb  # pre-activations
        if l == L:
            target = 0.5 * (ya + yb)
        else:
            n = Wa.shape[1]
            w = int(round(ratios[l] * n))
            k = 2 * n - w
            C = _corr(act(ya), act(yb))
            ri, ci = linear_sum_assignment(C, maximize=True)
            best = np.argsort(-C[ri, ci], kind="stable")[:k]
            ma, mb = ri[best], ci[best]
            ra = np.setdiff1d(np.arange(n), ma)
            rb = np.setdiff1d(np.arange(n), mb)
            target = np.concatenate([0.5 * (ya[:, ma] + yb[:, mb]), ya[:, ra], yb[:, rb]], axis=1)
            widths.append(target.shape[1])
            pairs.append(k)
        Wm = _lstsq(np.concatenate([hm, ones], 1), target, ridge)
        out[f"Dense_{l}"] = {"kernel": Wm[:-1].astype(np.float32), "bias": Wm[-1].astype(np.float32)}
        if l < L:
            hm = act(hm @ Wm[:-1] + Wm[-1])
            ha, hb = act(ya), act(yb)
    return MergeResult(out, {"widths": tuple(widths), "merged_pairs": tuple(pairs)})
