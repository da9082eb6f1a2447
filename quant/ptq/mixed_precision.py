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

Modules: scores (LIM, ZD, Hutchinson, HAWQ-V2 sensitivity) in :mod:`quant.ptq.mixed_precision_scores`, the
allocations in :mod:`quant.ptq.mixed_precision_allocation`, the byte count in :func:`quant.ptq.export.packed_bytes`;
this module has the config and the quantize loop. Nothing is written into the caller's model or params.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._common import check_bits, grid_record, pbar, rtn_minmax
from .export import needs_perm, packed_bytes
from .gptq import GPTQConfig, gptq_quantize_weight
# the seams of the method, in their own modules (their names stay importable from here)
from .mixed_precision_allocation import allocate_knapsack, allocate_ranked, default_levels, reverse_ranks
from .mixed_precision_scores import (
    block_kernels, hawq_sensitivity, hessian_traces, hutchinson_trace, lim_score, lim_scores, z_score_fraction,
    zd_scores,
)

__all__ = ["MixedPrecisionConfig", "lim_score", "lim_scores", "z_score_fraction", "zd_scores", "hutchinson_trace",
           "hessian_traces", "hawq_sensitivity", "packed_bytes", "allocate_ranked", "allocate_knapsack",
           "importance_scores", "mixed_precision"]

SCORES = ("lim", "zd", "hessian", "random")
METHODS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class MixedPrecisionConfig:
    """``budget``: average bits per quantized weight; ``candidates``: allowed bit widths; ``score``: "lim", "zd",
    "random" (ranked per block; "random": a random ranking with ``seed``, the control every score must beat at the
    same budget) or "hessian" (knapsack per linear); ``method``: "rtn" or "gptq"; ``group_size``/``sym``: the
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



# ----------------------------------------------------------------------------------------------- quantize


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
    return grid_record(w, w_hat.T, codes.T, scale, zero, group_size, bits=bits, sym=sym)


@functools.partial(jax.jit, static_argnames=("group_size", "sym"))
def _sensitivity(trace, w, bits, group_size, sym):
    return hawq_sensitivity(trace, w, _rtn(w, bits, group_size, sym)[0])


# --------------------------------------------------------------------------------------------------- the method


def _check_model(params, model, config: MixedPrecisionConfig, calib_batch, have_scores: bool = False):
    if calib_batch is None and config.method == "gptq":
        raise ValueError("method='gptq' needs a calibration batch")
    if calib_batch is None and config.score in ("lim", "hessian") and not have_scores:
        raise ValueError(f"score={config.score!r} needs a calibration batch (or precomputed scores=)")
    kernels = block_kernels(params, model)
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
    if config.score == "random":  # the control: a random ranking of the blocks (seed ``config.seed``)
        u = np.random.default_rng(config.seed).permutation(len(model.block_paths))
        return {"score": "random", "scores": {bp: float(v) for bp, v in zip(model.block_paths, u)}}
    tr, samples = hessian_traces(params, model, calib_batch, n_probes=config.n_probes, seed=config.seed,
                                 tol=config.tol, progress=progress)
    return {"score": "hessian", "scores": tr, "samples": samples}


def mixed_precision(params, model, calib_batch, config: MixedPrecisionConfig = MixedPrecisionConfig(), *,
                    progress: bool | None = None, scores: dict | None = None):
    """Layer-wise mixed-precision PTQ of every linear of ``model``'s blocks under ``config.budget`` average bits.

    LIM / ZD / random: one bit width per block from the ranked allocation (Dumitru et al., 2024); Hessian: one per linear from
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

    if config.score in ("lim", "zd", "random"):
        imp = dict(scores["scores"])
        if set(imp) != set(kernels):
            raise ValueError("scores do not name the model's blocks")
        if config.reverse:
            imp = {k: -v for k, v in imp.items()}
        levels = config.levels or default_levels(config.candidates, config.budget)
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
            per_w = reverse_ranks(per_w)
        sens = {}
        for p in pbar(list(flat_k), progress, desc="HAWQ sensitivity"):
            sens[p] = {}
            for b in config.candidates:
                sens[p][b] = float(_sensitivity(per_w[p] * sizes[p], flat_k[p], jnp.int32(b), gs, sym))
        bits = allocate_knapsack(sens, sizes, config.budget)
        report["sensitivity"] = sens
        report["traces"] = tr

    # quantize, block by block, on the one walk (quant.ptq.engine): the allocation is a per-layer config
    from .engine import quantize_layers

    def layer(w, stats, b):
        if config.method == "rtn":
            r = _rtn_record(w, b, gs, sym)
        else:
            r = gptq_quantize_weight(w, stats.H, GPTQConfig(b, gs, sym, config.act_order, percdamp=config.percdamp))
        r["bits"] = b
        return r

    out, rep = quantize_layers(params, model, calib_batch, layer, None, layer_config=lambda p: bits[p],
                               progress=progress, desc=f"{config.method} mixed {config.budget}b",
                               needs="hessian" if config.method == "gptq" else None)
    layers = rep["layers"]
    n_total = sum(sizes.values())
    report["bits"] = bits
    report["average_bits"] = sum(sizes[p] * bits[p] for p in bits) / n_total
    report["real_bits"] = 8.0 * sum(packed_bytes(tuple(flat_k[p].shape), bits[p], gs, needs_perm(layers[p]), sym)
                                    for p in bits) / n_total
    report["layers"] = layers
    return out, report
