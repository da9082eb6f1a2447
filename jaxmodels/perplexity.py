"""Perplexity of a causal language model on one long token stream, as the GPTQ and AWQ papers report it.

GPTQ (Frantar et al., 2023, ``datautils``/``opt_eval``) and AWQ (Lin et al., 2024) evaluate WikiText-2 / C4
perplexity on non-overlapping windows: the test text is tokenized as one stream ``t_0 .. t_{N-1}``, cut into
``n = N // T`` windows of ``T = seq_len`` tokens (the tail is dropped), each window is run with no context from the
previous one, and every token after the first of a window is predicted::

    PPL = exp( 1 / (n (T - 1)) * Σ_{w < n} Σ_{1 <= j < T} -log p(t_{wT + j} | t_{wT} .. t_{wT + j - 1}) )

(GPTQ's ``exp(Σ_w T · mean_w / (n T))`` is the same number: every window has ``T - 1`` predicted tokens.)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.progress import progress_bar
from jaxmodels.sharding import DATA

__all__ = ["evaluate_perplexity", "perplexity_windows", "window_nll"]

PyTree = Any


def perplexity_windows(tokens, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """The non-overlapping windows ``[n, seq_len]`` (``n = len(tokens) // seq_len``, at most ``max_windows``)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array (one token stream), got {tokens.dtype} "
                         f"shape {tokens.shape}")
    if int(seq_len) != seq_len or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    n = len(tokens) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens make no window of seq_len={seq_len}")
    if max_windows is not None:
        if int(max_windows) != max_windows or max_windows < 1:
            raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}")
        n = min(n, int(max_windows))
    if tokens.min() < 0:
        raise ValueError(f"tokens must be non-negative ids, found {int(tokens.min())}")
    return tokens[: n * seq_len].reshape(n, seq_len).astype(np.int32)


def _logits(fn, params, ids):
    if isinstance(fn, nn.Module):
        return fn.apply({"params": params}, ids)
    return fn(params, ids)


def window_nll(fn, params: PyTree, ids: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood ``[B, T - 1]`` (float32) of ``ids[:, 1:]`` given the previous tokens of
    the same window; ``fn`` is a linen module (``fn.apply({"params": params}, ids) -> logits``) or a callable
    ``fn(params, ids) -> logits [B, T, V]``."""
    logits = _logits(fn, params, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:])


def _nll_sum_impl(fn, params, ids, weight):
    return jnp.sum(window_nll(fn, params, ids).sum(-1) * weight)


_nll_sum = jax.jit(_nll_sum_impl, static_argnums=0)


def _vocab_size(model) -> int | None:
    for obj in (model, getattr(model, "config", None)):
        v = getattr(obj, "vocab_size", None)
        if isinstance(v, (int, np.integer)):
            return int(v)
    return None


def evaluate_perplexity(model: nn.Module | Callable, params: PyTree, tokens, seq_len: int, batch_size: int = 8, *,
                        mesh: Mesh | None = None, max_windows: int | None = None,
                        progress: bool | None = None) -> float:
    """Perplexity of ``model`` on the token stream ``tokens`` with non-overlapping windows of ``seq_len`` (the
    GPTQ / AWQ evaluation; the equation is in the module docstring).

    ``model``: a linen module whose ``apply({"params": params}, ids)`` returns logits ``[B, T, V]``, or any callable
    ``(params, ids) -> logits`` (e.g. a model with fake-quantized activations). Windows run ``batch_size`` at a time
    through one jitted function (compiled once per model and shape: the last batch is padded with weight-0
    windows). With ``mesh``, each batch is sharded over its ``data`` axis (``batch_size`` must be a multiple of its
    size); ``params`` are used with whatever sharding they carry. ``max_windows`` caps the number of windows (the
    first ones), as the papers' C4 evaluation uses 256. The per-batch sums are float32 on device, their total is
    accumulated in float64 on the host.
    """
    windows = perplexity_windows(tokens, seq_len, max_windows)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    vocab = _vocab_size(model)
    if vocab is not None and windows.max() >= vocab:
        raise ValueError(f"token id {int(windows.max())} >= the model's vocab_size {vocab}")
    if not (isinstance(model, nn.Module) or callable(model)):
        raise TypeError(f"model must be a linen Module or a callable (params, ids) -> logits, got {type(model)}")
    ids_sharding = w_sharding = None
    fn = _nll_sum
    if mesh is not None:
        n_data = mesh.shape[DATA]
        if batch_size % n_data:
            raise ValueError(f"batch_size={batch_size} is not a multiple of the mesh's data axis ({n_data})")
        ids_sharding, w_sharding = NamedSharding(mesh, P(DATA, None)), NamedSharding(mesh, P(DATA))
        from jaxmodels.train import synchronize_on_cpu_mesh

        fn = synchronize_on_cpu_mesh(_nll_sum, mesh)
    n = len(windows)
    sums = []
    for start in progress_bar(range(0, n, batch_size), progress, desc="perplexity", total=-(-n // batch_size)):
        ids = windows[start:start + batch_size]
        weight = np.ones(len(ids), np.float32)
        if len(ids) < batch_size:  # same shape every batch: pad with weight-0 windows
            pad = batch_size - len(ids)
            ids = np.concatenate([ids, np.zeros((pad, seq_len), np.int32)])
            weight = np.concatenate([weight, np.zeros(pad, np.float32)])
        if mesh is not None:
            ids, weight = jax.device_put(ids, ids_sharding), jax.device_put(weight, w_sharding)
        sums.append(fn(model, params, ids, weight))
    total = float(np.sum([np.float64(s) for s in sums]))
    if not np.isfinite(total):
        raise FloatingPointError("the negative log-likelihood is not finite (NaN/Inf in the model's logits?)")
    return float(np.exp(total / (n * (seq_len - 1))))
