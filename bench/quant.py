"""Fake-quantization throughput and QAT step overhead, against anchors measured in the same run.

(a) Throughput (GB/s of float32 input processed) of jitted ``quant.fake_quant`` for int4 per-group (g=128) and FP8
    E4M3 (per-tensor scale), and of the packing path ``quantize`` (int4 -> packed bytes), relative to a NumPy roofline:
    ``np.copyto`` of the same number of bytes (a memcpy, the floor for any elementwise pass over the tensor) and a
    jitted ``x * 1.0001`` (JAX's own elementwise floor on this backend).
(b) QAT train step (forward + backward + AdamW) of a ViT with 4-bit weights through ``quant.qat`` (FakeQuantW int4
    per-channel, LSQ, StatsQ) vs the same step in float. Target (issue 7): <= 1.3x.

Times are the minimum over round-robin repeats after compilation (contention only ever adds time).

    python bench/quant.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import quant
from bench.timing import time_round_robin
from jaxmodels.models.vit import ViT
from jaxmodels.train import softmax_cross_entropy
from quant import qat


def throughput(n_elems: int, repeats: int) -> None:
    rows = 4096
    x = jax.random.normal(jax.random.key(0), (rows, n_elems // rows), jnp.float32)
    xn = np.asarray(x)
    dst = np.empty_like(xn)
    nbytes = xn.nbytes
    int4 = quant.IntFormat(4, granularity="group", group_size=128, in_axis=-1, out_axis=-2)
    fq_int4 = jax.jit(lambda a: quant.fake_quant(a, int4))
    fq_fp8 = jax.jit(lambda a: quant.fake_quant(a, quant.FP8_E4M3))
    cast_fp8 = jax.jit(lambda a: a.astype(jnp.float8_e4m3fn).astype(jnp.float32))
    pack_int4 = jax.jit(lambda a: quant.quantize(a, int4))
    scale = jax.jit(lambda a: a * 1.0001)
    fns = {
        "numpy memcpy (roofline)": (np.copyto, (dst, xn)),
        "jax x*c (elementwise floor)": (scale, (x,)),
        "fake_quant int4 g128": (fq_int4, (x,)),
        "fake_quant fp8 e4m3": (fq_fp8, (x,)),
        "fp8 cast round trip (XLA)": (cast_fp8, (x,)),
        "quantize int4 g128 -> packed": (pack_int4, (x,)),
    }
    t = time_round_robin(fns, repeats)
    ref = t["numpy memcpy (roofline)"]
    print(f"\n(a) fake-quant throughput on {nbytes / 2**20:.0f} MiB float32 ({jax.devices()[0].platform})")
    print(f"{'op':34s} {'ms':>8s} {'GB/s':>8s} {'vs memcpy':>10s}")
    for k, v in t.items():
        print(f"{k:34s} {v * 1e3:8.2f} {nbytes / v / 1e9:8.2f} {v / ref:9.2f}x")
    qa = pack_int4(x)
    print(f"packed int4 g128 size: {qa.nbytes} bytes = {qa.bits_per_element:.3f} bits/element (float32: 32)")


def qat_overhead(repeats: int, quick: bool) -> None:
    cfg = dict(patch_size=4, width=192, depth=4, num_heads=3, mlp_dim=768, num_classes=100)
    if quick:
        cfg.update(width=128, depth=2, num_heads=4, mlp_dim=512)
    model = ViT(**cfg)
    batch = 64 if quick else 128
    x = jax.random.uniform(jax.random.key(1), (batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 100)
    params = model.init(jax.random.key(0), x[:1])["params"]
    tx = optax.adamw(1e-3)
    keep = (r"patch_embed|head", None)
    configs = {
        "float": None,
        "FakeQuantW int4/channel": qat.QATConfig(weights=(keep, (r"kernel$", qat.FakeQuantW(quant.IntFormat(4))))),
        "LSQ W4": qat.QATConfig(weights=(keep, (r"kernel$", qat.LSQW(4)))),
        "StatsQ W4": qat.QATConfig(weights=(keep, (r"kernel$", qat.StatsQW(4)))),
        "LSQ W4 + dynamic A8": qat.QATConfig(weights=(keep, (r"kernel$", qat.LSQW(4))),
                                             activations=((r"attn|mlp", qat.DynamicActQ(8)),)),
    }
    fns = {}
    for name, c in configs.items():
        if c is None:
            v = {"params": params, "quant": {}}
            apply = lambda v, x: model.apply({"params": v["params"]}, x)
        else:
            v = qat.qat_init(c, model, params, x)
            apply = qat.qat_apply(c, model)

        def make(apply):
            @jax.jit
            def step(v, opt):
                loss, g = jax.value_and_grad(lambda v: softmax_cross_entropy(apply(v, x), y))(v)
                up, opt = tx.update(g, opt, v)
                return optax.apply_updates(v, up), opt
            return step

        step = make(apply)
        fns[name] = (step, (v, tx.init(v)))
    t = time_round_robin(fns, repeats)
    print(f"\n(b) QAT train step vs float step (ViT width {cfg['width']}, depth {cfg['depth']}, batch {batch})")
    for k, v in t.items():
        r = v / t["float"]
        note = "" if k == "float" else ("  (target <= 1.3x: ok)" if r <= 1.3 else "  (target <= 1.3x: MISSED)")
        print(f"{k:26s} {v * 1e3:8.2f} ms  {r:5.2f}x{note}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = (1 << 22) if args.quick else (1 << 25)  # 16 MiB / 128 MiB of float32
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    throughput(n, 5 if args.quick else 20)
    qat_overhead(10 if args.quick else 20, args.quick)


if __name__ == "__main__":
    main()
