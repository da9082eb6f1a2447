"""PTQ benchmark on all-MiniLM-L6-v2 (real weights) on this machine: wall time per method at 4 bits (ratio to
RTN, the anchor measured in the same run) and model bytes before/after (real packed sizes: integer codes + scales
via ``QuantizedArray``, codebook codes + fp16 codebooks, FP4 codes + fp16 scales, RTN + LoRC's 8-bit factors, all
through ``quant.ptq.export.quantized_tree``).

    python bench/ptq.py [--quick]
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("WEIGHTLAB_NO_PROGRESS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxmodels.io import save_safetensors  # noqa: E402
from jaxmodels.models.bert import load_minilm  # noqa: E402
from jaxmodels.tree import tree_bytes  # noqa: E402
from quant.ptq.evaluate import run_method  # noqa: E402
from quant.ptq.export import QuantizedLinear, quantized_tree, save_quantized  # noqa: E402
from quant.ptq.minilm import bert_block_model, calibration_sentences  # noqa: E402


def packed_bytes(method, params, q, rep, path):
    """Real stored bytes of the quantized linears (packed codes, scales, zero points, permutations, LoRC factors,
    codebooks) and the size of the file written: every method exports through ``quantized_tree``."""
    from quant.ptq.codebook import CodebookWeight

    is_packed = lambda l: isinstance(l, (QuantizedLinear, CodebookWeight))  # noqa: E731
    tree = quantized_tree(q, rep)
    size = save_quantized(path, tree)
    return sum(l.nbytes for l in jax.tree_util.tree_leaves(tree, is_leaf=is_packed) if is_packed(l)), size


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
        lin = sum(np.size(r["weight"]) * 4 for r in rep["layers"].values())
        packed, size = packed_bytes(m, emb.params, q, rep, os.path.join(tmp, f"{m}.safetensors"))
        file = f"file {size / 2**20:6.2f} MiB (x{float_file / size:.2f} smaller); "
        print(f"{m:12s} {times[m]:7.1f} s  x{times[m] / times['rtn']:6.1f} vs RTN   {file}linears {lin / 2**20:.2f} "
              f"MiB float -> {packed / 2**20:.2f} MiB packed (x{lin / packed:.2f}, "
              f"{8 * packed / (lin / 4):.3f} bits per weight)")


if __name__ == "__main__":
    main()
