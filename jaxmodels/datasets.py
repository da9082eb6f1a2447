"""Small real datasets that need no network (scikit-learn's bundled data), as NumPy arrays ready for JAX."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Split", "load_digits_split"]


class Split(NamedTuple):
    """A train / test split of arrays: ``x_train``, ``y_train`` (int32 labels), ``x_test``, ``y_test``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(test_fraction: float = 0.25, seed: int = 0, images: bool = False) -> Split:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), scaled to [0, 1], split with a fixed
    permutation. ``images=True`` returns ``[N, 8, 8, 1]`` arrays (NHWC) instead of ``[N, 64]``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is in the colab/test extras
        raise ImportError("load_digits_split needs scikit-learn: pip install 'weightlab[colab]'") from e
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    n_test = int(round(len(x) * test_fraction))
    if images:
        x = x.reshape(-1, 8, 8, 1)
    return Split(x[n_test:], y[n_test:], x[:n_test], y[:n_test])
