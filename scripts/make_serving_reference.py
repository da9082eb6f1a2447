"""Reference data for quant.serving (tests/quant/test_serving.py): weightlab's GPTQ / AutoAWQ / compressed-tensors
exports dequantized by those projects' own unpacking code.

Two steps:

1. ``.venv/bin/python scripts/make_serving_reference.py write`` (weightlab): draws small layers (seeded integer
   codes, zero points, float32 scales, act-order permutations, FP8 bit patterns; ``inputs.npz``) and writes them
   with :func:`quant.serving.export_hf` into ``tests/data/serving/<case>/`` (config.json + model.safetensors).
   The test rebuilds the same records from ``inputs.npz`` and checks that the exporter still writes these bytes.
2. ``/tmp/h3env/bin/python scripts/make_serving_reference.py reference`` (throwaway venv: torch 2.13.0+cpu,
   safetensors 0.8.0, compressed-tensors 0.20.1 on Python 3.11; ``/tmp/mkenv`` plus ``pip install
   compressed-tensors``): reads every folder with ``safetensors.torch`` and dequantizes each layer with the
   reference code below, saving ``tests/data/serving/reference.npz`` (``<case>/<module>``: the dequantized
   ``[in, out]`` kernel as the reference returns it, float16 for GPTQ/AWQ, float32 for FP8).

Reference code (copied, torch, unchanged except for being lifted out of their ``nn.Module``):

* AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_cuda.py`` ``QuantLinear.forward`` (non-CUDA branch, the
  dequantization with ``g_idx``), github.com/AutoGPTQ/AutoGPTQ commit 9f7d37072917ab3a7545835f23e808294a542153,
  MIT license — v1 checkpoints (``zeros = (field & maxq) + 1``), 2/3/4/8 bits;
* GPTQModel ``gptqmodel/nn_modules/qlinear/__init__.py`` ``dequantize_weight`` / ``_dequantize_from_codes`` (v2
  zero points as stored) and ``gptqmodel/utils/model.py`` ``convert_gptq_v1_to_v2_format_module`` (v1 -> v2: adds
  0b0101.. / 0x11.. / 0x0101.. to the packed qzeros words), github.com/ModelCloud/GPTQModel commit
  f4c327a17eb3e24524d5a97a3d682e3696ae6a28, Apache-2.0 — 2/4/8 bits;
* AutoAWQ ``awq/utils/packing_utils.py`` ``unpack_awq`` / ``reverse_awq_order`` / ``dequantize_gemm``,
  github.com/casper-hansen/AutoAWQ commit 88e4c76b20755db275574e6a03c83c84ba3bece5, MIT license;
* compressed-tensors 0.20.1 (PyPI): ``QuantizationConfig.model_validate(config.json's quantization_config)`` and
  ``compressed_tensors.quantization.lifecycle.forward.dequantize(weight, weight_scale, args=group.weights)``
  (imported, not copied).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "serving"
N_IN, N_OUT = 64, 32

# case: (format, bits, group_size, sym, act_order, checkpoint_format, zero 0 allowed)
INT_CASES = {
    "gptq_w4_g16_asym_actorder": ("gptq", 4, 16, False, True, "gptq", False),
    "gptq_w8_perchannel_sym": ("gptq", 8, -1, True, False, "gptq", False),
    "gptq_w3_g32_asym_actorder": ("gptq", 3, 32, False, True, "gptq", False),
    "gptq_w2_g16_sym": ("gptq", 2, 16, True, False, "gptq", False),
    "gptq_v2_w4_g16_asym": ("gptq", 4, 16, False, True, "gptq_v2", True),
    "awq_w4_g16_asym": ("awq", 4, 16, False, False, None, True),
    "awq_w4_g32_sym": ("awq", 4, 32, True, False, None, True),
}
FP8_CASE = "fp8_channel_and_tensor"
MODULES = ("model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj")


# ------------------------------------------------------------------------------------------- step 1 (weightlab)

def draw_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded codes / zero points / scales / g_idx for every int case and module, FP8 bit patterns + scales."""
    rng = np.random.default_rng(seed)
    out = {}
    for case, (_, bits, gs, sym, act, _, zero0) in INT_CASES.items():
        maxq = 2 ** bits - 1
        g = N_IN if gs == -1 else gs
        for m in MODULES:
            k = f"{case}/{m}"
            out[k + "/codes"] = rng.integers(0, maxq + 1, (N_IN, N_OUT)).astype(np.uint8)
            out[k + "/scale"] = (rng.uniform(0.5, 2.0, (N_OUT, N_IN // g)) * 2.0 ** -6).astype(np.float32)
            if not sym:
                out[k + "/zero"] = rng.integers(0 if zero0 else 1, maxq + 1, (N_OUT, N_IN // g)).astype(np.float32)
                if zero0:
                    out[k + "/zero"][0, 0] = 0.0
            perm = rng.permutation(N_IN) if act else np.arange(N_IN)
            g_idx = np.empty(N_IN, np.int32)
            g_idx[perm] = np.arange(N_IN) // g
            out[k + "/g_idx"], out[k + "/perm"] = g_idx, perm.astype(np.int32)
    for m in MODULES:
        bits_ = rng.integers(0, 256, (N_IN, N_OUT)).astype(np.uint8)
        bits_[(bits_ & 0x7F) == 0x7F] = 0x3C  # no NaN patterns
        out[f"{FP8_CASE}/{m}/codes"] = bits_
    out[f"{FP8_CASE}/{MODULES[0]}/scale"] = rng.uniform(0.5, 2.0, (1, N_OUT)).astype(np.float32) * 2.0 ** -8
    out[f"{FP8_CASE}/{MODULES[1]}/scale"] = np.full((1, 1), 0.00317, np.float32)
    out["other/norm"] = rng.standard_normal(N_IN).astype(np.float32)
    out["other/bias"] = rng.standard_normal(N_OUT).astype(np.float32)
    out["other/embed"] = rng.standard_normal((16, N_IN)).astype(np.float32)
    return out


def case_records(inputs: dict, case: str) -> dict:
    """The per-layer records (report schema of quant.ptq) of one case, rebuilt from ``inputs``."""
    import jax.numpy as jnp

    layers = {}
    if case == FP8_CASE:
        import ml_dtypes

        from quant.formats import FloatFormat
        from quant.packing import pack_bits
        from quant.qarray import QuantizedArray

        for m in MODULES:
            c, s = inputs[f"{case}/{m}/codes"], inputs[f"{case}/{m}/scale"]
            w = c.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
            if s.size == 1:  # per-tensor: an rtn_format-style record with its packed QuantizedArray
                qa = QuantizedArray(pack_bits(jnp.asarray(c), 8), jnp.asarray(s), None,
                                    FloatFormat("e4m3", granularity="tensor"), c.shape, np.dtype(np.float32))
                layers[m] = {"weight": w, "format": qa.fmt, "bits": 8, "group_size": None, "packed": qa}
            else:
                layers[m] = {"weight": w, "format": "e4m3", "bits": 8, "group_size": -1, "codes": c,
                             "scale": s.T.copy(), "zero": None}
        return {"method": "fixture", "layers": layers}
    _, bits, gs, sym, _, _, _ = INT_CASES[case]
    for m in MODULES:
        k = f"{case}/{m}"
        c, s, g_idx = inputs[k + "/codes"], inputs[k + "/scale"], inputs[k + "/g_idx"]
        z = np.full_like(s, 2 ** (bits - 1)) if sym else inputs[k + "/zero"]
        w = s.T[g_idx] * (c.astype(np.float32) - z.T[g_idx])
        layers[m] = {"weight": w, "format": "int", "bits": bits, "group_size": gs, "sym": sym, "codes": c,
                     "scale": s, "zero": None if sym else z, "g_idx": g_idx, "perm": inputs[k + "/perm"]}
    return {"method": "fixture", "layers": layers}


def case_tensors(inputs: dict) -> tuple[dict, dict]:
    """The unquantized HF tensors around the two modules and a config.json."""
    t = {"model.embed_tokens.weight": inputs["other/embed"], "model.norm.weight": inputs["other/norm"],
         f"{MODULES[0]}.bias": inputs["other/bias"]}
    for m in MODULES:
        t[f"{m}.weight"] = np.zeros((N_OUT, N_IN), np.float32)  # replaced by the export
    return t, {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": N_IN}


def export_case(inputs: dict, case: str, out: Path, overwrite: bool = True) -> Path:
    from quant.serving import export_hf

    tensors, config = case_tensors(inputs)
    report = case_records(inputs, case)
    if case == FP8_CASE:
        return export_hf(out, tensors, report, format="fp8", config=config, overwrite=overwrite, progress=False)
    fmt, *_, cf, _ = INT_CASES[case]
    kw = {"checkpoint_format": cf} if fmt == "gptq" else {}
    return export_hf(out, tensors, report, format=fmt, config=config, overwrite=overwrite, progress=False, **kw)


def write_cli_inputs():
    """A calibration text (the first 12000 characters of jaxmodels.text's train split, the pydoc topics) and a
    128-token BPE tokenizer.json for the tiny Llama of tests/data/hf (vocab_size 128: too small for byte-level)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jaxmodels.text import load_corpus

    text = load_corpus("train")[:12000]
    (DATA / "calib.txt").write_text(text)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60,
                                  show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    tok.save(str(DATA / "tokenizer.json"))


def write():
    DATA.mkdir(parents=True, exist_ok=True)
    write_cli_inputs()
    inputs = draw_inputs()
    np.savez_compressed(DATA / "inputs.npz", **inputs)
    for case in [*INT_CASES, FP8_CASE]:
        export_case(inputs, case, DATA / case)
        print("wrote", DATA / case)


# --------------------------------------------------------------------------------- step 2 (reference, torch)

def autogptq_dequant(qweight, qzeros, scales, g_idx, bits):
    """AutoGPTQ qlinear_cuda.QuantLinear.forward, non-CUDA branch: the kernel [in, out] it multiplies x with."""
    import torch

    if bits in [2, 4, 8]:
        wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    else:
        wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                           [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
    if bits in [2, 4, 8]:
        zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, 32 // bits),
                                          wf.unsqueeze(0)).to(torch.int16 if bits == 8 else torch.int8)
        zeros = torch.bitwise_and(zeros, (2**bits) - 1)
        zeros = zeros + 1
        zeros = zeros.reshape(scales.shape)
        weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, 32 // bits, -1),
                                           wf.unsqueeze(-1)).to(torch.int16 if bits == 8 else torch.int8)
        weight = torch.bitwise_and(weight, (2**bits) - 1)
    elif bits == 3:
        zeros = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
        zeros = zeros >> wf.unsqueeze(0)
        zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | ((zeros[:, :, 1, 0] << 2) & 0x4)
        zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | ((zeros[:, :, 2, 0] << 1) & 0x6)
        zeros = zeros & 0x7
        zeros = torch.cat([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], dim=2)
        zeros = zeros + 1
        zeros = zeros.reshape(scales.shape)
        weight = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
        weight = (weight >> wf.unsqueeze(-1)) & 0x7
        weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | ((weight[:, 1, 0] << 2) & 0x4)
        weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | ((weight[:, 2, 0] << 1) & 0x6)
        weight = weight & 0x7
        weight = torch.cat([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], dim=1)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    return scales[g_idx.long()] * (weight - zeros[g_idx.long()])


def gptqmodel_v1_to_v2(qzeros, bits):
    """GPTQModel convert_gptq_v1_to_v2_format_module, int32 pack_dtype, bits 2/4/8."""
    q = qzeros.clone()
    if bits == 2:
        q += 0b01010101010101010101010101010101
    elif bits == 4:
        q += 0b00010001000100010001000100010001
    elif bits == 8:
        q += 0b00000001000000010000000100000001
    return q


def gptqmodel_dequant(qweight, qzeros, scales, g_idx, bits):
    """GPTQModel BaseQuantLinear.dequantize_weight (non-planar, bits 2/4/8) + _dequantize_from_codes (num_itr=1)."""
    import torch

    pack_factor, maxq = 32 // bits, 2**bits - 1
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    dequant_dtype = torch.int16 if bits == 8 else torch.int8
    zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, pack_factor),
                                      wf.unsqueeze(0)).to(dequant_dtype)
    zeros = torch.bitwise_and(zeros, maxq).reshape(scales.shape)
    weight = torch.bitwise_and(torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, pack_factor, -1),
                                                         wf.unsqueeze(-1)).to(dequant_dtype), maxq)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    return scales[g_idx.long()] * (weight - zeros[g_idx.long()])


AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def unpack_awq(qweight, qzeros, bits):
    import torch

    shifts = torch.arange(0, 32, bits, device=qzeros.device)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    if qzeros is not None:
        izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
        izeros = izeros.view(izeros.shape[0], -1)
    else:
        izeros = qzeros
    return iweights, izeros


def reverse_awq_order(iweights, izeros, bits):
    import torch

    reverse_order_tensor = torch.arange(iweights.shape[-1], dtype=torch.int32, device=izeros.device)
    reverse_order_tensor = reverse_order_tensor.view(-1, 32 // bits)
    reverse_order_tensor = reverse_order_tensor[:, AWQ_REVERSE_ORDER]
    reverse_order_tensor = reverse_order_tensor.view(-1)
    if izeros is not None:
        izeros = izeros[:, reverse_order_tensor]
    iweights = iweights[:, reverse_order_tensor]
    return iweights, izeros


def dequantize_gemm(qweight, qzeros, scales, bits, group_size):
    import torch

    iweight, izeros = unpack_awq(qweight, qzeros, bits)
    iweight, izeros = reverse_awq_order(iweight, izeros, bits)
    iweight = torch.bitwise_and(iweight, (2**bits) - 1)
    izeros = torch.bitwise_and(izeros, (2**bits) - 1)
    scales = scales.repeat_interleave(group_size, dim=0)
    izeros = izeros.repeat_interleave(group_size, dim=0)
    return (iweight - izeros) * scales


def reference():
    import compressed_tensors
    import safetensors
    import torch
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file

    out = {}
    for case in [*INT_CASES, FP8_CASE]:
        folder = DATA / case
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        t = load_file(str(folder / "model.safetensors"))
        if case == FP8_CASE:
            cfg = QuantizationConfig.model_validate(qc)
            for group in cfg.config_groups.values():
                for m in group.targets:
                    w = dequantize(t[f"{m}.weight"], t[f"{m}.weight_scale"], args=group.weights)
                    out[f"{case}/{m}"] = w.T.numpy()  # [in, out]
            continue
        for m in MODULES:
            if qc["quant_method"] == "awq":
                gs = qc["q_group_size"] if qc["q_group_size"] != -1 else N_IN
                out[f"{case}/{m}"] = dequantize_gemm(t[f"{m}.qweight"], t[f"{m}.qzeros"], t[f"{m}.scales"], 4,
                                                     gs).numpy()
                continue
            args = (t[f"{m}.qweight"], t[f"{m}.qzeros"], t[f"{m}.scales"], t[f"{m}.g_idx"], qc["bits"])
            if qc["checkpoint_format"] == "gptq":
                out[f"{case}/{m}"] = autogptq_dequant(*args).numpy()
                if qc["bits"] != 3:
                    v2 = gptqmodel_dequant(args[0], gptqmodel_v1_to_v2(args[1], qc["bits"]), *args[2:])
                    out[f"{case}/{m}/gptqmodel"] = v2.numpy()
            else:
                out[f"{case}/{m}"] = gptqmodel_dequant(*args).numpy()
    meta = {"torch": torch.__version__, "safetensors": safetensors.__version__,
            "compressed_tensors": compressed_tensors.__version__, "python": sys.version.split()[0]}
    np.savez_compressed(DATA / "reference.npz", versions=np.array(json.dumps(meta)), **out)
    print("wrote", DATA / "reference.npz", meta, len(out), "arrays")


def check_transformers(folder: str, float_folder: str):
    """One-off (h3env): transformers loads a ``python -m quant ... format: fp8`` folder through compressed-tensors
    and its logits equal those of the float model with every quantized linear replaced by compressed-tensors'
    own dequantization of our file; records the result in tests/data/serving/transformers_check.json."""
    import compressed_tensors
    import torch
    import transformers
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file

    folder = Path(folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    q = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(float_folder, dtype=torch.float32)
    t = load_file(str(folder / "model.safetensors"))
    sd = ref.state_dict()
    n = 0
    for group in QuantizationConfig.model_validate(qc).config_groups.values():
        for m in group.targets:
            sd[f"{m}.weight"] = dequantize(t[f"{m}.weight"], t[f"{m}.weight_scale"], args=group.weights)
            n += 1
    ref.load_state_dict(sd)
    ids = torch.arange(1, 25).reshape(2, 12) % 128
    with torch.no_grad():
        a, b = q(ids).logits, ref(ids).logits
    res = {"folder": str(folder), "quantized_linears": n, "max_abs_logit_diff": float((a - b).abs().max()),
           "max_abs_logit": float(b.abs().max()), "loaded_class": type(q).__name__,
           "transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__,
           "torch": torch.__version__}
    (DATA / "transformers_check.json").write_text(json.dumps(res, indent=2) + "\n")
    print(res)


if __name__ == "__main__":
    {"write": write, "reference": reference, "check": lambda: check_transformers(*sys.argv[2:4])}[sys.argv[1]]()
