"""Pruning benchmarks on this machine, each against an anchor measured in the same run.

1. ``layer``: per-layer time of Wanda and SparseGPT (50% unstructured and 2:4) on every linear of the first block of
   the trained tiny decoder (``tests/data/tiny_decoder``: Llama family, hidden 128, GQA), given the layer's
   calibration statistics (squared input norms / Hessian, from the engine's walk), against GPTQ W4 g128 on the same
   layer and Hessian (the SparseGPT paper: pruning costs about one GPTQ pass) and magnitude pruning (no data).
2. ``model``: the whole decoder (every linear of its 3 blocks, the walk of ``quant.ptq.engine`` included) with
   Wanda and SparseGPT against GPTQ W4 g128 on the same calibration windows, and the perplexity of each result.
3. ``big``: one ``d x d`` layer (4096 on a GPU/TPU, 1024 on a CPU, 512 with ``--quick``): SparseGPT against GPTQ
   W4 g128 and Wanda against magnitude, on one random correlated Hessian.

Times are the minimum over round-robin repeats after a compiling call (``bench/timing.py``: contention only ever
adds time).

    python bench/pruning.py [--quick] [--only layer,model,big]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("WEIGHTLAB_NO_PROGRESS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import time_round_robin  # noqa: E402
from quant.ptq.gptq import GPTQConfig, gptq, gptq_quantize_weight, hessian_from_inputs  # noqa: E402
from quant.pruning import (  # noqa: E402
    MagnitudeConfig, SparseGPTConfig, WandaConfig, magnitude_prune_weight, sparsegpt, sparsegpt_prune_weight, wanda,
    wanda_prune_weight,
)

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "tiny_decoder")


def _decoder(n_cal: int, seq: int = 128):
    from jaxmodels import text
    from jaxmodels.models import load_pretrained
    from quant.ptq.block_models import block_model

    model, params = load_pretrained(FOLDER, dtype=jnp.float32, progress=False)
    tok = text.load_tokenizer(FOLDER)
    ids = text.corpus_tokens(tok, "train")
    off = np.random.default_rng(0).integers(0, len(ids) - seq, size=n_cal)
    return model, params, block_model(model), {"input_ids": ids[off[:, None] + np.arange(seq)]}, tok


def _first_block_stats(params, bm, calib):
    """``{linear: (kernel, E[x²], H)}`` of the first block, from the engine's walk (its float inputs)."""
    from quant.ptq.blocks import get_sub
    from quant.ptq.engine import walk_blocks

    out = {}

    def step(view):
        if view.index == 0:
            H = view.hessians()
            for nm in view.names:
                x = view.records(0)[nm][0]
                out[nm] = (get_sub(view.params, nm)["kernel"], jnp.mean(jnp.asarray(x, jnp.float32) ** 2, (0, 1)),
                           H[nm].H)
        return view.params, {}, None

    walk_blocks(params, bm, calib, step, feed="float", progress=False)
    return out


def _weight(fn, *args):
    return lambda: fn(*args)["weight"]


def bench_layer(quick: bool):
    model, params, bm, calib, _ = _decoder(16 if quick else 64)
    stats = _first_block_stats(params, bm, calib)
    repeats = 3 if quick else 10
    print(f"per-layer time, block 0 of tiny_decoder on {jax.devices()[0].platform} (calibration "
          f"{calib['input_ids'].shape}; min of {repeats} round-robin repeats after compile; ratios vs GPTQ W4 g128 on "
          "the same layer)")
    print(f"{'linear':18s} {'shape':>10s} {'GPTQ ms':>8s} {'magn.':>8s} {'Wanda':>8s} {'SparseGPT':>10s} "
          f"{'SGPT 2:4':>9s}   Wanda/magn  SGPT/GPTQ  SGPT2:4/GPTQ")
    tot = {}
    for nm, (w, sq, H) in stats.items():
        fns = {
            "gptq": (_weight(gptq_quantize_weight, w, H, GPTQConfig(4, 128)), ()),
            "magnitude": (_weight(magnitude_prune_weight, w, None, MagnitudeConfig(0.5)), ()),
            "wanda": (_weight(wanda_prune_weight, w, sq, WandaConfig(0.5)), ()),
            "sparsegpt": (_weight(sparsegpt_prune_weight, w, H, SparseGPTConfig(0.5)), ()),
            "sparsegpt 2:4": (_weight(sparsegpt_prune_weight, w, H, SparseGPTConfig(nm="2:4")), ()),
        }
        t = time_round_robin(fns, repeats)
        for k, v in t.items():
            tot[k] = tot.get(k, 0.0) + v
        print(f"{nm:18s} {str(tuple(w.shape)):>10s} {1e3 * t['gptq']:8.2f} {1e3 * t['magnitude']:8.2f} "
              f"{1e3 * t['wanda']:8.2f} {1e3 * t['sparsegpt']:10.2f} {1e3 * t['sparsegpt 2:4']:9.2f}   "
              f"x{t['wanda'] / t['magnitude']:9.2f}  x{t['sparsegpt'] / t['gptq']:8.2f}  "
              f"x{t['sparsegpt 2:4'] / t['gptq']:8.2f}")
    print(f"{'block total':18s} {'':>10s} {1e3 * tot['gptq']:8.2f} {1e3 * tot['magnitude']:8.2f} "
          f"{1e3 * tot['wanda']:8.2f} {1e3 * tot['sparsegpt']:10.2f} {1e3 * tot['sparsegpt 2:4']:9.2f}   "
          f"x{tot['wanda'] / tot['magnitude']:9.2f}  x{tot['sparsegpt'] / tot['gptq']:8.2f}  "
          f"x{tot['sparsegpt 2:4'] / tot['gptq']:8.2f}")


def bench_model(quick: bool):
    from jaxmodels import text
    from jaxmodels.perplexity import evaluate_perplexity

    model, params, bm, calib, tok = _decoder(16 if quick else 128)
    test = text.corpus_tokens(tok, "test")
    runs = {"gptq W4 g128": lambda: gptq(params, bm, calib, GPTQConfig(4, 128), progress=False),
            "wanda 50%": lambda: wanda(params, bm, calib, WandaConfig(0.5)),
            "sparsegpt 50%": lambda: sparsegpt(params, bm, calib, SparseGPTConfig(0.5)),
            "sparsegpt 2:4": lambda: sparsegpt(params, bm, calib, SparseGPTConfig(nm="2:4"))}
    best, out = {}, {}
    for k, fn in runs.items():
        jax.block_until_ready(fn()[0])  # compile
    for _ in range(1 if quick else 2):
        for k, fn in runs.items():
            t = time.perf_counter()
            out[k] = jax.block_until_ready(fn()[0])
            best[k] = min(best.get(k, float("inf")), time.perf_counter() - t)
    dense = evaluate_perplexity(model, params, test, 128, batch_size=16, progress=False)
    print(f"whole tiny_decoder ({len(bm.block_paths)} blocks, 21 linears), calibration {calib['input_ids'].shape}, "
          f"after compile; test perplexity (dense {dense:.3f}):")
    for k in runs:
        ppl = evaluate_perplexity(model, out[k], test, 128, batch_size=16, progress=False)
        print(f"  {k:14s} {best[k]:7.2f} s  x{best[k] / best['gptq W4 g128']:5.2f} vs GPTQ   ppl {ppl:.3f}")


def bench_big(d: int, repeats: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * d, d)).astype(np.float32)
    x = x @ (np.eye(d, dtype=np.float32) + 0.1 * rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d))
    w = jnp.asarray((rng.standard_normal((d, d)) * 0.02).astype(np.float32))  # Flax kernel [in, out]
    H = hessian_from_inputs(jnp.asarray(x))
    sq = jnp.asarray((x**2).mean(0))
    fns = {"gptq W4 g128": (_weight(gptq_quantize_weight, w, H, GPTQConfig(4, 128)), ()),
           "sparsegpt 50%": (_weight(sparsegpt_prune_weight, w, H, SparseGPTConfig(0.5)), ()),
           "sparsegpt 2:4": (_weight(sparsegpt_prune_weight, w, H, SparseGPTConfig(nm="2:4")), ()),
           "magnitude 50%": (_weight(magnitude_prune_weight, w, None, MagnitudeConfig(0.5)), ()),
           "wanda 50%": (_weight(wanda_prune_weight, w, sq, WandaConfig(0.5)), ())}
    t = time_round_robin(fns, repeats)
    print(f"one {d}x{d} layer on {jax.devices()[0].platform} (min of {repeats} repeats after compile):")
    for k, v in t.items():
        ref = "gptq W4 g128" if k.startswith(("sparsegpt", "gptq")) else "magnitude 50%"
        print(f"  {k:14s} {1e3 * v:9.2f} ms  " + ("(anchor)" if k == ref else f"x{v / t[ref]:6.2f} vs {ref}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="layer,model,big", help="comma-separated sections")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - {"layer", "model", "big"}:
        ap.error(f"unknown sections {sorted(only - {'layer', 'model', 'big'})}")
    if "layer" in only:
        bench_layer(args.quick)
    if "model" in only:
        bench_model(args.quick)
    if "big" in only:
        gpu = jax.devices()[0].platform != "cpu"
        bench_big(4096 if gpu else (512 if args.quick else 1024), repeats=2 if args.quick else 3)


if __name__ == "__main__":
    main()
