"""EVA: Explained Variance Adaptation, a data-driven LoRA initialisation with ranks redistributed across layers.

Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation" (2024), as
PEFT's ``initialize_lora_eva_weights`` implements it. For every adapted layer with input matrix
``X [tokens, d_in]`` (the layer computes ``X @ W``, :func:`jaxmodels.capture.layer_input_matrix`):

1. Stream minibatches of activations through an incremental PCA (Ross et al. 2008, scikit-learn's / PEFT's
   ``IncrementalPCA.partial_fit``), keeping ``k = round(rho · r)`` components per layer. With running mean
   ``μ``, per-feature variance ``σ²`` and count ``n``, a batch ``X_b`` (``m`` rows, mean ``μ_b``) updates::

       Z = [ diag(S) Vᵀ ;  X_b − μ_b ;  sqrt(n·m / (n + m)) · (μ − μ_b) ],     Z = U' S' V'ᵀ (SVD)
       V <- V'[:, :k] (signs: largest-|.| entry of each component positive),  S <- S'[:k]
       explained_variance_ratio_i = S'_i² / Σ_f (n + m) σ²_f

2. A layer has converged when each of its first ``rank(layer)`` components has cosine similarity ``>= tau``
   with its value before the last batch; converged layers stop updating (PEFT removes their hook).
3. Rank redistribution: the budget ``Σ_layers r`` goes to the globally largest explained-variance ratios among
   the ``k`` per layer; ``rank(layer) = #{its ratios among the top budget}`` (0 removes the layer's adapter).
4. ``lora_A = V[:, :rank(layer)]`` (``[d_in, rank]``; Conv ``[kh, kw, c_in, rank]``), divided by
   ``sqrt(S)`` if ``whiten``; ``lora_B = 0``, so the model is unchanged at step 0.

Returns weightlab LoRA adapters (:mod:`jaxmodels.adapters.lora`) and the :class:`LoraConfig` with the new
``rank_pattern`` (one exact-path entry per layer; ``alpha`` is kept, so ``s = alpha / rank(layer)`` as in PEFT).
Differences from PEFT: the SVD is exact (PEFT defaults to ``torch.svd_lowrank``), statistics are float32 (no
float64 on accelerators), and layers whose inputs are identical are not deduplicated (each gets its own PCA).

API::

    adapters, cfg = eva_init(apply_fn, params, batches, LoraConfig(rank=8, target=...), EvaConfig(rho=2.0))
    state = ipca_init(d_in, k); state = ipca_update(state, X)        # the streaming PCA alone (jit-able)
    ranks = redistribute_ranks(ratios, budget)                        # step 3 alone
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.adapters._papers import check_finite, check_real
from jaxmodels.adapters.lora import LoraConfig, module_kind
from jaxmodels.capture import _run_capturing, layer_input_matrix
from jaxmodels.progress import progress_bar
from jaxmodels.tree import unflatten

PyTree = Any

__all__ = ["EvaConfig", "IPCAState", "ipca_init", "ipca_update", "redistribute_ranks", "eva_init"]


@dataclasses.dataclass(frozen=True)
class EvaConfig:
    """PEFT's ``EvaConfig``: ``rho`` (>= 1; components kept per layer = ``round(rho · r)``), ``tau`` (cosine
    similarity threshold of convergence), ``whiten``, and ``max_batches`` (stop after that many batches even if
    not converged; None = until the iterator ends)."""

    rho: float = 2.0
    tau: float = 0.99
    whiten: bool = False
    max_batches: int | None = None

    def __post_init__(self):
        check_real(self.rho, "rho", "eva", lo=1.0)
        check_real(self.tau, "tau", "eva", lo=0.0, hi=1.0)
        if self.max_batches is not None and (int(self.max_batches) != self.max_batches or self.max_batches < 1):
            raise ValueError(f"eva: `max_batches` must be a positive integer or None, got {self.max_batches!r}")


class IPCAState(NamedTuple):
    """State of the streaming incremental PCA (scikit-learn's ``IncrementalPCA`` attributes, float32): ``n`` rows
    seen (scalar), per-feature ``mean`` and population ``var`` ``[d]``, ``components [k, d]`` (rows are the
    right-singular vectors ``Vᵀ``), ``singular_values [k]`` and ``explained_variance_ratio [k]``."""

    n: jax.Array  # float32 scalar: rows seen
    mean: jax.Array  # [d]
    var: jax.Array  # [d] (population variance, as scikit-learn's var_)
    components: jax.Array  # [k, d] rows = right-singular vectors
    singular_values: jax.Array  # [k]
    explained_variance_ratio: jax.Array  # [k]


def ipca_init(d: int, k: int) -> IPCAState:
    """The empty incremental-PCA state for ``d`` features and ``k`` components (all zeros, ``n = 0``), to feed to
    :func:`ipca_update`; ``ValueError`` unless ``1 <= k <= d``."""
    if not 1 <= k <= d:
        raise ValueError(f"ipca_init: need 1 <= k <= d, got k={k}, d={d}")
    z = jnp.zeros
    return IPCAState(z((), jnp.float32), z((d,), jnp.float32), z((d,), jnp.float32), z((k, d), jnp.float32),
                     z((k,), jnp.float32), z((k,), jnp.float32))


@jax.jit
def ipca_update(state: IPCAState, X: jax.Array) -> IPCAState:
    """One ``partial_fit`` step on ``X [m, d]`` (see the module docstring); the first call (``n = 0``) is the
    same formula (the stacked old components and the mean correction are zero rows)."""
    X = X.astype(jnp.float32)
    m = jnp.float32(X.shape[0])
    n, mu, var = state.n, state.mean, state.var
    tot = n + m
    mu_b = jnp.mean(X, 0)
    Xc = X - mu_b
    var_b = jnp.mean(Xc * Xc, 0)
    new_mean = (n * mu + m * mu_b) / tot
    # Chan et al. parallel variance: M2 = M2_a + M2_b + δ² n m / (n + m)
    new_var = (n * var + m * var_b + jnp.square(mu - mu_b) * n * m / tot) / tot
    corr = jnp.sqrt(n * m / tot) * (mu - mu_b)
    Z = jnp.concatenate([state.singular_values[:, None] * state.components, Xc, corr[None]], 0)
    _, S, Vt = jnp.linalg.svd(Z, full_matrices=False)
    idx = jnp.argmax(jnp.abs(Vt), axis=1)
    signs = jnp.sign(Vt[jnp.arange(Vt.shape[0]), idx])
    Vt = Vt * jnp.where(signs == 0, 1.0, signs)[:, None]
    k = state.components.shape[0]
    ratio = S ** 2 / jnp.sum(new_var * tot)
    return IPCAState(tot, new_mean, new_var, Vt[:k], S[:k], ratio[:k])


def redistribute_ranks(ratios: dict[str, np.ndarray], budget: int) -> dict[str, int]:
    """EVA's rank redistribution: ``rank(layer)`` = how many of the ``budget`` globally largest explained-variance
    ratios are the layer's (ties: the layer listed first, then the lower component index, keeps the rank)."""
    keys = [(name, i) for name, r in ratios.items() for i in range(len(r))]
    vals = np.concatenate([np.asarray(r, np.float64).reshape(-1) for r in ratios.values()])
    order = np.argsort(-vals, kind="stable")[:budget]
    counts = {name: 0 for name in ratios}
    for j in order:
        counts[keys[j][0]] += 1
    return counts


def _layers(params, config: LoraConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    from jaxmodels.adapters.lora import _modules  # the module walk of the LoRA core (same package)

    out = {}
    for m, lv in sorted(_modules(params).items()):
        if "kernel" not in lv or not config.selects(m):
            continue
        kind, nb = module_kind(m, lv, config)
        if nb:
            raise ValueError(f"eva: {m!r} is a stacked (scanned) kernel; EVA needs one input matrix per layer")
        out[m] = (kind, tuple(lv["kernel"].shape))
    if not out:
        raise ValueError(f"eva: LoraConfig.target={config.target!r} selects no Dense/Conv kernel")
    return out


def _capture(apply_fn, p, batch, names):
    got: dict[str, jax.Array] = {}

    def on_call(path, module, x, y):
        if path in names and path not in got:  # a layer called twice: its first call
            got[path] = layer_input_matrix(module, x)

    _run_capturing(apply_fn, p, batch, lambda path, mod: path in names, on_call)
    missing = set(names) - set(got)
    if missing:
        raise ValueError(f"eva: the forward pass never called {sorted(missing)}")
    return got


def _rows(apply_fn, params, batch, names) -> dict[str, int]:
    shapes = jax.eval_shape(lambda p, b: _capture(apply_fn, p, b, names), params, batch)
    return {m: int(v.shape[0]) for m, v in shapes.items()}


@functools.lru_cache(maxsize=16)
def _capture_step(apply_fn, names: tuple[str, ...]):
    """Jitted: every selected layer's input matrix for one batch (sharded like the batch)."""
    return jax.jit(lambda params, batch: _capture(apply_fn, params, batch, names))


@jax.jit
def _update_step(states, X, active, tau):
    """Jitted: ``ipca_update`` of the active layers (the others keep their state) and each layer's per-component
    convergence flags (cosine similarity with the previous components >= tau)."""
    new, conv = {}, {}
    for m in states:
        upd = ipca_update(states[m], X[m])
        upd = jax.tree.map(lambda a, b: jnp.where(active[m], a, b), upd, states[m])
        prev, cur = states[m].components, upd.components
        sim = jnp.abs(jnp.sum(cur * prev, 1)) / (jnp.linalg.norm(cur, axis=1) * jnp.linalg.norm(prev, axis=1)
                                                  + 1e-12)
        new[m], conv[m] = upd, sim >= tau
    return new, conv


def eva_init(apply_fn: Callable, params: PyTree, batches: Iterable, config: LoraConfig,
             eva: EvaConfig = EvaConfig(), *, progress: bool | None = None) -> tuple[PyTree, LoraConfig]:
    """EVA-initialised LoRA adapters and the config carrying the redistributed ranks (module docstring).

    ``apply_fn(params, batch)`` runs the model (e.g. ``lambda p, x: model.apply({"params": p}, x)``); ``batches``
    is any iterable of model inputs (arrays may be sharded over a mesh: the activations are reduced under jit)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"eva: config must be a LoraConfig, got {type(config).__name__}")
    if config.use_dora:
        raise ValueError("eva: EVA initialises plain LoRA (use_dora=False)")
    layers = _layers(params, config)
    check_finite(params, "params", "eva")
    d_in = {m: int(np.prod(s[:-1])) for m, (_, s) in layers.items()}
    rank = {m: config.rank_for(m) for m in layers}
    k = {m: min(int(round(rank[m] * eva.rho)), d_in[m]) for m in layers}
    budget = sum(rank.values())
    states = {m: ipca_init(d_in[m], k[m]) for m in layers}
    converged = {m: np.zeros(k[m], bool) for m in layers}
    dist = dict(k)
    capture = _capture_step(apply_fn, tuple(layers))
    device = None
    seen = 0
    for batch in progress_bar(batches, progress, desc="eva"):
        if seen == 0:
            rows = _rows(apply_fn, params, batch, tuple(layers))
            few = [m for m in layers if rows[m] < k[m]]
            if few:
                raise ValueError(f"eva: a batch gives {rows[few[0]]} rows for {few[0]!r}, fewer than its "
                                 f"{k[few[0]]} components; use larger batches")
        active = {m: jnp.asarray(seen == 0 or not np.all(converged[m][: dist[m]])) for m in layers}
        X = capture(params, batch)
        if device is None:  # the small SVDs run on one device: an SVD partitioned over a mesh is far slower
            device = next(iter(jax.tree.leaves(X)[0].devices()))
            states = jax.device_put(states, device)
        X = jax.device_put(X, device)
        states, conv = _update_step(states, X, active, jnp.float32(eva.tau))
        if seen > 0:
            conv = jax.device_get(conv)
            converged = {m: np.asarray(conv[m]) if bool(active[m]) else converged[m] for m in layers}
        seen += 1
        dist = redistribute_ranks(jax.device_get({m: s.explained_variance_ratio for m, s in states.items()}),
                                  budget)
        if seen > 1 and all(np.all(converged[m][: dist[m]]) for m in layers):
            break
        if eva.max_batches is not None and seen >= eva.max_batches:
            break
    if seen == 0:
        raise ValueError("eva: `batches` is empty")
    flat, exact = {}, {}
    for m, (kind, shape) in layers.items():
        r = dist[m]
        exact[f"^{re.escape(m)}$"] = max(r, 1)
        if r == 0:
            continue
        A = states[m].components[:r].T  # [d_in, r]
        if eva.whiten:
            A = A / jnp.sqrt(states[m].singular_values[:r])[None]
        flat[f"{m}/lora_A"] = A.reshape(shape[:-1] + (r,))
        flat[f"{m}/lora_B"] = jnp.zeros((r, shape[-1]), jnp.float32)
    # exact-path patterns first so they win over the user's (first match wins); rank-0 layers are excluded
    new_pattern = {**exact, **{p: v for p, v in config.rank_pattern.items() if p not in exact}}
    zero = [m for m in layers if dist[m] == 0]
    exclude = config.exclude
    if zero:
        ex = "|".join(f"^{re.escape(m)}$" for m in zero)
        exclude = ex if exclude is None else f"(?:{exclude})|{ex}"
    new_cfg = dataclasses.replace(config, rank_pattern=new_pattern, exclude=exclude)
    return unflatten(flat), new_cfg
