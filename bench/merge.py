"""Merge throughput: linear, task arithmetic, TIES and DARE on 4 checkpoints of ~100M float32 parameters each,
against a NumPy memcpy of the same bytes in the same run (the memory-bandwidth roofline).

    python bench/merge.py [--size 100e6] [--tensor 4096x4096] [--models 4] [--rounds 3] [--reps 2] [--no-thp]
                          [--only linear,ties,...] [--primitives] [--cli] [--mergekit /path/mergekit-yaml]

Effective GB/s = (bytes read + bytes written) / seconds, where a merge reads every input once and writes the
result once. The roofline is a NumPy copy of one buffer as large as all those bytes (it reads and writes, so it
moves 2x its size; we report 2 x size / time). Targets: linear and task arithmetic >= 60% of the roofline,
TIES >= 25%. Each round measures the roofline and then every method (best of ``--reps``); the ratio of a round
uses that round's roofline, and the summary gives the median and the range over rounds (the machine may be
shared: absolute times drift, ratios measured minutes apart less so). XLA:CPU runs a large fusion on all cores while
the roofline copy is single-threaded, so a merge can exceed 100% on an idle multi-core machine.

Allocator: XLA:CPU allocates every output with glibc malloc, i.e. a fresh mmap per tensor, so writing the result
first-touches its pages; on 4 KiB pages that costs ~0.5 ms per MB here (a KVM guest), as much as the merge itself.
NumPy madvises its own large buffers to transparent huge pages (2 MiB). By default the script therefore re-runs
itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` so that XLA's buffers get huge pages too (the pages are still
faulted and zeroed, just 512x fewer faults; it needs /sys/kernel/mm/transparent_hugepage/enabled = madvise or
always); ``--no-thp`` measures the default allocator. The same variable speeds up any large CPU merge (e.g.
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python -m merging ...``).

Bound rows: "xla copy" is ``jnp.copy`` of one checkpoint (the least work that writes a fresh XLA output: its ratio
bounds what any XLA merge can reach under the current allocator); "ties trim only" is the exact top-k threshold of
every task vector (the radix select of ``merging.sparsify.kth_largest``, what TIES needs before it can write
anything) and "ties, density 1" the election + disjoint-merge pass alone. ``--primitives`` times, per entry of one
tensor, the XLA:CPU operations an exact selection could be built from (scatter-add histogram, sort, top_k, cumsum,
a counting reduction). ``--cli`` also times the streaming CLI end to end (safetensors on disk,
includes I/O), and ``--mergekit`` mergekit-yaml on the same files.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THP = "glibc.malloc.hugetlb=1"
if __name__ == "__main__" and "--no-thp" not in sys.argv and sys.platform.startswith("linux") \
        and THP not in os.environ.get("GLIBC_TUNABLES", ""):
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), THP) if t))
    os.execve(sys.executable, [sys.executable] + sys.argv, env)  # the tunable is read when the process starts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from merging.dare import dare_ties  # noqa: E402
from merging.linear import linear  # noqa: E402
from merging.sparsify import kth_largest, num_kept  # noqa: E402
from merging.task_arithmetic import task_arithmetic  # noqa: E402
from merging.ties import ties  # noqa: E402


def best_of(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return min(ts)


@functools.partial(jax.jit, static_argnames="k")
def _thresholds(b, *xs, k):
    return [kth_largest(jnp.abs(x - b).reshape(-1), k) for x in xs]


def trim_thresholds(base, models, density):
    """The exact per-tensor top-k magnitude of every task vector (TIES' trim step without the merge)."""
    return [_thresholds(b, *(m[p] for m in models), k=num_kept(density, b.size)) for p, b in base.items()]


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def primitives(shape, reps):
    """Per-entry cost of the XLA:CPU building blocks of an exact selection, on |x - b| of one tensor."""
    rng = np.random.default_rng(1)
    a = jnp.asarray(np.abs(0.01 * rng.standard_normal(shape, dtype=np.float32)).reshape(-1))
    n = a.size
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)
    k = num_kept(0.2, n)
    ops = {
        "radix select (kth_largest)": (jax.jit(lambda a: kth_largest(a, k)), a),
        "scatter-add 2^16-bin histogram": (jax.jit(lambda b: jnp.zeros(65536, jnp.int32).at[b >> 16].add(1)), bits),
        "counting reduction sum(a >= t)": (jax.jit(lambda a: (a >= 0.0126).sum()), a),
        "lax.top_k (k = n/100)": (jax.jit(lambda a: jax.lax.top_k(a, n // 100)[0]), a),
        "cumsum": (jax.jit(jnp.cumsum), bits),
        "sort": (jax.jit(jnp.sort), a),
        "sum (read once)": (jax.jit(jnp.sum), a),
    }
    print(f"XLA:CPU primitives on {n / 1e6:.1f}M entries (ns per entry, best of {reps}):")
    for name, (f, x) in ops.items():
        jax.block_until_ready(f(x))
        print(f"  {name:34s} {best_of(lambda: f(x), reps) / n * 1e9:8.2f}")


def roofline(total, reps):
    src = np.ones(total // 4, np.float32)
    dst = np.empty_like(src)
    t = best_of(lambda: np.copyto(dst, src), reps + 1)  # the first copy also faults dst in
    return 2 * total / t / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=float, default=100e6, help="parameters per checkpoint")
    ap.add_argument("--tensor", default="4096x4096", help="shape of each tensor (the last one is cut to size)")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="roofline + every method, this many times")
    ap.add_argument("--reps", type=int, default=2, help="best of this many runs per method and round")
    ap.add_argument("--no-thp", action="store_true", help="keep glibc's default 4 KiB pages for XLA's buffers")
    ap.add_argument("--only", default=None, help="comma-separated method names to run")
    ap.add_argument("--primitives", action="store_true", help="time XLA:CPU selection building blocks per entry")
    ap.add_argument("--cli", action="store_true", help="also time python -m merging end to end")
    ap.add_argument("--mergekit", default=None, help="path to mergekit-yaml to time on the same files")
    args = ap.parse_args()
    rows, cols = (int(x) for x in args.tensor.split("x"))
    per = rows * cols
    n_params = int(args.size)
    shapes = [(rows, cols)] * (n_params // per) + ([(max(1, (n_params % per) // cols), cols)] if n_params % per else [])
    n_params = sum(r * c for r, c in shapes)
    dev = jax.devices()[0]
    thp = THP in os.environ.get("GLIBC_TUNABLES", "")
    print(f"{args.models} checkpoints x {n_params / 1e6:.1f}M float32 params ({len(shapes)} tensors), "
          f"{jax.device_count()} x {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("allocator: " + ("glibc malloc on transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)" if thp
                           else "glibc malloc, default 4 KiB pages (--no-thp)"))

    rng = np.random.default_rng(0)
    base = {f"t{i}": jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for i, s in enumerate(shapes)}
    models = [{k: v + jnp.asarray(0.01 * rng.standard_normal(v.shape, dtype=np.float32)) for k, v in base.items()}
              for _ in range(args.models)]
    nbytes = n_params * 4
    # roofline: copy a buffer of (models + base + output) x model bytes, on the host with NumPy (on an accelerator,
    # the same copy with XLA on the device, where the merges run)
    total = (args.models + 2) * nbytes
    if dev.platform != "cpu":
        x = jnp.ones(total // 4, jnp.float32)
        copy = jax.jit(lambda a: a + 0)

        def measure_roof():
            return 2 * total / best_of(lambda: copy(x), args.reps + 1) / 1e9
    else:
        def measure_roof():
            return roofline(total, args.reps)

    key = jax.random.key(0)
    n = args.models
    cases = [  # name, fn, arrays read + written, target
        ("  xla copy (bound)", lambda: _copy(models[0]), 2, None),
        ("linear", lambda: linear(None, models), n + 1, 0.60),
        ("task_arithmetic", lambda: task_arithmetic(base, models, lambda_=0.5), n + 2, 0.60),
        ("ties (density 0.2)", lambda: ties(base, models, density=0.2), n + 2, 0.25),
        ("  ties trim only", lambda: trim_thresholds(base, models, 0.2), n + 1, None),
        ("  ties, density 1", lambda: ties(base, models, density=1.0), n + 2, None),
        ("dare_ties (density 0.2)", lambda: dare_ties(base, models, key=key, density=0.2), n + 2, None),
    ]
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        cases = [c for c in cases if c[0].strip().split(" ")[0] in keep or c[0].strip() in keep]
    for _, fn, _, _ in cases:
        jax.block_until_ready(fn())  # compile
    ratios = {name: [] for name, *_ in cases}
    secs = {name: [] for name, *_ in cases}
    roofs = []
    for r in range(args.rounds):
        roof = measure_roof()
        roofs.append(roof)
        print(f"round {r + 1}: roofline {roof:.1f} GB/s (load {os.getloadavg()[0]:.1f})")
        for name, fn, n_io, _ in cases:
            t = best_of(fn, args.reps)
            secs[name].append(t)
            ratios[name].append(n_io * nbytes / t / 1e9 / roof)
    print(f"\nroofline ({'NumPy memcpy' if dev.platform == 'cpu' else 'device copy'}): median "
          f"{statistics.median(roofs):.1f} GB/s, range {min(roofs):.1f}-{max(roofs):.1f} over {args.rounds} rounds")
    print(f"{'method':26s} {'seconds':>8s} {'GB/s':>7s} {'of roofline':>12s} {'(range)':>12s}  target")
    for name, fn, n_io, target in cases:
        t, fr = statistics.median(secs[name]), statistics.median(ratios[name])
        rng_s = f"{min(ratios[name]):.0%}-{max(ratios[name]):.0%}"
        tgt = "" if target is None else (f">= {target:.0%} " + ("ok" if fr >= target else "MISSED"))
        print(f"{name:26s} {t:8.3f} {n_io * nbytes / t / 1e9:7.1f} {fr:11.0%}  {rng_s:>12s}  {tgt}")
    roof = statistics.median(roofs)
    if "  xla copy (bound)" in secs and "linear" in secs:
        extra = statistics.median(secs["  xla copy (bound)"]) - 2 * nbytes / (roof * 1e9)
        print(f"a fresh {nbytes / 1e9:.1f} GB XLA output costs {extra:.3f} s beyond the bandwidth (allocation + page "
              f"faults); linear at 60% of the roofline has {(n + 1) * nbytes / (0.6 * roof * 1e9):.3f} s in all")
    if args.primitives:
        primitives((rows, cols), args.reps)
    if "ties (density 0.2)" in secs and "  ties trim only" in secs:
        budget = (n + 2) * nbytes / (0.25 * roof * 1e9)
        trim = statistics.median(secs["  ties trim only"])
        print(f"TIES at 25% of the roofline has {budget:.3f} s; its exact trim alone takes {trim:.3f} s "
              f"({trim / (n * n_params) * 1e9:.1f} ns per task-vector entry)")

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
