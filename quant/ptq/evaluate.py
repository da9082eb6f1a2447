"""Evaluation of a quantized sentence encoder against its float model.

* mean cosine similarity of the embeddings, (1/N) Σ_i cos(e_i, ê_i);
* retention of the pairwise-similarity ranking: Spearman ρ between {cos(e_i, e_j)}_{i<j} and {cos(ê_i, ê_j)}_{i<j}
  (``scipy.stats.spearmanr``).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

__all__ = ["embedding_metrics", "embed_batches"]


def embed_batches(model, params, batches) -> np.ndarray:
    import jax

    fwd = model.__dict__.get("_jit_forward")
    if fwd is None:
        fwd = model.__dict__["_jit_forward"] = jax.jit(model.forward)
    return np.concatenate([np.asarray(fwd(params, b)) for b in batches])


def embedding_metrics(e_float: np.ndarray, e_quant: np.ndarray) -> dict:
    e_float = np.asarray(e_float, np.float64)
    e_quant = np.asarray(e_quant, np.float64)
    if e_float.shape != e_quant.shape:
        raise ValueError(f"embedding shapes differ: {e_float.shape} vs {e_quant.shape}")
    a = e_float / np.linalg.norm(e_float, axis=1, keepdims=True)
    b = e_quant / np.linalg.norm(e_quant, axis=1, keepdims=True)
    cos = float(np.mean(np.sum(a * b, axis=1)))
    iu = np.triu_indices(len(a), k=1)
    rho = float(spearmanr((a @ a.T)[iu], (b @ b.T)[iu]).statistic)
    return {"cosine": cos, "spearman": rho}
