"""Greedy soup (Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022, Recipe 1).

Sort the ingredients by held-out accuracy, descending: ``θ_(1), θ_(2), ...``. Start with the soup ``{θ_(1)}``; for
each next ingredient, keep it if the uniform average of the soup plus it scores at least as well as the soup::

    S ← {θ_(1)};  for k = 2..N:  if acc(mean(S ∪ {θ_(k)})) ≥ acc(mean(S)):  S ← S ∪ {θ_(k)}
    return mean(S)

The averages are :func:`merging.linear.uniform_soup` (the library's one validated uniform average).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from jaxmodels.progress import progress_bar
from merging._common import validate_trees
from merging.linear import uniform_soup
from merging.result import MergeResult

PyTree = Any

__all__ = ["greedy_soup"]


def greedy_soup(base: PyTree | None, models: Sequence[PyTree], eval_fn: Callable[[PyTree], Any], *,
                check_finite: bool = True, progress: bool | None = None) -> MergeResult:
    """Greedy soup of the ingredients ``models`` using ``eval_fn(params) -> score`` (held-out accuracy; higher is
    better). ``base`` is ignored (put the pre-trained model in ``models`` to make it an ingredient). Ties keep the
    ingredient (the paper adds when accuracy does not drop).

    Returns ``MergeResult(params, info)`` with ``info["selected"]`` (indices into ``models`` of the ingredients
    kept, in the order added), ``info["individual_scores"]`` (``eval_fn`` of each model) and ``info["score"]``
    (``eval_fn`` of the soup)."""
    del base  # a soup of the ingredients themselves
    models = list(models)
    if not models:
        raise ValueError("greedy_soup: needs at least one model")
    validate_trees(None, models, "greedy_soup", check_finite=check_finite)
    scores = [float(eval_fn(m)) for m in progress_bar(models, progress, desc="greedy soup: rank", leave=False)]
    if not all(np.isfinite(scores)):
        raise ValueError(f"greedy_soup: eval_fn returned a non-finite score: {scores}")
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    selected = [order[0]]
    best = scores[order[0]]
    for i in progress_bar(order[1:], progress, desc="greedy soup: add", leave=False):
        cand = uniform_soup([models[j] for j in selected + [i]], check_finite=False)
        s = float(eval_fn(cand))
        if s >= best:
            selected.append(i)
            best = s
    soup = uniform_soup([models[j] for j in selected], check_finite=False)
    return MergeResult(soup, {"selected": tuple(selected), "individual_scores": tuple(scores), "score": best})
