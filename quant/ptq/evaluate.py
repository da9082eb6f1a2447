"""Evaluation of a quantized sentence encoder against its float model.

* mean cosine similarity of the embeddings, (1/N) Σ_i cos(e_i, ê_i);
* retention of the pairwise-similarity ranking: Spearman ρ between {cos(e_i, e_j)}_{i<j} and {cos(ê_i, ê_j)}_{i<j}
  (``scipy.stats.spearmanr``).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

__all__ = ["embedding_metrics", "embed_batches", "embed_quantized", "run_method", "ptq_table", "format_table",
           "real_bits_per_weight"]


def _forward_impl(fn, params, batch):
    return fn.model.forward(params, batch)


def embed_batches(model, params, batches) -> np.ndarray:
    """``model.forward`` on every batch (jitted once per model; nothing is written into ``model``)."""
    import jax

    from .blocks import ByIdentity

    global _forward
    if _forward is None:
        _forward = jax.jit(_forward_impl, static_argnums=0)
    key = ByIdentity(model)
    return np.concatenate([np.asarray(_forward(key, params, b)) for b in batches])


_forward = None


def embedding_metrics(e_float: np.ndarray, e_quant: np.ndarray) -> dict:
    """``{"cosine", "spearman"}`` of quantized embeddings ``e_quant [N, d]`` against the float ones ``e_float [N, d]``:
    the mean cosine ``(1/N) Σ_i cos(e_i, ê_i)`` and Spearman's ρ between the pairwise similarities
    ``{cos(e_i, e_j)}_{i<j}`` and ``{cos(ê_i, ê_j)}_{i<j}`` (computed in NumPy float64 on the host; ``ValueError`` if
    the shapes differ)."""
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


SETTINGS = {"W4 g128": (4, 128), "W3 g128": (3, 128), "W3 g64": (3, 64), "W2 g64": (2, 64)}


def run_method(method: str, params, model, calib, bits: int, group_size: int, progress=None, *,
               mp_budget: float | None = None, awq_options: dict | None = None):
    """Quantize all linears of ``model`` with ``method``:

    ``"rtn"``, ``"gptq"``, ``"gptq-ao"`` (act-order), ``"awq"``, ``"rsq"``, ``"flexround"``, ``"rtn+lorc"`` (RTN then
    rank-8 LoRC), ``"zeroquant-fp"`` (FP4 E2M1 weights by GPTQ, M2 power-of-two scales, FP8 E4M3 per-token
    activations; ``bits`` must be 4), ``"gptq-fp4"`` (the same weights, activations left in float),
    ``"mp-lim"`` / ``"mp-zd"`` / ``"mp-hessian"`` / ``"mp-random"`` (layer-wise mixed precision, RTN per layer, budget
    ``mp_budget`` average bits per weight, default ``bits + 0.5``; ``"mp-random"`` ranks the blocks at random (seed 0):
    the allocation at the same budget that a score must beat), ``"codebook"`` (GPTVQ/AQLM-style vector quantization
    at about ``bits`` bits per weight). ``awq_options``: further :class:`quant.ptq.awq.AWQConfig` fields for
    ``"awq"`` (e.g. a coarser search, ``{"n_grid": 10, "n_sample_token": 128}``).
    """
    from .awq import AWQConfig, awq
    from .gptq import GPTQConfig, gptq
    from .rsq import RSQConfig, rsq
    from .rtn import RTNConfig, rtn

    if method == "rtn":
        return rtn(params, model, calib, RTNConfig(bits, group_size), progress=progress)
    if method == "gptq":
        return gptq(params, model, calib, GPTQConfig(bits, group_size), progress=progress)
    if method == "gptq-ao":
        return gptq(params, model, calib, GPTQConfig(bits, group_size, act_order=True), progress=progress)
    if method == "awq":
        return awq(params, model, calib, AWQConfig(bits, group_size, **(awq_options or {})), progress=progress)
    if method == "rsq":
        return rsq(params, model, calib, RSQConfig(GPTQConfig(bits, group_size, act_order=True)), progress=progress)
    if method == "flexround":
        from .flexround import FlexRoundConfig, flexround

        return flexround(params, model, calib, FlexRoundConfig(bits, group_size, iters=200, batch_size=4),
                         progress=progress)
    if method == "rtn+lorc":
        from .lorc import lorc

        q, rep = rtn(params, model, calib, RTNConfig(bits, group_size), progress=progress)
        return lorc(params, q, 8, report=rep, progress=progress)  # exportable: RTN codes + INT8 factors
    if method in ("zeroquant-fp", "gptq-fp4"):
        if bits != 4:
            raise ValueError(f"{method} quantizes weights to FP4 (E2M1): bits must be 4, got {bits}")
        from .zeroquant_fp import ZeroQuantFPConfig, zeroquant_fp

        cfg = ZeroQuantFPConfig(group_size=group_size, act_format="e4m3" if method == "zeroquant-fp" else None)
        return zeroquant_fp(params, model, calib, cfg, progress=progress)
    if method.startswith("mp-"):
        from .mixed_precision import MixedPrecisionConfig, mixed_precision

        # candidates: every width 2..8. Not tuned to the table: a contiguous set makes the ranked allocation's
        # bracketing levels b and b + 1 for any budget in (b, b + 1) (the paper's "most important layers one level
        # higher"), and gives the knapsack every width; ``mp_budget`` is the average bits per weight
        cfg = MixedPrecisionConfig(budget=bits + 0.5 if mp_budget is None else mp_budget,
                                   candidates=(2, 3, 4, 5, 6, 7, 8), score=method[3:], group_size=group_size)
        return mixed_precision(params, model, calib, cfg, progress=progress)
    if method == "codebook":  # index bits + fp16 codebooks at 1/8 bit per weight (W3 g128: d=2, 128x128, 3.125 bpw)
        from .codebook import CodebookConfig, codebook_quantize

        cfg = CodebookConfig.at_budget(bits, dim=2 if bits <= 3 else 1, group_cols=group_size)
        return codebook_quantize(params, model, calib, cfg, progress=progress)
    raise ValueError(f"unknown PTQ method {method!r}")


def embed_quantized(model, q, report: dict, batches) -> np.ndarray:
    """Embeddings of the quantized model: activations fake-quantized too when the method quantizes them
    (ZeroQuant-FP's FP8 inputs), weights only otherwise."""
    act = report.get("config", {}).get("act_format") if report.get("method") == "zeroquant_fp" else None
    if act:
        from .zeroquant_fp import embed_a8

        return embed_a8(model, q, batches, act)
    return embed_batches(model, q, batches)


def real_bits_per_weight(q, report: dict) -> float:
    """Bits per quantized weight as stored: 8 · the bytes of the packed layers of
    :func:`quant.ptq.export.quantized_tree` (codes, float16 scales, zero points, act-order permutations, AWQ input
    scales, LoRC factors, codebooks) / the number of their weights."""
    from .export import packed_nbytes, quantized_tree

    tree = quantized_tree(q, report)
    n = sum(int(np.size(r["weight"])) for r in report["layers"].values())
    return 8.0 * packed_nbytes(tree, list(report["layers"])) / max(n, 1)


def ptq_table(params, model, calib, eval_batches, methods=("rtn", "gptq", "gptq-ao", "awq", "rsq"),
              settings=("W4 g128", "W3 g128", "W2 g64"), progress=None, results: dict | None = None, **kw):
    """Rows ``{setting, method, cosine, spearman, bpw, seconds, layer_errors}`` for every (setting, method); ``bpw``:
    :func:`real_bits_per_weight`. ``results``: a dict that receives ``{(setting, method): (params, report)}``;
    ``kw`` go to :func:`run_method`."""
    import time

    e_float = embed_batches(model, params, eval_batches)
    rows = []
    for st in settings:
        bits, gs = SETTINGS[st]
        for m in methods:
            t = time.perf_counter()
            q, rep = run_method(m, params, model, calib, bits, gs, progress, **kw)
            sec = time.perf_counter() - t
            met = embedding_metrics(e_float, embed_quantized(model, q, rep, eval_batches))
            rows.append({"setting": st, "method": m, **met, "bpw": real_bits_per_weight(q, rep), "seconds": sec,
                         "layer_errors": {p: r["error"] for p, r in rep["layers"].items() if "error" in r}})
            if results is not None:
                results[(st, m)] = (q, rep)
    return rows


def format_table(rows) -> str:
    """The PTQ table as fixed-width text, one line per row of :func:`ptq_table` (``setting``, ``method``, ``cosine``,
    ``spearman``, ``bpw`` bits per weight, ``seconds``)."""
    lines = [f"{'setting':8s} {'method':12s} {'cosine':>8s} {'spearman':>9s} {'bpw':>6s} {'time s':>7s}"]
    for r in rows:
        lines.append(f"{r['setting']:8s} {r['method']:12s} {r['cosine']:8.4f} {r['spearman']:9.4f} "
                     f"{r['bpw']:6.3f} {r['seconds']:7.1f}")
    return "\n".join(lines)
