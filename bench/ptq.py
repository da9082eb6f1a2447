"""PTQ benchmark on all-MiniLM-L6-v2 (real weights) on this machine: wall time per method at 4 bits (ratio to
RTN, the anchor measured in the same run) and model bytes before/after (real packed sizes: integer codes + scales
via ``QuantizedArray``, codebook codes + fp16 codebooks, FP4 codes + fp16 scales, RTN + LoRC's 8-bit factors).

    python bench/ptq.py [--quick]
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("WEIGHTLAB_NO_PROGRESS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmodels.io import save_safetensors  # noqa: E402
from jaxmodels.models.bert import load_minilm  # noqa: E402
from jaxmodels.tree import tree_bytes  # noqa: E402
from quant.ptq.evaluate import run_method  # noqa: E402
from quant.ptq.export import QuantizedLinear, quantized_tree, save_quantized  # noqa: E402
from quant.ptq.minilm import bert_block_model, calibration_sentences  # noqa: E402


def packed_bytes(method, params, q, rep, path):
    """Real stored bytes of the quantized linears (and the file written, where the export format has them)."""
    from quant.formats import FloatFormat, QParams
    from quant.qarray import dequantize, quantize

    is_ql = lambda l: isinstance(l, QuantizedLinear)  # noqa: E731
    if method == "codebook":
        return sum(r["packed"].nbytes for r in rep["layers"].values()), None
    if method in ("zeroquant-fp", "gptq-fp4"):  # FP4 E2M1 codes, 4 bits packed, float32 group scales (exact)
        total = 0
        for r in rep["layers"].values():
            w = jnp.asarray(r["weight"], jnp.float32)
            gs = rep["config"]["group_size"]
            fmt = FloatFormat(rep["config"]["weight_format"], granularity="group", group_size=gs)
            qa = quantize(w, fmt, QParams(jnp.asarray(r["scale"], jnp.float32).T, None))
            assert float(jnp.max(jnp.abs(dequantize(qa, jnp.float32) - w))) <= 1e-6 * float(jnp.max(jnp.abs(w)))
            total += qa.nbytes
        return total, None
    extra = 0
    if method == "rtn+lorc":  # packed RTN codes + the 8-bit rank-8 factors
        extra = sum(int(r["bits_per_weight"] * r["U"].shape[0] * r["V"].shape[0]) // 8 for r in rep["layers"].values())
        rep = rep["rtn"]
    tree = quantized_tree(q, rep)
    size = save_quantized(path, tree)
    packed = sum(l.nbytes for l in jax.tree_util.tree_leaves(tree, is_leaf=is_ql) if is_ql(l))
    return packed + extra, None if extra else size  # (the file holds no LoRC factors)


METHODS = ("rtn", "gptq", "gptq-ao", "awq", "rsq", "flexround", "codebook", "rtn+lorc", "zeroquant-fp")


def main():
    quick = "--quick" in sys.argv
    n_cal = 32 if quick else 128
    emb = load_minilm(max_length=64 if quick else 128)
    model = bert_block_model(emb)
    calib = emb.tokenizer(calibration_sentences(n_cal))
    tmp = tempfile.mkdtemp()
    float_file = save_safetensors(os.path.join(tmp, "float.safetensors"), emb.params).stat().st_size
    print(f"all-MiniLM-L6-v2 on {jax.devices()[0].platform}, {n_cal} calibration sentences {calib['input_ids'].shape}")
    print(f"float params {tree_bytes(emb.params) / 2**20:.2f} MiB in memory, {float_file / 2**20:.2f} MiB on disk; "
          "4-bit settings (W4 g128; codebook: 1-D codes, 4.125 bits)")
    times = {}
    for m in METHODS:
        run_method(m, emb.params, model, calib, 4, 128, progress=False) if m == "rtn" else None  # warm jit (RTN)
        t = time.perf_counter()
        q, rep = run_method(m, emb.params, model, calib, 4, 128, progress=False)
        times[m] = time.perf_counter() - t
        layers = rep["rtn"]["layers"] if m == "rtn+lorc" else rep["layers"]
        lin = sum(np.size(r["weight"]) * 4 for r in layers.values())
        packed, size = packed_bytes(m, emb.params, q, rep, os.path.join(tmp, f"{m}.safetensors"))
        file = "" if size is None else f"file {size / 2**20:6.2f} MiB (x{float_file / size:.2f} smaller); "
        print(f"{m:12s} {times[m]:7.1f} s  x{times[m] / times['rtn']:6.1f} vs RTN   {file}linears {lin / 2**20:.2f} "
              f"MiB float -> {packed / 2**20:.2f} MiB packed (x{lin / packed:.2f}, "
              f"{8 * packed / (lin / 4):.3f} bits per weight)")


if __name__ == "__main__":
    main()
