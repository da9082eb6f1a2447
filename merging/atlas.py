"""aTLAS: learned anisotropic scaling of task vectors (Zhang et al., "Knowledge Composition using Task Vectors with
Learned Anisotropic Scaling", NeurIPS 2024).

Each task vector ``τ_k = θ_k − θ_0`` is split into its parameter blocks ``τ_k^(b)`` (every weight matrix, bias and
norm parameter separately); one coefficient per block per task vector::

    θ^(b) = θ_0^(b) + Σ_k λ_k^(b) τ_k^(b)

``λ`` is learned by gradient descent (Adam, optax) on a few batches: with labels, the cross-entropy
(``objective="supervised"``, the paper's few-shot / task-addition setting); without, the prediction entropy
(``objective="entropy"``, the paper's test-time adaptation). Unlike AdaMerging the coefficients are not clipped and
start from ``init`` (default 0: the pre-trained model).

Calling convention (package docstring): ``atlas(base, models, apply_fn, batches)``; ``base`` is the pre-trained
``θ_0`` (required); returns ``MergeResult(params, info)`` with ``info["coefficients"]`` (per parameter path, ``[K]``)
and ``info["losses"]`` (the objective per step), as :func:`merging.adamerging.adamerging`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import optax

from merging.adamerging import entropy, learn_coefficients
from merging.result import MergeResult

PyTree = Any

__all__ = ["atlas"]


def atlas(base: PyTree, models: Sequence[PyTree], apply_fn: Callable, batches: Sequence[Iterable], *,
          objective: str = "supervised", init: float = 0.0, steps: int = 100, learning_rate: float = 1e-2,
          check_finite: bool = True, progress: bool | None = None) -> MergeResult:
    """Learn block-wise coefficients. ``batches``: a list of batch streams (re-iterables, e.g. one per task, or a
    single one), of ``(x, y)`` (supervised) or ``x`` (entropy); each step sums the losses of the next batch of every
    stream."""
    if objective not in ("supervised", "entropy"):
        raise ValueError(f"atlas: objective must be 'supervised' or 'entropy', got {objective!r}")
    streams = list(batches)
    if not streams:
        raise ValueError("atlas: `batches` must be a non-empty list of batch streams")

    def loss(params, bs):
        total = 0.0
        for b in bs:
            if objective == "supervised":
                if not isinstance(b, (tuple, list)) or len(b) != 2:
                    raise ValueError("atlas: objective='supervised' needs (x, y) batches")
                x, y = b
                logits = apply_fn(params, x).astype(jnp.float32)
                total = total + optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            else:
                x = b[0] if isinstance(b, (tuple, list)) else b
                total = total + entropy(apply_fn(params, x))
        return total

    return learn_coefficients(base, models, loss, streams, granularity="layer", init=init, steps=steps,
                              learning_rate=learning_rate, clamp=None, check_finite=check_finite, progress=progress,
                              desc="atlas")
