"""PTQ benchmarks on this machine, each against an anchor measured in the same run.

1. ``layer``: GPTQ (W4 g128) on one layer, weightlab's jitted ``gptq_quantize_weight`` against a float32
   NumPy/SciPy transcription of the reference algorithm (IST-DASLab/gptq ``fasterquant``) on the same weights and
   Hessian: the ratio (target: faster on a CPU), and the share of identical weights (same algorithm). The layer is
   4096x4096 on a GPU/TPU (seconds per layer), 1024x1024 on a CPU (512 with ``--quick``).
2. ``decoder``: whole-model quantization (GPTQ W4 g128) of the largest decoder the tests use
   (``tests/data/tiny_decoder``, a Llama-family model): seconds, and peak memory (process max RSS on a CPU, the
   device's peak bytes in use where the backend reports it), against RTN in the same run.
3. ``minilm``: all-MiniLM-L6-v2 (real weights): wall time per method at 4 bits (ratio to RTN) and model bytes
   before/after (real packed sizes: integer codes + scales via ``QuantizedArray``, codebook codes + fp16
   codebooks, FP4 codes + fp16 scales, RTN + LoRC's 8-bit factors, all through
   ``quant.ptq.export.quantized_tree``).

    python bench/ptq.py [--quick] [--only layer,decoder,minilm]
"""

import argparse
import os
import resource
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


def bench_minilm(quick: bool):
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


# ---------------------------------------------------------------------------------------------- GPTQ one layer

def _np_minmax(w, bits):
    """IST-DASLab/gptq ``Quantizer.find_params`` (asymmetric, per row of ``w``), float32."""
    xmin = np.minimum(w.min(1), 0)
    xmax = np.maximum(w.max(1), 0)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, 1
    maxq = np.float32(2**bits - 1)
    scale = (xmax - xmin) / maxq
    return scale, np.round(-xmin / scale)


def numpy_fasterquant(W, H, bits=4, groupsize=128, blocksize=128, percdamp=0.01):
    """float32 NumPy/SciPy transcription of IST-DASLab/gptq ``GPTQ.fasterquant`` (``W[out, in]``; lazy batch
    updates of ``blocksize`` columns, dynamic groups): the reference algorithm, line by line, on the CPU."""
    import scipy.linalg

    W = np.array(W, np.float32)
    H = np.array(H, np.float32)
    cols = W.shape[1]
    maxq = np.float32(2**bits - 1)
    scale, zero = _np_minmax(W, bits)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Q = np.zeros_like(W)
    H[np.diag_indices(cols)] += np.float32(percdamp) * np.mean(np.diag(H))
    L = scipy.linalg.cholesky(H, lower=True)                       # torch.linalg.cholesky
    Hinv = scipy.linalg.cho_solve((L, True), np.eye(cols, dtype=np.float32))  # torch.cholesky_inverse
    Hinv = scipy.linalg.cholesky(Hinv, lower=False)                # torch.linalg.cholesky(upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        Q1, Err1 = np.zeros_like(W1), np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                scale, zero = _np_minmax(W[:, i1 + i:i1 + i + groupsize], bits)
            q = scale * (np.clip(np.round(w / scale) + zero, 0, maxq) - zero)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def bench_gptq_layer(d: int, repeats: int):
    """GPTQ W4 g128 on one ``d x d`` layer (Hessian of ``2d`` correlated tokens): weightlab's jitted
    ``gptq_quantize_weight`` (after its compile) against the NumPy/SciPy transcription of ``fasterquant``."""
    from quant.ptq.gptq import GPTQConfig, gptq_quantize_weight, hessian_from_inputs

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * d, d)).astype(np.float32)
    x = x @ (np.eye(d, dtype=np.float32) + 0.1 * rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d))
    w = (rng.standard_normal((d, d)) * 0.02).astype(np.float32)  # Flax kernel [in, out]
    H = np.asarray(hessian_from_inputs(jax.numpy.asarray(x)))
    cfg = GPTQConfig(4, 128)
    t = time.perf_counter()
    jax.block_until_ready(gptq_quantize_weight(w, H, cfg)["weight"])
    compile_s = time.perf_counter() - t
    ours = ref = ours_cpu = ref_cpu = float("inf")
    for _ in range(repeats):  # round robin, minimum: contention only ever adds time
        t, c = time.perf_counter(), time.process_time()
        q = jax.block_until_ready(gptq_quantize_weight(w, H, cfg)["weight"])
        ours, ours_cpu = min(ours, time.perf_counter() - t), min(ours_cpu, time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        q_ref = numpy_fasterquant(w.T, H, 4, 128).T
        ref, ref_cpu = min(ref, time.perf_counter() - t), min(ref_cpu, time.process_time() - c)
    same = float(np.mean(np.isclose(np.asarray(q), q_ref, atol=1e-5)))
    print(f"GPTQ W4 g128, one {d}x{d} layer on {jax.devices()[0].platform}: weightlab {ours:.3f} s "
          f"(first call incl. compile {compile_s:.1f} s), NumPy/SciPy fasterquant float32 {ref:.3f} s -> "
          f"x{ref / ours:.2f} {'faster' if ref > ours else 'SLOWER'} (CPU seconds of this process: {ours_cpu:.2f} "
          f"vs {ref_cpu:.2f}, x{ref_cpu / max(ours_cpu, 1e-9):.2f}); {100 * same:.2f} % of weights identical")
    return ours, ref


def _peak_device_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class RSSPeak:
    """The peak resident set size (``/proc/self/statm``, sampled every 5 ms by a thread) above the RSS at entry:
    the host memory a run adds (Linux; ``peak`` is None elsewhere)."""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak or 0, self._rss() or 0) if self.start is not None else None

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self):
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return None

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = None if self.start is None else max(self.peak, self._rss() or 0)

    @property
    def added_mib(self):
        return None if self.start is None else (self.peak - self.start) / 2**20


def bench_decoder(quick: bool):
    """Whole-model GPTQ W4 g128 of ``tests/data/tiny_decoder`` (every linear of its 3 blocks) on random
    train-split windows, RTN W4 g128 (its calibration pass included: the per-layer error report) as the anchor,
    both timed after a first compiling call; peak memory: the host RSS the timed run adds above its start
    (:class:`RSSPeak`), the process' max RSS, and the device's peak bytes in use where the backend reports it."""
    from jaxmodels import text
    from jaxmodels.models import load_pretrained
    from quant.ptq.block_models import block_model

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "tiny_decoder")
    model, params = load_pretrained(folder, dtype=jax.numpy.float32, progress=False)
    ids = text.corpus_tokens(text.load_tokenizer(folder), "train")
    n_cal, seq = (32, 128) if quick else (128, 256)  # the model's max_position_embeddings is 256
    off = np.random.default_rng(0).integers(0, len(ids) - seq, size=n_cal)
    calib = {"input_ids": ids[off[:, None] + np.arange(seq)]}
    bm = block_model(model)
    n = sum(np.size(v) for v in jax.tree_util.tree_leaves(params))
    times, cpu, mem = {}, {}, {}
    for m in ("rtn", "gptq"):
        run_method(m, params, bm, calib, 4, 128, progress=False)  # compile
        t, c = time.perf_counter(), time.process_time()
        with RSSPeak() as peak:
            q, _ = run_method(m, params, bm, calib, 4, 128, progress=False)
            jax.block_until_ready(q)
        times[m], cpu[m], mem[m] = time.perf_counter() - t, time.process_time() - c, peak.added_mib
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB (Linux)
    dev = _peak_device_bytes()
    added = ("" if mem["gptq"] is None else
             f"; RSS added during the run: GPTQ {mem['gptq']:.0f} MiB, RTN {mem['rtn']:.0f} MiB")
    print(f"decoder tiny_decoder ({n / 1e6:.2f} M params, {len(bm.block_paths)} blocks), calibration "
          f"{n_cal} x {seq} tokens: GPTQ W4 g128 {times['gptq']:.2f} s ({cpu['gptq']:.1f} CPU s; x"
          f"{times['gptq'] / times['rtn']:.1f} vs RTN {times['rtn']:.2f} s / {cpu['rtn']:.1f} CPU s, both after "
          f"compile){added}; process max RSS {maxrss:.0f} MiB"
          + (f", device peak {dev / 2**20:.0f} MiB" if dev else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="layer,decoder,minilm", help="comma-separated sections")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - {"layer", "decoder", "minilm"}:
        ap.error(f"unknown sections {sorted(only - {'layer', 'decoder', 'minilm'})}")
    if "layer" in only:
        gpu = jax.devices()[0].platform != "cpu"
        bench_gptq_layer(4096 if gpu else (512 if args.quick else 1024), repeats=1 if args.quick else 2)
    if "decoder" in only:
        bench_decoder(args.quick)
    if "minilm" in only:
        bench_minilm(args.quick)


if __name__ == "__main__":
    main()
