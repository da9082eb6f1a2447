"""Linear mode connectivity: the loss along the straight line between two models and its barrier.

Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis" (ICML 2020); Entezari et al. (ICLR
2022) and Ainsworth et al. (Git Re-Basin, ICLR 2023) use the barrier to measure how well two aligned networks can be
averaged::

    θ(t) = (1 − t) θ_A + t θ_B,     t ∈ [0, 1]
    barrier = max_t  L(θ(t)) − ((1 − t) L(θ_A) + t L(θ_B))

(the gap between the loss on the path and the linear interpolation of the endpoint losses).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.progress import progress_bar
from jaxmodels.tree import check_compatible

PyTree = Any

__all__ = ["InterpolationPath", "interpolate", "interpolation_path", "loss_barrier"]


class InterpolationPath(NamedTuple):
    """The evaluated path of :func:`interpolation_path`: ``ts [K]`` (coefficients ``t`` in [0, 1]) and ``values [K]``
    (``eval_fn(θ(t))``); ``barrier`` is ``max_t values(t) − ((1 − t) values(0) + t values(1))``."""

    ts: np.ndarray  # [K] interpolation coefficients in [0, 1]
    values: np.ndarray  # [K] eval_fn(θ(t))

    @property
    def barrier(self) -> float:
        line = (1 - self.ts) * self.values[0] + self.ts * self.values[-1]
        return float(np.max(self.values - line))


@jax.jit
def interpolate(params_a: PyTree, params_b: PyTree, t) -> PyTree:
    """``(1 − t) θ_A + t θ_B`` in float32, returned in the inputs' dtype."""
    return jax.tree.map(lambda a, b: ((1 - t) * a.astype(jnp.float32) + t * b.astype(jnp.float32)).astype(a.dtype),
                        params_a, params_b)


def interpolation_path(eval_fn: Callable[[PyTree], Any], params_a: PyTree, params_b: PyTree, *,
                       num_points: int = 11, progress: bool | None = None) -> InterpolationPath:
    """Evaluate ``eval_fn`` (e.g. the test loss) at ``num_points`` evenly spaced ``t`` from 0 (A) to 1 (B)."""
    if num_points < 2:
        raise ValueError(f"interpolation_path: num_points must be >= 2, got {num_points}")
    check_compatible(params_a, params_b, names=["params_a", "params_b"])
    ts = np.linspace(0.0, 1.0, num_points)
    vals = [float(eval_fn(interpolate(params_a, params_b, jnp.float32(t))))
            for t in progress_bar(ts, progress, desc="interpolation", leave=False)]
    return InterpolationPath(ts, np.asarray(vals))


def loss_barrier(eval_fn: Callable[[PyTree], Any], params_a: PyTree, params_b: PyTree, *, num_points: int = 11,
                 progress: bool | None = None) -> float:
    """``max_t L(θ(t)) − ((1 − t) L(θ_A) + t L(θ_B))`` over ``num_points`` values of ``t``."""
    return interpolation_path(eval_fn, params_a, params_b, num_points=num_points, progress=progress).barrier
