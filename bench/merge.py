"""Merge throughput: linear, task arithmetic, TIES and DARE on 4 checkpoints of ~100M float32 parameters each,
against a NumPy memcpy of the same bytes in the same run (the memory-bandwidth roofline).

    python bench/merge.py [--size 100e6] [--tensor 4096x4096] [--models 4] [--cli] [--mergekit /path/mergekit-yaml]

Effective GB/s = (bytes read + bytes written) / seconds, where a merge reads every input once and writes the
result once. The roofline is a NumPy copy of one buffer as large as all those bytes (it reads and writes, so it
moves 2x its size; we report 2 x size / time). Targets: linear and task arithmetic >= 60% of the roofline,
TIES >= 25% (its exact top-k needs two more passes over every task vector plus histograms).
``--cli`` also times the streaming CLI end to end (safetensors on disk, includes I/O), and ``--mergekit``
mergekit-yaml on the same files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from merging.dare import dare_ties  # noqa: E402
from merging.linear import linear  # noqa: E402
from merging.task_arithmetic import task_arithmetic  # noqa: E402
from merging.ties import ties  # noqa: E402


def best_of(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=float, default=100e6, help="parameters per checkpoint")
    ap.add_argument("--tensor", default="4096x4096", help="shape of each tensor (the last one is cut to size)")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cli", action="store_true", help="also time python -m merging end to end")
    ap.add_argument("--mergekit", default=None, help="path to mergekit-yaml to time on the same files")
    args = ap.parse_args()
    rows, cols = (int(x) for x in args.tensor.split("x"))
    per = rows * cols
    n_params = int(args.size)
    shapes = [(rows, cols)] * (n_params // per) + ([(max(1, (n_params % per) // cols), cols)] if n_params % per else [])
    n_params = sum(r * c for r, c in shapes)
    dev = jax.devices()[0]
    print(f"{args.models} checkpoints x {n_params / 1e6:.1f}M float32 params ({len(shapes)} tensors), "
          f"{jax.device_count()} x {dev.platform} ({dev.device_kind})")

    rng = np.random.default_rng(0)
    base = {f"t{i}": jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for i, s in enumerate(shapes)}
    models = [{k: v + jnp.asarray(0.01 * rng.standard_normal(v.shape, dtype=np.float32)) for k, v in base.items()}
              for _ in range(args.models)]
    nbytes = n_params * 4

    # roofline: copy a buffer of (models + base + output) x model bytes, on the host with NumPy ...
    total = (args.models + 2) * nbytes
    src = np.ones(total // 4, np.float32)
    dst = np.empty_like(src)
    t_copy = best_of(lambda: np.copyto(dst, src), args.reps)
    roof = 2 * total / t_copy / 1e9
    del src, dst
    # ... and on the device with XLA when it is not the CPU (the merges run there)
    if dev.platform != "cpu":
        x = jnp.ones(total // 4, jnp.float32)
        copy = jax.jit(lambda a: a + 0)
        t_dcopy = best_of(lambda: copy(x), args.reps)
        roof = 2 * total / t_dcopy / 1e9
        del x
        print(f"roofline: device copy {roof:.1f} GB/s (NumPy host memcpy {2 * total / t_copy / 1e9:.1f} GB/s)")
    else:
        print(f"roofline: NumPy memcpy {roof:.1f} GB/s")

    key = jax.random.key(0)
    cases = [
        ("linear", lambda: linear(None, models), args.models, 0.60),
        ("task_arithmetic", lambda: task_arithmetic(base, models, lambda_=0.5), args.models + 1, 0.60),
        ("ties (density 0.2)", lambda: ties(base, models, density=0.2), args.models + 1, 0.25),
        ("dare_ties (density 0.2)", lambda: dare_ties(base, models, key=key, density=0.2), args.models + 1, None),
    ]
    print(f"{'method':26s} {'seconds':>8s} {'GB/s':>7s} {'of roofline':>12s}  target")
    for name, fn, n_in, target in cases:
        jax.block_until_ready(fn())  # compile
        t = best_of(fn, args.reps)
        gbs = (n_in + 1) * nbytes / t / 1e9
        frac = gbs / roof
        tgt = "" if target is None else (f">= {target:.0%} " + ("ok" if frac >= target else "MISSED"))
        print(f"{name:26s} {t:8.3f} {gbs:7.1f} {frac:11.0%}   {tgt}")

    if args.cli or args.mergekit:
        import yaml

        from jaxmodels.io import save_safetensors

        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
            d = Path(d)
            for i, tree in enumerate([base] + models):
                save_safetensors(d / f"m{i}.safetensors", tree)
            cfg = {"merge_method": "ties", "base_model": str(d / "m0.safetensors"), "dtype": "float32",
                   "models": [{"model": str(d / f"m{i}.safetensors"), "parameters": {"weight": 1.0, "density": 0.2}}
                              for i in range(1, args.models + 1)]}
            (d / "c.yaml").write_text(yaml.safe_dump(cfg))
            if args.cli:
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "merging", str(d / "c.yaml"), "--out", str(d / "out"),
                                "--no-progress"], check=True, cwd=Path(__file__).resolve().parents[1])
                t = time.perf_counter() - t
                print(f"CLI ties end to end (disk, incl. startup): {t:.2f} s, "
                      f"{(args.models + 2) * nbytes / t / 1e9:.2f} GB/s")
            if args.mergekit:
                t = time.perf_counter()
                subprocess.run([args.mergekit, str(d / "c.yaml"), str(d / "mk"), "--quiet", "--no-copy-tokenizer"],
                               check=True)
                t = time.perf_counter() - t
                print(f"mergekit ties end to end: {t:.2f} s, {(args.models + 2) * nbytes / t / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
