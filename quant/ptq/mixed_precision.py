"""Layer-wise mixed-precision PTQ under an average-bit budget.

Importance scores
-----------------
* **LIM** — Layer Input Modification (Dumitru et al., 2024, "Layer-wise Quantization: A Pragmatic and Effective
  Method for Quantizing LLMs Beyond Integer Bit-levels", arXiv 2406.17415, §3.1): a layer that changes its input
  more is more important,

      LIM(L_i) = − (L_iᴵ · L_iᴼ) / (‖L_iᴵ‖ ‖L_iᴼ‖),

  with L_iᴵ / L_iᴼ the hidden state entering / leaving transformer block i, computed per token and averaged over
  the real (non-padding) calibration tokens: LIM_i = − Σ_t m_t cos(h_t^{(i)}, h_t^{(i+1)}) / Σ_t m_t.
* **ZD** — z-score Distribution (same paper, §3.1): with μ, σ the mean and standard deviation of all the weights
  θ of block i (its linear kernels, the weights that are quantized),

      ZD(L_i) = |{θ_j : z_j > 1}| / N_i,   z_j = (θ_j − μ) / σ,

  the fraction of weights "much larger than average" (threshold 1, one-sided as the paper words it; the
  ``zd_threshold`` option changes it). The paper's abstract attaches "(smaller is better)" to this score while
  third-party implementations that follow the paper (e.g. MAQ) rank a larger ZD as more important; here the larger
  ZD is ranked more important, which is also what the experiment on all-MiniLM-L6-v2 supports (the larger-ZD
  allocation at 3.5 bits reaches embedding cosine .917, the smaller-ZD one .866); ``reverse=True`` flips it.
* **Hessian trace** — HAWQ-V2 (Dong et al., 2019, "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural
  Networks"): the average Hessian trace of every linear, estimated with Hutchinson's method (Rademacher probes v,
  Hessian-vector products by forward-over-reverse differentiation, ``jax.jvp`` of ``jax.grad``):

      Tr(H_i) ≈ (1/m) Σ_{k=1..m} v_{k,i}ᵀ (H v_k)_i,

  one probe over all the linears at once gives an unbiased estimate of every diagonal block's trace (the
  off-diagonal terms v_iᵀ H_ij v_j have zero mean). HAWQ-V2's sensitivity of layer i at b bits is

      Ω_i(b) = Tr(H_i) / n_i · ‖Q_b(W_i) − W_i‖²_F

  (n_i weights; Q_b the RTN grid of the chosen group size). The loss: a sentence encoder has no labels, so the loss
  is the distance of the embeddings to the float model's, L(θ) = (1/B) Σ_b ‖f(x_b; θ) − f(x_b; θ₀)‖². Its gradient
  is zero at θ₀ and its Hessian there is 2JᵀJ ⪰ 0, so ΔL ≈ ½ ΔθᵀHΔθ exactly to second order — the assumption of
  HAWQ (a converged model at a flat point of its loss) holds by construction; and with L2-normalized embeddings
  L = 2(1 − mean cos(f, f₀)), the very metric the quantized encoder is judged by.

Allocation
----------
Given candidate bit widths and a budget B̄ on the average bits per quantized weight, Σ_i n_i b_i ≤ B̄ Σ_i n_i:

* ranked (LIM / ZD, per transformer block, as the layer-wise paper): blocks sorted by importance (descending);
  with the two levels lo < hi (default: the candidates bracketing B̄) the longest prefix of the ranking that fits
  the budget gets hi bits, the rest lo — the paper's "most important layers at higher bits";
* knapsack (Hessian, per linear, as HAWQ-V2's Pareto frontier): min Σ_i Ω_i(b_i) subject to the budget, solved
  exactly by dynamic programming over the Pareto frontier of (bits used, Σ Ω) (a multiple-choice knapsack with
  integer weights n_i b_i).

The chosen bits are then applied per linear with RTN or GPTQ (blocks in order, each block fed by the already
quantized previous blocks as GPTQ's ``opt_sequential``). The report gives the achieved weights-weighted average
bits and the real bits per weight of the packed checkpoint (codes + float16 group scales + uint8 zero points (+ the
act-order permutation), the bytes :func:`quant.ptq.export.pack_layer` stores, from the shapes of the packed arrays).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from fractions import Fraction
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import flatten, unflatten

from ._common import check_bits, grid_record, pbar, rtn_minmax
from .blocks import capture_dense, dense_names, get_sub, set_kernels, set_sub
from .gptq import GPTQConfig, gptq_quantize_weight, hessian_from_inputs, layer_error

__all__ = ["MixedPrecisionConfig", "lim_score", "lim_scores", "z_score_fraction", "zd_scores", "hutchinson_trace",
           "hessian_traces", "hawq_sensitivity", "packed_bytes", "allocate_ranked", "allocate_knapsack",
           "importance_scores", "mixed_precision"]

SCORES = ("lim", "zd", "hessian")
METHODS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class MixedPrecisionConfig:
    """``budget``: average bits per quantized weight; ``candidates``: allowed bit widths; ``score``: "lim", "zd"
    (ranked per block) or "hessian" (knapsack per linear); ``method``: "rtn" or "gptq"; ``group_size``/``sym``: the
    grid (GPTQ also ``act_order``, ``percdamp``); ``levels``: (lo, hi) of the ranked allocation (default: the
    candidates bracketing the budget); ``reverse``: least-important-first (the ablation); ``zd_threshold``: ZD's
    z-score threshold; ``n_probes``/``tol``/``seed``: Hutchinson probes, early stop when the running mean of the
    total trace changes by less than ``tol`` relatively (PyHessian's rule), probe seed."""

    budget: float = 3.5
    candidates: tuple[int, ...] = (2, 3, 4, 8)
    score: str = "lim"
    method: str = "rtn"
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    percdamp: float = 0.01
    levels: tuple[int, int] | None = None
    reverse: bool = False
    zd_threshold: float = 1.0
    n_probes: int = 16
    tol: float | None = None
    seed: int = 0

    def validate(self) -> None:
        c = self.candidates
        if not isinstance(c, (tuple, list)) or not c:
            raise ValueError(f"candidates must be a non-empty tuple of bit widths, got {c!r}")
        for b in c:
            check_bits(b, self.group_size)
        if len(set(c)) != len(c):
            raise ValueError(f"candidates must be distinct, got {c!r}")
        if (not isinstance(self.budget, numbers.Real) or isinstance(self.budget, bool)
                or not math.isfinite(self.budget) or not min(c) <= self.budget <= max(c)):
            raise ValueError(f"budget must be a number in [{min(c)}, {max(c)}] (the candidate range), "
                             f"got {self.budget!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.levels is not None:
            if self.score == "hessian":
                raise ValueError("levels applies to the ranked (lim / zd) allocation, not to score='hessian'")
            if (len(self.levels) != 2 or any(lv not in c for lv in self.levels)
                    or not self.levels[0] < self.levels[1]):
                raise ValueError(f"levels must be (lo, hi), lo < hi, both in candidates {c}, got {self.levels!r}")
            if not self.levels[0] <= self.budget <= self.levels[1]:
                raise ValueError(f"budget {self.budget} is outside levels {self.levels}")
        if not isinstance(self.zd_threshold, numbers.Real) or not math.isfinite(self.zd_threshold):
            raise ValueError(f"zd_threshold must be a finite number, got {self.zd_threshold!r}")
        if not isinstance(self.n_probes, int) or self.n_probes < 1:
            raise ValueError(f"n_probes must be a positive integer, got {self.n_probes!r}")
        if self.tol is not None and not (isinstance(self.tol, numbers.Real) and self.tol > 0):
            raise ValueError(f"tol must be None or positive, got {self.tol!r}")
        if self.method == "gptq":
            GPTQConfig(bits=c[0], group_size=self.group_size, sym=self.sym, act_order=self.act_order,
                       percdamp=self.percdamp).validate()


# ------------------------------------------------------------------------------------------------- LIM and ZD


def lim_score(x_in: jax.Array, x_out: jax.Array, token_weight: jax.Array | None = None) -> jax.Array:
    """LIM (Dumitru et al., 2024): − Σ_t m_t cos(x_in_t, x_out_t) / Σ_t m_t over tokens ``[..., d]`` (``m``: token
    weights ``[...]``, 1 = real token, 0 = padding; default all 1). float32 scalar; jit-able."""
    a = jnp.asarray(x_in, jnp.float32)
    b = jnp.asarray(x_out, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"lim_score: input {a.shape} and output {b.shape} shapes differ")
    den = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)
    cos = jnp.sum(a * b, axis=-1) / den
    m = jnp.ones(cos.shape, jnp.float32) if token_weight is None else jnp.asarray(token_weight, jnp.float32)
    return -jnp.sum(m * cos) / jnp.maximum(jnp.sum(m), 1e-30)


def z_score_fraction(w: jax.Array, threshold: float = 1.0) -> jax.Array:
    """ZD (Dumitru et al., 2024) of one weight array (or the concatenation of a layer's): the fraction of elements
    with z = (θ − μ)/σ > ``threshold`` (μ, σ: mean and population standard deviation). float32 scalar; jit-able."""
    x = jnp.asarray(w, jnp.float32).ravel()
    z = (x - x.mean()) / jnp.maximum(x.std(), 1e-30)
    return jnp.mean((z > threshold).astype(jnp.float32))


def _block_kernels(params, model) -> dict[str, dict[str, jax.Array]]:
    out = {}
    for bp in model.block_paths:
        block = get_sub(params, bp)
        out[bp] = {f"{bp}/{n}/kernel": get_sub(block, n)["kernel"] for n in dense_names(block)}
    return out


def lim_scores(params, model, calib_batch, *, progress: bool | None = None) -> dict[str, float]:
    """LIM of every block of ``model`` (a :class:`quant.ptq.blocks.BlockModel`) on the float model's hidden states
    of ``calib_batch``: ``{block_path: LIM}`` (higher = the block changes its input more = more important)."""
    h, ctx = model.embed(params, calib_batch)
    tok = model.token_weight(ctx)
    out = {}
    for bp in pbar(model.block_paths, progress, desc="LIM"):
        h2 = model.apply_block(get_sub(params, bp), h, ctx)
        out[bp] = float(_lim_jit(h, h2, tok))
        h = h2
    return out


_lim_jit = jax.jit(lim_score)


def zd_scores(params, model, threshold: float = 1.0) -> dict[str, float]:
    """ZD of every block: the z-score fraction over the concatenation of the block's linear kernels."""
    out = {}
    for bp, ks in _block_kernels(params, model).items():
        w = jnp.concatenate([jnp.ravel(k) for k in ks.values()])
        out[bp] = float(z_score_fraction(w, threshold))
    return out


# ------------------------------------------------------------------------------------- Hessian trace (HAWQ-V2)


def _probe_impl(loss_fn, params, key, *args):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    v = jax.tree_util.tree_unflatten(
        treedef, [jax.random.rademacher(k, l.shape, jnp.float32) for k, l in zip(keys, leaves)])
    _, hv = jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))
    return jax.tree_util.tree_map(lambda a, b: jnp.vdot(a, b), v, hv)


_probe = jax.jit(_probe_impl, static_argnums=0)


def hutchinson_trace(loss_fn: Callable, params, *args, n_probes: int = 16, seed: int = 0, tol: float | None = None,
                     progress: bool | None = None):
    """Hutchinson's estimate of the trace of every diagonal block of the Hessian of ``loss_fn(params, *args)`` with
    respect to ``params`` (any pytree; one block per leaf), as in HAWQ-V2 / PyHessian:

        Tr(H_ℓ) ≈ (1/m) Σ_k v_{k,ℓ}ᵀ (H v_k)_ℓ,   v_k ~ Rademacher over all leaves at once,

    H v by forward-over-reverse (``jax.jvp`` of ``jax.grad``), in float32. ``tol``: stop early when the running mean
    of the total trace changes by less than ``tol`` relatively (PyHessian); ``n_probes`` is the maximum.
    ``loss_fn`` must be hashable (a module-level function or a cached one): the probe is jitted with it static.

    Returns ``(traces, samples)``: pytrees like ``params`` of Python floats and of per-probe NumPy samples ``[m]``.
    """
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be None or positive, got {tol!r}")
    p32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    key = jax.random.PRNGKey(seed)
    samples, prev = [], None
    for k in pbar(range(n_probes), progress, desc="Hutchinson"):
        s = _probe(loss_fn, p32, jax.random.fold_in(key, k), *args)
        samples.append(jax.tree_util.tree_map(float, s))
        total = float(np.mean([sum(jax.tree_util.tree_leaves(x)) for x in samples]))
        if tol is not None and prev is not None and abs(total - prev) / (abs(prev) + 1e-6) < tol:
            break
        prev = total
    stacked = jax.tree_util.tree_map(lambda *xs: np.asarray(xs, np.float64), *samples)
    return jax.tree_util.tree_map(lambda s: float(np.mean(s)), stacked), stacked


def _model_loss(model):
    """``loss(kernels, params, batch, f0) = (1/B) Σ_b ‖f(x_b; θ) − f0_b‖²`` for ``model``, cached on the model so that
    the jitted Hutchinson probe compiles once per model."""
    fn = model.__dict__.get("_mixed_precision_loss")
    if fn is None:
        def fn(kernels, params, batch, f0):
            flat = dict(flatten(params))
            flat.update(kernels)
            out = model.forward(unflatten(flat, like=params), batch)
            d = jnp.asarray(out, jnp.float32) - f0
            return jnp.sum(d * d) / d.shape[0]

        model.__dict__["_mixed_precision_loss"] = fn
    return fn


def hessian_traces(params, model, calib_batch, *, n_probes: int = 16, seed: int = 0, tol: float | None = None,
                   progress: bool | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Hutchinson traces Tr(H_i) of every linear kernel of ``model``'s blocks for the embedding-distance loss
    L(θ) = (1/B) Σ_b ‖f(x_b; θ) − f(x_b; θ₀)‖² at θ = θ₀ (see the module docstring). Returns
    ``({kernel_path: trace}, {kernel_path: per-probe samples})``."""
    kernels = {p: k for ks in _block_kernels(params, model).values() for p, k in ks.items()}
    p32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    batch = jax.tree_util.tree_map(jnp.asarray, calib_batch)
    f0 = jnp.asarray(model.forward(p32, batch), jnp.float32)
    return hutchinson_trace(_model_loss(model), kernels, p32, batch, f0, n_probes=n_probes, seed=seed, tol=tol,
                            progress=progress)


def hawq_sensitivity(trace, w: jax.Array, w_hat: jax.Array) -> jax.Array:
    """HAWQ-V2: Ω = Tr(H) / n · ‖Ŵ − W‖²_F (n = number of weights). float32 scalar; jit-able."""
    w = jnp.asarray(w, jnp.float32)
    d = jnp.asarray(w_hat, jnp.float32) - w
    return jnp.asarray(trace, jnp.float32) / w.size * jnp.sum(d * d)


@functools.partial(jax.jit, static_argnames=("group_size", "sym"))
def _rtn(w, bits, group_size, sym):
    """RTN of a Flax kernel ``w[in, out]`` on the GPTQ min/max grid (:func:`quant.ptq._common.rtn_minmax`, the grid
    of :func:`quant.ptq.rtn.rtn_quantize_weight`) with ``bits`` traced: one compilation per kernel shape serves every
    candidate bit width. Returns ``(w_hat [in, out] float32, codes [in, out] uint8, scale, zero [out, groups])``."""
    w_hat, codes, scale, zero = rtn_minmax(jnp.asarray(w, jnp.float32).T, bits, group_size, sym)
    return w_hat.T, codes.T, scale, zero


def _rtn_record(w, bits: int, group_size: int, sym: bool) -> dict:
    """The record of :func:`quant.ptq.rtn.rtn_quantize_weight` (``weight`` in ``w``'s dtype, ``codes``, ``scale``,
    ``zero``, ``g_idx``, ``perm``), computed by the traced-bits :func:`_rtn`."""
    w_hat, codes, scale, zero = _rtn(w, jnp.int32(bits), group_size, sym)
    return grid_record(w, w_hat.T, codes.T, scale, zero, group_size)


@functools.partial(jax.jit, static_argnames=("group_size", "sym"))
def _sensitivity(trace, w, bits, group_size, sym):
    return hawq_sensitivity(trace, w, _rtn(w, bits, group_size, sym)[0])


def packed_bytes(shape: tuple[int, int], bits: int, group_size: int, perm: bool = False) -> int:
    """Bytes of one ``[in, out]`` kernel as :func:`quant.ptq.export.pack_layer` stores it: the packed codes of
    :func:`quant.qarray.quantize` (asymmetric int, groups of ``group_size`` inputs; shapes from ``jax.eval_shape``,
    nothing is computed), float16 scales, uint8 zero points, and the act-order permutation when ``perm``."""
    from quant.formats import IntFormat, QParams
    from quant.qarray import quantize

    n_in, n_out = shape
    gs = n_in if group_size == -1 else group_size
    fmt = IntFormat(bits, symmetric=False, granularity="group", group_size=gs)
    g = jax.ShapeDtypeStruct((n_in // gs, n_out), jnp.float32)
    qa = jax.eval_shape(lambda w, s, z: quantize(w, fmt, QParams(s, z)),
                        jax.ShapeDtypeStruct(shape, jnp.float32), g, g)
    nb = qa.packed.size * qa.packed.dtype.itemsize + qa.scale.size * 2 + qa.zero.size * qa.zero.dtype.itemsize
    return int(nb + (n_in * (2 if n_in < 32768 else 4) if perm else 0))


# ---------------------------------------------------------------------------------------------------- allocation


def _capacity(budget, sizes: Mapping[str, int]) -> tuple[int, int]:
    """(g, C): g = gcd of the sizes, C = ⌊budget · Σ n / g⌋ — the budget in units of g weight-bits (exact)."""
    ns = [int(n) for n in sizes.values()]
    if not ns or any(n < 1 for n in ns):
        raise ValueError(f"sizes must be positive integers, got {dict(sizes)}")
    g = math.gcd(*ns)
    return g, math.floor(Fraction(float(budget)) * sum(ns) / g)


def allocate_ranked(importance: Mapping[str, float], sizes: Mapping[str, int], budget: float,
                    levels: tuple[int, int]) -> dict[str, int]:
    """The layer-wise paper's allocation: rank by ``importance`` (descending; ties keep the given order); the longest
    prefix of the ranking that keeps Σ n_i b_i ≤ budget · Σ n_i gets ``hi`` bits, the rest ``lo`` (so a more important
    layer never gets fewer bits). ``budget`` must be in [lo, hi]."""
    lo, hi = levels
    if set(importance) != set(sizes):
        raise ValueError("importance and sizes must have the same keys")
    if not lo <= budget <= hi:
        raise ValueError(f"need lo <= budget <= hi, got levels {levels}, budget {budget}")
    g, cap = _capacity(budget, sizes)
    names = list(importance)
    order = sorted(range(len(names)), key=lambda i: -float(importance[names[i]]))
    used = sum(int(sizes[n]) // g * lo for n in names)
    bits = {n: lo for n in names}
    for i in order:
        n = names[i]
        extra = int(sizes[n]) // g * (hi - lo)
        if used + extra > cap:
            break
        used += extra
        bits[n] = hi
    return bits


def allocate_knapsack(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
                      budget: float) -> dict[str, int]:
    """HAWQ-V2's allocation: min Σ_i c_i(b_i) subject to Σ_i n_i b_i ≤ budget · Σ_i n_i, b_i among the keys of
    ``costs[i]`` — solved exactly (multiple-choice knapsack) by dynamic programming over the Pareto frontier of
    (weight-bits used, total cost), item by item; backtracking gives the choice. Raises if no choice fits."""
    if set(costs) != set(sizes):
        raise ValueError("costs and sizes must have the same keys")
    g, cap = _capacity(budget, sizes)
    names = list(costs)
    size = np.zeros(1, np.int64)
    cost = np.zeros(1, np.float64)
    back = []  # per item: (parent index, bit choice) of every frontier state
    for n in names:
        opts = sorted(costs[n].items())
        w = int(sizes[n]) // g
        s = np.concatenate([size + w * b for b, _ in opts])
        c = np.concatenate([cost + float(v) for _, v in opts])
        parent = np.tile(np.arange(size.size), len(opts))
        choice = np.repeat([b for b, _ in opts], size.size)
        ok = s <= cap
        s, c, parent, choice = s[ok], c[ok], parent[ok], choice[ok]
        if s.size == 0:
            raise ValueError(f"no allocation fits the budget {budget} (even the smallest bits exceed it)")
        idx = np.lexsort((c, s))  # by size, then cost
        s, c, parent, choice = s[idx], c[idx], parent[idx], choice[idx]
        # Pareto frontier: keep a state only if its cost is strictly below every smaller-or-equal-size state's
        best = np.minimum.accumulate(c)
        keep = np.ones(s.size, bool)
        keep[1:] = c[1:] < best[:-1]
        size, cost = s[keep], c[keep]
        back.append((parent[keep], choice[keep]))
    i = int(np.argmin(cost))  # the frontier's last state is the cheapest; argmin is the same, explicitly
    bits = {}
    for n, (parent, choice) in zip(reversed(names), reversed(back)):
        bits[n] = int(choice[i])
        i = int(parent[i])
    return {n: bits[n] for n in names}


# --------------------------------------------------------------------------------------------------- the method


def _default_levels(candidates, budget) -> tuple[int, int]:
    c = sorted(candidates)
    lo = max(b for b in c if b <= budget)
    hi = min(b for b in c if b >= budget)
    return lo, hi


def _check_model(params, model, config: MixedPrecisionConfig, calib_batch, have_scores: bool = False):
    if calib_batch is None and config.method == "gptq":
        raise ValueError("method='gptq' needs a calibration batch")
    if calib_batch is None and config.score in ("lim", "hessian") and not have_scores:
        raise ValueError(f"score={config.score!r} needs a calibration batch (or precomputed scores=)")
    kernels = _block_kernels(params, model)
    if not any(kernels.values()):
        raise ValueError("the model's blocks have no 2-D linear kernels to quantize")
    gs = config.group_size
    for ks in kernels.values():
        for p, k in ks.items():
            if gs != -1 and k.shape[0] % gs:
                raise ValueError(f"{p}: input features {k.shape[0]} are not divisible by group_size {gs}")
    return kernels


def importance_scores(params, model, calib_batch, config: MixedPrecisionConfig, *,
                      progress: bool | None = None) -> dict:
    """The scores ``config.score`` asks for: ``{"score": name, "scores": {block_path: value}}`` for LIM / ZD,
    ``{"score": "hessian", "scores": {kernel_path: Tr(H)}, "samples": {kernel_path: probes}}`` for the Hessian.
    Pass the result as ``mixed_precision(..., scores=...)`` to reuse it across budgets or orderings."""
    config.validate()
    _check_model(params, model, config, calib_batch)
    if config.score == "lim":
        return {"score": "lim", "scores": lim_scores(params, model, calib_batch, progress=progress)}
    if config.score == "zd":
        return {"score": "zd", "scores": zd_scores(params, model, config.zd_threshold)}
    tr, samples = hessian_traces(params, model, calib_batch, n_probes=config.n_probes, seed=config.seed,
                                 tol=config.tol, progress=progress)
    return {"score": "hessian", "scores": tr, "samples": samples}


def _reverse_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """The same multiset of values with the ranking reversed (largest ↔ smallest)."""
    names = list(values)
    order = sorted(names, key=lambda n: values[n])
    sorted_vals = sorted(values.values(), reverse=True)
    return {n: v for n, v in zip(order, sorted_vals)}


def mixed_precision(params, model, calib_batch, config: MixedPrecisionConfig = MixedPrecisionConfig(), *,
                    progress: bool | None = None, scores: dict | None = None):
    """Layer-wise mixed-precision PTQ of every linear of ``model``'s blocks under ``config.budget`` average bits.

    LIM / ZD: one bit width per block from the ranked allocation (Dumitru et al., 2024); Hessian: one per linear from
    HAWQ-V2's exact knapsack over Ω_i(b) = Tr(H_i)/n_i · ‖Q_b(W_i) − W_i‖². Then RTN or GPTQ at each layer's bits.

    Returns ``(quantized_params, report)``; the report has ``scores``, ``bits`` ({kernel_path: b}), ``block_bits``
    (ranked scores), ``sensitivity`` (Hessian: {kernel_path: {b: Ω}}), ``average_bits`` (Σ n_i b_i / Σ n_i),
    ``real_bits`` (8 · packed bytes / Σ n_i, the bytes :func:`quant.ptq.export.pack_layer` stores) and ``layers``
    ({kernel_path: the RTN/GPTQ record + ``bits``}, as :func:`quant.ptq.gptq.gptq`).
    """
    config.validate()
    kernels = _check_model(params, model, config, calib_batch, scores is not None)
    if scores is None:
        scores = importance_scores(params, model, calib_batch, config, progress=progress)
    elif scores.get("score") != config.score:
        raise ValueError(f"scores were computed for {scores.get('score')!r}, config.score is {config.score!r}")
    flat_k = {p: k for ks in kernels.values() for p, k in ks.items()}
    sizes = {p: int(np.prod(k.shape)) for p, k in flat_k.items()}
    gs, sym = config.group_size, config.sym
    report: dict[str, Any] = {"method": "mixed_precision", "config": dataclasses.asdict(config),
                              "scores": dict(scores["scores"])}

    if config.score in ("lim", "zd"):
        imp = dict(scores["scores"])
        if set(imp) != set(kernels):
            raise ValueError("scores do not name the model's blocks")
        if config.reverse:
            imp = {k: -v for k, v in imp.items()}
        levels = config.levels or _default_levels(config.candidates, config.budget)
        block_sizes = {bp: sum(sizes[p] for p in ks) for bp, ks in kernels.items()}
        block_bits = allocate_ranked(imp, block_sizes, config.budget, levels)
        bits = {p: block_bits[bp] for bp, ks in kernels.items() for p in ks}
        report["block_bits"] = block_bits
        report["levels"] = tuple(levels)
    else:
        tr = dict(scores["scores"])
        if set(tr) != set(flat_k):
            raise ValueError("scores do not name the model's linear kernels")
        tr = {p: max(v, 0.0) for p, v in tr.items()}  # H = 2JᵀJ ⪰ 0: a negative estimate is probe noise
        per_w = {p: tr[p] / sizes[p] for p in tr}
        if config.reverse:
            per_w = _reverse_ranks(per_w)
        sens = {}
        for p in pbar(list(flat_k), progress, desc="HAWQ sensitivity"):
            sens[p] = {}
            for b in config.candidates:
                sens[p][b] = float(_sensitivity(per_w[p] * sizes[p], flat_k[p], jnp.int32(b), gs, sym))
        bits = allocate_knapsack(sens, sizes, config.budget)
        report["sensitivity"] = sens
        report["traces"] = tr

    # quantize, block by block
    out = params
    layers = {}
    h = ctx = tok = None
    if calib_batch is not None:
        h, ctx = model.embed(params, calib_batch)
        tok = model.token_weight(ctx)
    for bp in pbar(model.block_paths, progress, desc=f"{config.method} mixed {config.budget}b"):
        block = get_sub(params, bp)
        rec = capture_dense(model, block, h, ctx)[1] if h is not None else None
        new_k = {}
        for name in dense_names(block):
            p = f"{bp}/{name}/kernel"
            k = flat_k[p]
            b = bits[p]
            if config.method == "rtn":
                r = _rtn_record(k, b, gs, sym)
            else:
                H = hessian_from_inputs(rec[name][0], tok)
                r = gptq_quantize_weight(k, H, GPTQConfig(b, gs, sym, config.act_order, percdamp=config.percdamp))
            if rec is not None:
                r["error"] = layer_error(rec[name][0], k, r["weight"], tok)
            r["bits"] = b
            layers[p] = r
            new_k[name] = r["weight"]
        qblock = set_kernels(block, new_k)
        out = set_sub(out, bp, qblock)
        if h is not None:
            h = model.apply_block(qblock, h, ctx)

    n_total = sum(sizes.values())
    report["bits"] = bits
    report["average_bits"] = sum(sizes[p] * bits[p] for p in bits) / n_total
    report["real_bits"] = 8.0 * sum(packed_bytes(tuple(flat_k[p].shape), bits[p], gs, _needs_perm(layers[p], gs))
                                    for p in bits) / n_total
    report["layers"] = layers
    return out, report



def _needs_perm(rec: dict, group_size: int) -> bool:
    """Whether :func:`quant.ptq.export.pack_layer` stores an input permutation (act-order, dynamic groups)."""
    n_in = len(rec["g_idx"])
    gs = n_in if group_size == -1 else group_size
    return not np.array_equal(np.asarray(rec["g_idx"]), np.arange(n_in) // gs)
