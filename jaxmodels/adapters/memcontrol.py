"""MemControl: choose WHICH parameter subset to fine-tune by scoring generation quality against memorization.

Dutt et al., "MemControl: Mitigating Memorization in Diffusion Models via Automated Parameter Selection" (2024).
The paper's bi-level optimisation: the outer level searches the space of PEFT parameter subsets ``M`` (masks over
the model's parameter groups), the inner level fine-tunes only ``θ_M`` on the task; the outer reward combines a
generation-quality metric ``Q`` and a memorization metric ``Mem`` of the fine-tuned model. Here the outer search is
an exhaustive small search over given candidate subsets (the paper uses a hyper-parameter optimiser over a larger
space), with the reward written as the scalarisation and Pareto front of the two objectives::

    θ*_M = argmin_{θ_M} L_task(θ_M; θ_{¬M} frozen)                    (inner: masked fine-tuning, :func:`train_subset`)
    score(M) = Q(θ*_M) - λ · Mem(θ*_M)                                  (outer reward; best = argmax_M score)
    M is Pareto-optimal  <=>  no M' with Q' >= Q and Mem' <= Mem, one of them strict

``Mem`` for classifiers (the paper measures diffusion memorization by the similarity of generated images to their
nearest training image, which has no classifier analogue): the label-memorization rate of Zhang et al. (2017), the
fraction of deliberately mislabeled training samples whose WRONG label the fine-tuned model predicts
(:func:`label_memorization`). The exact reward of the paper could not be sourced here; ``λ`` is a parameter.

API::

    masks = {"full": subset_mask(params, ".*"), "head": subset_mask(params, "^Dense_2/")}
    tx = train_subset(optax.adam(1e-3), masks["head"])               # inner fine-tuning of one subset
    res = memcontrol_search({name: (quality, memorization, fraction)}, lam=1.0)   # res.best, res.pareto
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.adapters._papers import check_finite, check_real
from jaxmodels.tree import map_with_path

PyTree = Any

__all__ = ["SearchResult", "subset_mask", "trainable_fraction", "train_subset", "label_memorization", "pareto_front",
           "memcontrol_search"]


class SearchResult(NamedTuple):
    """Per candidate (in ``names`` order): ``quality``, ``memorization``, ``fraction`` (trainable share of the
    parameters), ``score = quality - λ memorization``, ``pareto`` (bool); ``best``: the name with the top score
    (ties: the smaller fraction)."""

    names: tuple[str, ...]
    quality: np.ndarray
    memorization: np.ndarray
    fraction: np.ndarray
    score: np.ndarray
    pareto: np.ndarray
    best: str


def subset_mask(params: PyTree, include: str, exclude: str | None = None) -> PyTree:
    """A bool pytree like ``params``: True on the leaves whose path ``re.search``-es ``include`` and not
    ``exclude``. Raises if the subset is empty.

    >>> subset_mask(params, r"/bias$")          # BitFit-style: every bias
    """
    try:
        inc, exc = re.compile(include), (re.compile(exclude) if exclude else None)
    except re.error as e:
        raise ValueError(f"memcontrol: invalid regex: {e}") from None
    mask = map_with_path(lambda p, _: bool(inc.search(p)) and not (exc and exc.search(p)), params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"memcontrol: include={include!r} exclude={exclude!r} selects no parameter")
    return mask


def trainable_fraction(params: PyTree, mask: PyTree) -> float:
    """``Σ_{leaves in M} size / Σ_leaves size``.

    >>> trainable_fraction(params, subset_mask(params, "^Dense_2/"))
    """
    sizes, flags = jax.tree.leaves(jax.tree.map(np.size, params)), jax.tree.leaves(mask)
    if len(sizes) != len(flags):
        raise ValueError(f"memcontrol: mask has {len(flags)} leaves, params {len(sizes)}")
    return float(sum(s for s, f in zip(sizes, flags) if f) / max(sum(sizes), 1))


def train_subset(tx: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformation:
    """``tx`` on the leaves where ``mask`` is True, zero updates (and no optimizer state) elsewhere: the inner
    fine-tuning of subset ``M``.

    >>> tx = train_subset(optax.adam(1e-3), subset_mask(params, r"/bias$")); state = tx.init(params)
    """
    return optax.chain(optax.masked(tx, mask), optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask)))


def label_memorization(logits: jax.Array, noisy_labels: jax.Array, mislabeled: jax.Array) -> jax.Array:
    """The fraction of the ``mislabeled`` training rows whose (wrong) ``noisy_labels`` the model predicts. Jit-able.

    >>> mem = label_memorization(model.apply(p, x_train), y_noisy, y_noisy != y_true)
    """
    if jnp.ndim(logits) != 2 or jnp.shape(noisy_labels) != jnp.shape(logits)[:1] or \
            jnp.shape(mislabeled) != jnp.shape(noisy_labels):
        raise ValueError(f"memcontrol: logits {jnp.shape(logits)}, labels {jnp.shape(noisy_labels)}, mislabeled "
                         f"{jnp.shape(mislabeled)} do not fit")
    hit = (jnp.argmax(logits, -1) == noisy_labels) & jnp.asarray(mislabeled, bool)
    return jnp.sum(hit) / jnp.maximum(jnp.sum(jnp.asarray(mislabeled, bool)), 1)


def pareto_front(quality: np.ndarray, memorization: np.ndarray) -> np.ndarray:
    """Bool ``[n]``: candidate ``i`` is not dominated (higher-or-equal quality and lower-or-equal memorization by
    some other candidate, strictly better in one).

    >>> pareto_front(np.array([0.9, 0.8, 0.7]), np.array([0.5, 0.2, 0.3]))     # [True, True, False]
    """
    q, m = np.asarray(quality, np.float64), np.asarray(memorization, np.float64)
    if q.shape != m.shape or q.ndim != 1:
        raise ValueError(f"memcontrol: quality {q.shape} and memorization {m.shape} must be equal 1-D")
    qj, mj, qi, mi = q[None, :], m[None, :], q[:, None], m[:, None]
    dom = (qj >= qi) & (mj <= mi) & ((qj > qi) | (mj < mi))
    return ~dom.any(1)


def memcontrol_search(results: Mapping[str, tuple[float, float, float]], lam: float = 1.0) -> SearchResult:
    """The outer level over evaluated candidates ``{name: (quality, memorization, trainable fraction)}``:
    ``score = quality - lam · memorization``, the Pareto front, the best candidate.

    >>> res = memcontrol_search({"full": (0.93, 0.61, 1.0), "head": (0.90, 0.12, 0.1)}, lam=1.0)   # res.best == "head"
    """
    lam = check_real(lam, "lam", "memcontrol", lo=0.0)
    if not results:
        raise ValueError("memcontrol: no candidate results")
    names = tuple(results)
    arr = np.asarray([results[n] for n in names], np.float64)
    if arr.shape != (len(names), 3):
        raise ValueError("memcontrol: each result must be (quality, memorization, fraction)")
    check_finite({"results": arr}, "results", "memcontrol")
    q, m, f = arr.T
    score = q - lam * m
    order = sorted(range(len(names)), key=lambda i: (-score[i], f[i]))
    return SearchResult(names, q, m, f, score, pareto_front(q, m), names[order[0]])
