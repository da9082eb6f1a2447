"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): interpolate the zero-shot (base) and
fine-tuned weights::

    θ_α = (1 - α) θ_0 + α θ_ft

Layer-wise (heterogeneous) model averaging (Lin et al., "Mitigating the Alignment Tax of RLHF", arXiv 2309.06256,
EMNLP 2024; the method is called AMA, Adaptive Model Averaging, in v1 and HMA, Heterogeneous Model Averaging,
later): the model is split into K parts (blocks of layers by depth, here: path regexes) and part k gets its own
ratio::

    θ_l = (1 - α_{k(l)}) θ_pre,l + α_{k(l)} θ_ft,l        (leaf l in part k(l))

:func:`layerwise_wise_ft` is that data-free merge for given ``alphas``; with every α equal it *is*
:func:`wise_ft` (the same kernel, bit for bit). :func:`learn_layerwise_alphas` learns the α's on data as the
paper's reference code does (github.com/avalonstrel/Mitigating-the-Alignment-Tax-of-RLHF,
``src/lmflow/pipeline/utils/mask_trainer.py``, approach ``mask_norm_sigmoid_linear``): one free logit ``w_k`` per
part, the ratios are the *normalized sigmoids*::

    α_k = ᾱ · K · (σ(w_k) + ε) / Σ_j (σ(w_j) + ε)          so  (1/K) Σ_k α_k = ᾱ  (the sum constraint)

(``init_val`` = ᾱ, 0.2 in the reference's script; ``w_k`` initialized to ``logit(ᾱ)``, so every α_k starts
at ᾱ; ``ε`` is the reference's ``epsilon``, 0.2 in its script: larger ε, smaller spread of the α's), and minimizes
with an optax optimizer::

    L(w) = objective(θ(α(w)))  +  reg · Σ_k c_k |α_k − ᾱ|

``objective`` is the loss on the *new* data (the reference code: the language-model loss on the collected
high-reward RAFT samples, i.e. the reward side; the paper's text was not available here, so the rule above is
transcribed from the code); the old abilities are kept by the constraint that the mean ratio stays ᾱ (the same
budget as uniform WiSE-FT at α = ᾱ) and by the L1 penalty (the script's ``reg_alpha``, 1e-4, with
``sum_reg_type`` 0: c_k = 1, or 0.2: c_k = 25 / (|layer − 13| + 1) for its 26-layer model; pass
``reg_weights``). The α's are not clipped (as in the reference): a large ᾱ·K can give an α_k above 1
(extrapolation past θ_ft).
:mod:`merging.adamerging`'s ``learn_coefficients`` is not reused: its coefficients are free per tensor (clipped),
not one normalized-sigmoid logit per part with this penalty.

Parts: ``groups`` is a list of K regexes (``re.search`` on the leaf path, first match wins; every leaf must
match one); :func:`depth_groups` builds them from the layer index in the paths (the reference's ``block{K}``
split: layers in order, ``L // K`` per block, the rest in the last block).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.progress import progress_bar
from jaxmodels.tree import compute_in_float32, flatten, is_concrete, unflatten
from merging import _common as C
from merging.registry import register
from merging.result import MergeResult

__all__ = ["wise_ft", "layerwise_wise_ft", "learn_layerwise_alphas", "depth_groups", "assign_groups",
           "normalized_alphas"]


@jax.jit
def _wise_leaf(b, x, alpha):
    b = b.astype(jnp.float32)
    return b + alpha * (x.astype(jnp.float32) - b)


@register("wise_ft", needs_base=True, defaults={"alpha": 0.5})
def wise_ft(base: Any, models: Sequence[Any], *, alpha: float | jax.Array = 0.5, check_finite: bool = True) -> Any:
    """``(1-α) base + α models[0]``; ``models`` holds exactly one fine-tuned model. α ∈ [0, 1] (checked when
    concrete; under ``jax.jit`` α may be a traced scalar, used as is)."""
    models = C.as_models(models, 1, "wise_ft")
    if len(models) != 1:
        raise ValueError(f"wise_ft: interpolates one fine-tuned model with the base, got {len(models)} models")
    if base is None:
        raise ValueError("wise_ft: needs the zero-shot model as `base`")
    C.validate_trees(base, models, "wise_ft", check_finite=check_finite)
    C.check_leaf_dtypes(base, models, "wise_ft")
    a_val = C.concrete_scalar(alpha, "alpha", "wise_ft")
    if a_val is not None:
        C.check_unit_interval(a_val, "alpha", "wise_ft")
    a32 = jnp.asarray(alpha, jnp.float32)

    @compute_in_float32
    def run(base, models):
        return C.map_leaves(lambda p, b, xs: _wise_leaf(b, xs[0], a32), base, models)

    return run(base, models)


# ---------------------------------------------------------------------------------------------------------------
# layer-wise ratios (Lin et al.)

def _compile_groups(groups: Sequence[str | re.Pattern], method: str) -> list[re.Pattern]:
    if isinstance(groups, (str, re.Pattern)) or not isinstance(groups, (list, tuple)):
        raise TypeError(f"{method}: `groups` must be a list/tuple of path regexes (one per α), got {groups!r}")
    if not groups:
        raise ValueError(f"{method}: `groups` is empty; give one path regex per α")
    out = []
    for g in groups:
        try:
            out.append(re.compile(g) if isinstance(g, str) else g if isinstance(g, re.Pattern) else None)
        except re.error as e:
            raise ValueError(f"{method}: group regex {g!r} does not compile: {e}") from None
        if out[-1] is None:
            raise TypeError(f"{method}: each group must be a regex string, got {g!r}")
    return out


def assign_groups(tree: Any, groups: Sequence[str | re.Pattern], *, method: str = "assign_groups") -> dict[str, int]:
    """``{leaf path: part index}``: each leaf goes to the first regex of ``groups`` it matches (``re.search``).
    A leaf that matches none raises ``ValueError`` naming it (add a catch-all ``".*"`` as the last group)."""
    pats = _compile_groups(groups, method)
    out = {}
    for p in flatten(tree):
        k = next((i for i, r in enumerate(pats) if r.search(p)), None)
        if k is None:
            raise ValueError(f"{method}: leaf {p!r} matches none of the groups {[r.pattern for r in pats]}; every "
                             "leaf needs a part (add a catch-all '.*' as the last group)")
        out[p] = k
    return out


def depth_groups(tree: Any, n_groups: int, *, layer_pattern: str = r"_(\d+)(?=/|$)") -> list[str]:
    """K = ``n_groups`` path regexes splitting ``tree``'s layers by depth into contiguous blocks, as the reference
    code's ``block{K}`` mask level: the distinct layer indices (the first ``layer_pattern`` match in a path, e.g.
    ``Dense_3`` -> 3), in order, ``L // K`` per block and the remainder in the last. Every leaf path must carry a
    layer index (else ``ValueError``; write the regexes by hand for such trees). Each regex matches its leaves'
    full paths exactly."""
    if not isinstance(n_groups, (int, np.integer)) or n_groups < 1:
        raise ValueError(f"depth_groups: n_groups must be a positive integer, got {n_groups!r}")
    pat = re.compile(layer_pattern)
    idx = {}
    for p in flatten(tree):
        m = pat.search(p)
        if m is None:
            raise ValueError(f"depth_groups: leaf {p!r} has no layer index (layer_pattern {layer_pattern!r}); "
                             "pass explicit `groups` regexes instead")
        idx[p] = int(m.group(1))
    layers = sorted(set(idx.values()))
    if len(layers) < n_groups:
        raise ValueError(f"depth_groups: {len(layers)} layers cannot be split into {n_groups} parts")
    each = len(layers) // n_groups
    block = {layer: min(r // each, n_groups - 1) for r, layer in enumerate(layers)}
    return ["^(?:" + "|".join(re.escape(p) for p in idx if block[idx[p]] == k) + ")$" for k in range(n_groups)]


def _alpha_vector(alphas: Any, k: int, method: str) -> jax.Array:
    if is_concrete(alphas):
        try:
            vals = np.asarray(alphas, np.float32).reshape(-1) if np.ndim(alphas) else None
        except (TypeError, ValueError):
            raise TypeError(f"{method}: `alphas` must be a sequence of numbers, got {alphas!r}") from None
        if vals is None:
            raise ValueError(f"{method}: `alphas` must hold one ratio per group, got the scalar {alphas!r} "
                             "(use wise_ft for one α)")
        if len(vals) != k:
            raise ValueError(f"{method}: {len(vals)} alphas for {k} groups")
        for a in vals:
            C.check_unit_interval(float(a), "alphas", method)
    elif np.shape(alphas) != (k,):
        raise ValueError(f"{method}: `alphas` must have shape ({k},), got {np.shape(alphas)}")
    return jnp.asarray(alphas, jnp.float32)


def _interpolate(base, ft, a32, part):
    """The layer-wise interpolation of two trees with ratios ``a32 [K]`` and ``part`` = {path: k} (float32 out).
    Concrete ratios are split on the host (no per-call slicing programs; each leaf then runs wise_ft's kernel)."""
    fb, ff = flatten(base), flatten(ft)
    if is_concrete(a32):
        a32 = [jnp.asarray(v, jnp.float32) for v in np.asarray(jax.device_get(a32), np.float32)]
    return unflatten({p: _wise_leaf(b, ff[p], a32[part[p]]) for p, b in fb.items()}, like=base)


def layerwise_wise_ft(base: Any, models: Sequence[Any], *, alphas: Sequence[float] | jax.Array,
                      groups: Sequence[str | re.Pattern], check_finite: bool = True) -> Any:
    """``θ_l = (1 − α_k) θ_0,l + α_k θ_ft,l`` for every leaf ``l`` of part ``k`` (Lin et al.'s layer-wise model
    averaging; see the module docstring). ``models`` holds exactly one fine-tuned model; ``base`` is θ_0 (the
    pre-trained / pre-RLHF model). ``groups``: K path regexes (first match wins, every leaf must match one; e.g.
    :func:`depth_groups`); ``alphas``: K ratios in [0, 1] (checked when concrete; a traced ``[K]`` array under
    ``jax.jit``). Every leaf is computed in float32 and returned in its own dtype. Not in the registry: the CLI's
    list-valued settings are gradients over the layer index, and ``wise_ft`` with a per-tensor ``alpha`` setting
    (filters or a gradient) already is the CLI's layer-wise WiSE-FT."""
    method = "layerwise_wise_ft"
    models = C.as_models(models, 1, method)
    if len(models) != 1:
        raise ValueError(f"{method}: interpolates one fine-tuned model with the base, got {len(models)} models")
    if base is None:
        raise ValueError(f"{method}: needs the pre-trained model as `base`")
    pats = _compile_groups(groups, method)
    a32 = _alpha_vector(alphas, len(pats), method)
    C.validate_trees(base, models, method, check_finite=check_finite)
    C.check_leaf_dtypes(base, models, method)
    part = assign_groups(base, pats, method=method)

    @compute_in_float32
    def run(base, models):
        return _interpolate(base, models[0], a32, part)

    return run(base, models)


def normalized_alphas(logits: jax.Array, *, mean: float, epsilon: float = 0.2) -> jax.Array:
    """The reference code's normalized-sigmoid ratios ``α_k = ᾱ K (σ(w_k) + ε) / Σ_j (σ(w_j) + ε)`` (``mean`` =
    ᾱ): their mean is exactly ᾱ for any logits ``w`` [K]."""
    return _alphas_of(jnp.asarray(logits, jnp.float32), (mean, epsilon))


@jax.jit
def _alphas_of(w, hp):
    s = jax.nn.sigmoid(w) + hp[1]
    return hp[0] * s.shape[0] * s / s.sum()


@functools.lru_cache(maxsize=32)
def _learner(objective, tx, part_items, with_batches, steps):
    """The jitted AMA learner of one (objective, tx, parts) combination: ``run_steps`` (every step in one
    ``lax.scan``, when the objective takes no batch) and ``step`` (one step, for a batch stream). The scalars
    ``hp = (ᾱ, ε, reg, c)`` are arguments, so changing them does not recompile."""
    part = dict(part_items)

    def loss_fn(w, base, ft, batch, hp):
        a = _alphas_of(w, hp)
        params = _interpolate(base, ft, a, part)
        params = jax.tree.map(lambda y, b: y.astype(b.dtype), params, base)
        data = jnp.asarray(objective(params, batch) if with_batches else objective(params), jnp.float32)
        return data + hp[2] * jnp.sum(hp[3] * jnp.abs(a - hp[0])), data

    def one(w, state, base, ft, batch, hp):
        (loss, data), g = jax.value_and_grad(loss_fn, has_aux=True)(w, base, ft, batch, hp)
        u, state = tx.update(g, state, w)
        return optax.apply_updates(w, u), state, loss, data

    @jax.jit
    def run_steps(w, state, base, ft, hp):
        def body(carry, _):
            w, state = carry
            w, state, loss, data = one(w, state, base, ft, None, hp)
            return (w, state), (loss, data)

        (w, _), (losses, datas) = jax.lax.scan(body, (w, state), None, length=steps)
        return w, losses, datas

    return run_steps, jax.jit(one)


def learn_layerwise_alphas(base: Any, models: Sequence[Any], objective: Callable[..., jax.Array], *,
                           groups: Sequence[str | re.Pattern], steps: int = 100,
                           tx: optax.GradientTransformation | None = None, init: float = 0.2,
                           epsilon: float = 0.2, reg: float = 0.0, reg_weights: Sequence[float] | None = None,
                           batches: Iterable | None = None, check_finite: bool = True,
                           progress: bool | None = None) -> MergeResult:
    """Learn the layer-wise ratios of :func:`layerwise_wise_ft` (Lin et al.'s AMA / HMA; module docstring):
    minimize ``objective(θ(α(w))) + reg Σ_k c_k |α_k − ᾱ|`` over one logit per part with ``tx`` (default
    ``optax.adam(1e-2)``), α(w) the normalized sigmoids with mean ``init`` = ᾱ, every α_k starting at ᾱ.

    ``objective(params) -> scalar`` (the loss to minimize on the new task, closing over its data), or
    ``objective(params, batch)`` with ``batches`` (a re-iterable, cycled: one batch per step). ``reg_weights``:
    the c_k (default 1 each). ``models`` holds exactly one fine-tuned model, ``base`` θ_0. Differentiated through
    the merge; without ``batches`` all steps run as one compiled ``lax.scan`` (``progress`` is then unused), with
    them one jitted step per batch. Compiled once per ``(objective, tx, parts, steps)`` (pass the same objects to
    reuse it; ᾱ, ε, reg are arguments); the trees may be sharded (the merge is leaf-wise). Returns
    ``MergeResult(params, info)``: ``params`` the merged tree (each leaf in its own dtype) and ``info`` with
    ``alphas`` ([K], as used), ``losses`` (the full objective per step, before the step's update) and
    ``objective`` (its data term)."""
    method = "learn_layerwise_alphas"
    models = C.as_models(models, 1, method)
    if len(models) != 1:
        raise ValueError(f"{method}: interpolates one fine-tuned model with the base, got {len(models)} models")
    if base is None:
        raise ValueError(f"{method}: needs the pre-trained model as `base`")
    if not callable(objective):
        raise TypeError(f"{method}: `objective` must be callable, got {type(objective).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"{method}: steps must be a positive integer, got {steps!r}")
    C.check_unit_interval(float(init), "init", method, open_low=True, open_high=True)
    for name, v in (("epsilon", epsilon), ("reg", reg)):
        if not (math.isfinite(float(v)) and float(v) >= 0):
            raise ValueError(f"{method}: `{name}` must be a finite number >= 0, got {v}")
    pats = _compile_groups(groups, method)
    K = len(pats)
    c = np.ones(K, np.float32) if reg_weights is None else np.asarray(reg_weights, np.float32).reshape(-1)
    if c.shape != (K,) or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError(f"{method}: `reg_weights` needs {K} finite non-negative numbers, got {reg_weights!r}")
    C.validate_trees(base, models, method, check_finite=check_finite)
    C.check_leaf_dtypes(base, models, method)
    part = assign_groups(base, pats, method=method)
    tx = optax.adam(1e-2) if tx is None else tx
    hp = (jnp.float32(init), jnp.float32(epsilon), jnp.float32(reg), jnp.asarray(c, jnp.float32))
    w = jnp.full((K,), math.log(init / (1.0 - init)), jnp.float32)
    key = (objective, tx, tuple(sorted(part.items())), batches is not None, int(steps))
    try:
        run_steps, step = _learner(*key)
    except TypeError:  # an unhashable objective / tx: compile for this call only
        run_steps, step = _learner.__wrapped__(*key)
    if batches is None:
        w, losses, datas = run_steps(w, tx.init(w), base, models[0], hp)
    else:
        stream, state, losses, datas = C.cycle_batches(batches, method), tx.init(w), [], []
        for _ in progress_bar(range(int(steps)), progress, desc=method, leave=False):
            w, state, loss, data = step(w, state, base, models[0], next(stream), hp)
            losses.append(loss)
            datas.append(data)
    a = _alphas_of(w, hp)

    @compute_in_float32
    def run(base, models):
        return _interpolate(base, models[0], a, part)

    params = run(base, models)
    return MergeResult(params, {"alphas": np.asarray(a), "losses": np.asarray(jax.device_get(losses)),
                                "objective": np.asarray(jax.device_get(datas))})
