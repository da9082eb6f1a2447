"""Regenerate ``tests/data/quant_reference.npz``: OCP MX blocks from torchao and NF4 from bitsandbytes.

Run in a throwaway venv, never the project's (these are references, not dependencies)::

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 torchao==0.18.0 bitsandbytes==0.50.2 scipy numpy
    /tmp/ref/bin/python scripts/make_quant_reference.py tests/data/quant_reference.npz

Contents (``mx_<elem>_*`` for elem in e4m3, e5m2, e3m2, e2m3, e2m1; ``[24, 64]`` inputs, blocks of 32 along the
last axis):

* ``mx_x``: the float32 inputs (shared by all element types): random normal blocks at random binades, blocks whose
  amax sits on the edges of a binade (``2^k``, ``1.5 * 2^k``, ``(fmax / 2^emax) * 2^k`` and one ulp either side,
  ``nextafter(2^(k+1), 0)``), an all-zero block, tiny (``1e-30``) and huge (``1e30``) blocks, and one block with a
  NaN.
* ``mx_<elem>_scale``: torchao ``to_mx(..., scaling_mode=FLOOR)`` E8M0 bytes ``[24, 2]`` (the OCP MX v1.0 rule
  ``2^(floor(log2 amax) - emax_elem)``; 0xFF = NaN).
* ``mx_<elem>_codes``: element bit patterns ``[24, 64]`` (fp4 unpacked from torchao's two-per-byte layout).
* ``mx_<elem>_deq``: torchao ``to_dtype(..., torch.float32)``.

* ``nf4_table``: bitsandbytes ``get_4bit_type("nf4")`` (the 16 values ``quantize_4bit`` uses).
* ``nf4_normal_map``: the 15 distinct nonzero values of bitsandbytes ``create_normal_map(0.9677083)`` plus 0.
* ``nf4_x`` ``[8, 64]`` float32, ``nf4_codes`` ``[8, 64]`` (unpacked nibbles), ``nf4_absmax`` ``[8]``,
  ``nf4_deq`` ``[8, 64]``: ``quantize_4bit(x, blocksize=64, quant_type="nf4")`` / ``dequantize_4bit`` on CPU.

The package versions are stored in the file (``versions``).
"""

import json
import sys

import numpy as np


def mx_inputs(rng):
    x = (rng.standard_normal((24, 64)) * np.exp2(rng.integers(-20, 20, (24, 1)))).astype(np.float32)
    blocks = x.reshape(48, 32)
    edge = []
    for k in (-3, 0, 5):
        for m in (1.0, 1.5, 1.75, 1.875, 0.875 * 2):  # 1.5 = fp4/e2m3 edge, 1.75 = e4m3/e5m2/e3m2 edge
            a = np.float32(m * 2.0 ** k)
            edge += [a, np.nextafter(a, np.float32(0)), np.nextafter(a, np.float32(np.inf))]
        edge.append(np.nextafter(np.float32(2.0 ** (k + 1)), np.float32(0)))
    for i, a in enumerate(edge[:40]):  # blocks 0..39: random block with amax forced to an edge value
        b = blocks[i] / np.max(np.abs(blocks[i])) * np.float32(0.9) * a
        b[i % 32] = a if i % 2 else -a
        blocks[i] = b
    blocks[40] = 0.0
    blocks[41] = rng.standard_normal(32).astype(np.float32) * np.float32(1e-30)
    blocks[42] = rng.standard_normal(32).astype(np.float32) * np.float32(1e30)
    blocks[43, :] = np.float32(3.0)  # constant block
    blocks[44, 7] = np.nan
    return blocks.reshape(24, 64)


def main(out):
    import bitsandbytes
    import bitsandbytes.functional as BF
    import torch
    import torchao
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.kernels import unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx

    rng = np.random.default_rng(20261203)
    data = {}
    x = mx_inputs(rng)
    data["mx_x"] = x
    elems = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e3m2": DTYPE_FP6_E3M2,
             "e2m3": DTYPE_FP6_E2M3, "e2m1": torch.float4_e2m1fn_x2}
    for name, dt in elems.items():
        scale, lp = to_mx(torch.from_numpy(x), dt, 32, scaling_mode=ScaleCalculationMode.FLOOR)
        deq = to_dtype(lp, scale, dt, 32, torch.float32)
        if name == "e2m1":
            codes = unpack_uint4(lp.view(torch.uint8)).reshape(x.shape)
        elif name in ("e4m3", "e5m2"):
            codes = lp.view(torch.uint8)
        else:
            codes = lp
        data[f"mx_{name}_scale"] = scale.view(torch.uint8).numpy().reshape(24, 2)
        data[f"mx_{name}_codes"] = codes.numpy().astype(np.uint8).reshape(x.shape)
        data[f"mx_{name}_deq"] = deq.numpy().astype(np.float32)

    data["nf4_table"] = BF.get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)
    nm = BF.create_normal_map(0.9677083).numpy().astype(np.float32)
    data["nf4_normal_map"] = np.unique(nm[nm != 0].tolist() + [0.0]).astype(np.float32)
    xn = (rng.standard_normal((8, 64)) * np.exp2(rng.integers(-4, 4, (8, 1)))).astype(np.float32)
    q, st = BF.quantize_4bit(torch.from_numpy(xn), blocksize=64, quant_type="nf4")
    qb = q.view(torch.uint8).numpy().reshape(-1)
    codes = np.stack([qb >> 4, qb & 15], -1).reshape(8, 64)  # first element of a byte in the high nibble
    deq = BF.dequantize_4bit(q, st).numpy()
    absmax = st.absmax.numpy().astype(np.float32)
    assert np.array_equal(data["nf4_table"][codes] * absmax[:, None], deq), "nibble order"
    data.update(nf4_x=xn, nf4_codes=codes.astype(np.uint8), nf4_absmax=absmax, nf4_deq=deq.astype(np.float32))
    data["versions"] = np.array(json.dumps({
        "torch": torch.__version__, "torchao": torchao.__version__, "bitsandbytes": bitsandbytes.__version__,
        "numpy": np.__version__}))
    np.savez_compressed(out, **data)
    print("wrote", out, json.loads(str(data["versions"])))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/quant_reference.npz")
