"""Greedy soup (Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022, Recipe 1).

Sort the ingredients by held-out accuracy, descending: ``θ_(1), θ_(2), ...``. Start with the soup ``{θ_(1)}``; for
each next ingredient, keep it if the uniform average of the soup plus it scores at least as well as the soup::

    S ← {θ_(1)};  for k = 2..N:  if acc(mean(S ∪ {θ_(k)})) ≥ acc(mean(S)):  S ← S ∪ {θ_(k)}
    return mean(S)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.progress import progress_bar
from jaxmodels.tree import check_compatible

PyTree = Any

__all__ = ["GreedySoup", "greedy_soup", "uniform_soup"]


class GreedySoup(NamedTuple):
    params: PyTree  # the soup
    selected: tuple[int, ...]  # indices (into ``models``) of the ingredients kept, in the order added
    individual_scores: tuple[float, ...]  # eval_fn of each model
    score: float  # eval_fn of the soup


@jax.jit
def _mean(models):
    return jax.tree.map(lambda *a: (sum(x.astype(jnp.float32) for x in a) / len(a)).astype(a[0].dtype), *models)


def uniform_soup(models: Sequence[PyTree]) -> PyTree:
    """The uniform soup ``mean_i θ_i`` (float32 accumulation, input dtype)."""
    return _mean(list(models))


def greedy_soup(models: Sequence[PyTree], eval_fn: Callable[[PyTree], Any], *,
                progress: bool | None = None) -> GreedySoup:
    """Greedy soup of ``models`` using ``eval_fn(params) -> score`` (held-out accuracy; higher is better).
    Ties keep the ingredient (the paper adds when accuracy does not drop)."""
    models = list(models)
    if not models:
        raise ValueError("greedy_soup: needs at least one model")
    check_compatible(*models, names=[f"model_{i}" for i in range(len(models))])
    scores = [float(eval_fn(m)) for m in progress_bar(models, progress, desc="greedy soup: rank", leave=False)]
    if not all(np.isfinite(scores)):
        raise ValueError(f"greedy_soup: eval_fn returned a non-finite score: {scores}")
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    selected = [order[0]]
    best = scores[order[0]]
    for i in progress_bar(order[1:], progress, desc="greedy soup: add", leave=False):
        cand = uniform_soup([models[j] for j in selected + [i]])
        s = float(eval_fn(cand))
        if s >= best:
            selected.append(i)
            best = s
    return GreedySoup(uniform_soup([models[j] for j in selected]), tuple(selected), tuple(scores), best)
