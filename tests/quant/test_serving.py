"""quant.serving: GPTQ / AutoAWQ GEMM / compressed-tensors FP8 folders (issue 14, "Serving formats").

Reference: tests/data/serving/<case>/ were written by our exporter from the seeded layers of inputs.npz, and
reference.npz holds what the projects' own unpacking code makes of them (scripts/make_serving_reference.py:
AutoGPTQ qlinear_cuda, GPTQModel dequantize_weight + its v1->v2 conversion, AutoAWQ dequantize_gemm,
compressed-tensors 0.20.1 dequantize). Our loader must equal it bit for bit (the integer formats dequantize to
float16 in all of them: float16 scale x small integer, rounded once; FP8 to float32: fp8 value x float32 scale),
and the exporter must still write the same bytes. Round trips use real quant.ptq results (GPTQ one-layer form,
RTN, rtn_format FP8; AWQ on a decoder in tests/quant/test_cli.py)."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.io import iter_safetensors
from quant.serving import export_hf, int_codes, load_hf_quantized

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import make_serving_reference as R  # noqa: E402

CASES = [*R.INT_CASES, R.FP8_CASE]


@pytest.fixture(scope="module")
def inputs():
    return dict(np.load(R.DATA / "inputs.npz"))


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(R.DATA / "reference.npz"))


def _bits_equal(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("case", CASES)
def test_dequantization_equals_reference_code(case, reference):
    t = load_hf_quantized(R.DATA / case, progress=False)
    for m in R.MODULES:
        ours = np.asarray(t[f"{m}.weight"]).T  # [in, out], as the references' kernels
        assert _bits_equal(ours, reference[f"{case}/{m}"]), (case, m)
        if f"{case}/{m}/gptqmodel" in reference:  # GPTQModel reads our v1 zero points after its v1 -> v2 shift
            assert _bits_equal(ours, reference[f"{case}/{m}/gptqmodel"]), (case, m)
    assert np.array_equal(np.asarray(t[f"{R.MODULES[0]}.bias"]), np.load(R.DATA / "inputs.npz")["other/bias"])


@pytest.mark.parametrize("case", CASES)
def test_exporter_writes_the_committed_bytes(case, inputs, tmp_path):
    before = {k: v.copy() for k, v in inputs.items()}
    out = R.export_case(inputs, case, tmp_path / case, overwrite=False)
    for f in sorted((R.DATA / case).iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), (case, f.name)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (R.DATA / case).iterdir())
    assert all(np.array_equal(before[k], inputs[k]) for k in inputs)  # inputs not modified


def test_quantization_configs(inputs):
    g = json.loads((R.DATA / "gptq_w4_g16_asym_actorder" / "config.json").read_text())["quantization_config"]
    assert {k: g[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True, "sym": False,
        "checkpoint_format": "gptq"}
    a = json.loads((R.DATA / "awq_w4_g16_asym" / "config.json").read_text())["quantization_config"]
    assert (a["quant_method"], a["version"], a["zero_point"], a["q_group_size"], a["w_bit"]) == ("awq", "gemm", True,
                                                                                                  16, 4)
    f = json.loads((R.DATA / R.FP8_CASE / "config.json").read_text())["quantization_config"]
    assert (f["quant_method"], f["format"]) == ("compressed-tensors", "float-quantized")
    strategies = {grp["weights"]["strategy"]: grp["targets"] for grp in f["config_groups"].values()}
    assert strategies == {"channel": [R.MODULES[0]], "tensor": [R.MODULES[1]]}
    assert "model.embed_tokens" in f["ignore"]


# ------------------------------------------------------------------------------ round trips of real PTQ results

def _flat_model(kernels: dict, extra: dict | None = None):
    """HF-named tensors around Flax kernels ``{"a/b/kernel": [in, out]}``: ``a.b.weight`` [out, in] + a bias."""
    t = {}
    for p, k in kernels.items():
        m = p[: -len("/kernel")].replace("/", ".")
        t[m + ".weight"] = np.asarray(k).T.copy()
        t[m + ".bias"] = np.arange(k.shape[1], dtype=np.float32)
    t.update(extra or {})
    return t, {"model_type": "toy"}


def _check_int_round_trip(tmp_path, tensors, config, report, fmt, modules=None, **kw):
    out = export_hf(tmp_path / fmt, tensors, report, format=fmt, config=config, progress=False, **kw)
    loaded = load_hf_quantized(out, progress=False)
    packed = load_hf_quantized(out, dequantize=False, progress=False)
    from quant.ptq import materialize

    for p, rec in report["layers"].items():
        m = p if modules is not None else p[: -len("/kernel")].replace("/", ".")
        lin = int_codes(rec, m, allow_in_scale=True)
        want16 = lin.dequantize(np.float16)  # float16 scales, exact float32 product
        assert _bits_equal(np.asarray(loaded[m + ".weight"]).T, want16.astype(np.float16)), p
        stored = np.asarray(rec.get("stored", rec["weight"]), np.float32)
        # float16 scales (relative 2^-11) and the float16 result (2^-11): within 2^-10 of the method's kernel
        np.testing.assert_allclose(want16, stored, rtol=2.0 ** -10, atol=1e-7)
        assert np.array_equal(np.asarray(materialize({"k": packed[m]})["k"]), want16), p  # codes kept exactly
        if m + ".bias" in tensors:
            assert np.array_equal(np.asarray(loaded[m + ".bias"]), tensors[m + ".bias"])
    return out, loaded


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    x = rng.standard_normal((256, 64)).astype(np.float32) * np.linspace(0.2, 3, 64, dtype=np.float32)
    return jnp.asarray(w), jnp.asarray(2 * x.T @ x / 256)


@pytest.mark.parametrize("cfg", [dict(bits=4, group_size=16, act_order=True),
                                 dict(bits=8, group_size=-1, sym=True)],
                         ids=["w4g16-asym-actorder", "w8-channel-sym"])  # 2/3 bits: the reference cases
def test_gptq_round_trip(cfg, layer, tmp_path):
    from quant.ptq import GPTQConfig, gptq_quantize_weight

    w, H = layer
    rec = gptq_quantize_weight(w, H, GPTQConfig(**cfg))
    report = {"method": "gptq", "layers": {"blk/up/kernel": rec}}
    tensors, config = _flat_model({"blk/up/kernel": w})
    cf = "gptq_v2" if np.any(np.asarray(rec["zero"]) == 0) and not cfg.get("sym") else "gptq"
    out, _ = _check_int_round_trip(tmp_path, tensors, config, report, "gptq", checkpoint_format=cf)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] == (cfg.get("act_order", False) and not cfg.get("static_groups", False))
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (cfg["bits"], cfg["group_size"], cfg.get("sym", False))


def test_rtn_round_trip_and_v1_zero_rule(layer, tmp_path):
    from quant.ptq import RTNConfig, rtn

    w, _ = layer
    w = w.at[:8, 0].set(jnp.abs(w[:8, 0]))  # a group with no negative weight: zero point 0
    params = {"blk": {"up": {"kernel": w}, "down": {"kernel": w[:32] * 0.5}}}
    _, report = rtn(params, None, None, RTNConfig(4, 8), progress=False)
    tensors, config = _flat_model({"blk/up/kernel": w, "blk/down/kernel": w[:32] * 0.5})
    with pytest.raises(ValueError, match="gptq_v2"):
        export_hf(tmp_path / "v1", tensors, report, format="gptq", config=config, progress=False)
    assert not (tmp_path / "v1").exists()
    _check_int_round_trip(tmp_path, tensors, config, report, "gptq", checkpoint_format="gptq_v2")


def test_awq_folded_input_scales(inputs, tmp_path):
    """An AWQ record with an explicit input scale s (x / s at run time) is rejected unless fold_in_scale names the
    tensors producing x (a norm's weight): they are divided by s, the codes stored as they are (AutoAWQ's
    scale_ln_fcs). AWQ results of quant.ptq.awq on a decoder: tests/quant/test_cli.py::test_awq_end_to_end."""
    report = _records(inputs, "awq_w4_g16_asym")
    s = np.linspace(0.5, 2.0, R.N_IN, dtype=np.float32)
    for rec in report["layers"].values():
        rec["stored"], rec["weight"] = rec["weight"], rec["weight"] / s[:, None]
        rec["in_scale"] = s
    tensors, config = R.case_tensors(inputs)
    with pytest.raises(ValueError, match="AWQ input scale"):
        export_hf(tmp_path / "x", tensors, report, format="awq", config=config, progress=False)
    fold = {m: ["model.norm.weight"] for m in R.MODULES}
    out, loaded = _check_int_round_trip(tmp_path, tensors, config, report, "awq", fold_in_scale=fold,
                                        modules=R.MODULES)
    assert np.array_equal(np.asarray(loaded["model.norm.weight"]), tensors["model.norm.weight"] / s)
    other = _records(inputs, "awq_w4_g16_asym")["layers"][R.MODULES[1]]
    report["layers"][R.MODULES[1]] = {**other, "stored": other["weight"], "weight": other["weight"] / s[::-1, None],
                                      "in_scale": s[::-1].copy()}
    with pytest.raises(ValueError, match="different AWQ input scales"):
        export_hf(tmp_path / "y", tensors, report, format="awq", config=config, progress=False, fold_in_scale=fold)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_round_trip(granularity, layer, tmp_path):
    from quant.formats import FloatFormat
    from quant.ptq import materialize, rtn_format

    w, _ = layer
    _, report = rtn_format({"blk": {"up": {"kernel": w}}}, FloatFormat("e4m3", granularity=granularity))
    tensors, config = _flat_model({"blk/up/kernel": w})
    out = export_hf(tmp_path / "fp8", tensors, report, format="fp8", config=config, progress=False)
    rec = report["layers"]["blk/up/kernel"]
    loaded = load_hf_quantized(out, progress=False)
    assert _bits_equal(np.asarray(loaded["blk.up.weight"]).T, np.asarray(rec["weight"], np.float32))
    packed = load_hf_quantized(out, dequantize=False, progress=False)
    assert np.array_equal(np.asarray(materialize({"k": packed["blk.up"]})["k"]), np.asarray(rec["weight"]))
    scale = iter_safetensors(out, names=["blk.up.weight_scale"])
    assert next(scale)[1].shape == ((32, 1) if granularity == "channel" else (1,))


# ------------------------------------------------------------------------------------------------------ errors

def _records(inputs, case):
    return R.case_records(inputs, case)


@pytest.mark.parametrize("mutate, fmt, match", [
    (lambda r: r, "fp8", "holds FP8 E4M3 codes"),
    (lambda r: {**r, "group_size": 24}, "gptq", "does not divide"),
    (lambda r: {**r, "bits": 5}, "gptq", "GPTQ checkpoints hold"),
    (lambda r: {**r, "format": "codebook", "packed": object()}, "gptq", "integer codes"),
    (lambda r: {**r, "rotation_seed": 3}, "gptq", "RSQ rotation"),
    (lambda r: {**r, "lorc": {}}, "gptq", "LoRC"),
    (lambda r: {**r, "scale": r["scale"] * 2}, "gptq", "do not reproduce"),
    (lambda r: r, "awq", "no g_idx"),
    (lambda r: r, "gguf", "format must be one of"),
], ids=["int-into-fp8", "group-size", "bits", "codebook", "rotation", "lorc", "inconsistent", "awq-actorder",
        "unknown-format"])
def test_rejects_what_a_format_cannot_hold(mutate, fmt, match, inputs, tmp_path):
    report = _records(inputs, "gptq_w4_g16_asym_actorder")
    m = R.MODULES[0]
    report["layers"][m] = mutate(report["layers"][m])
    tensors, config = R.case_tensors(inputs)
    with pytest.raises(ValueError, match=match):
        export_hf(tmp_path / "out", tensors, report, format=fmt, config=config, progress=False)
    assert not (tmp_path / "out").exists()


def test_rejects_fp_codes_mixed_bits_and_unknown_modules(inputs, tmp_path):
    tensors, config = R.case_tensors(inputs)
    fp = _records(inputs, R.FP8_CASE)
    with pytest.raises(ValueError, match="holds integer codes"):
        export_hf(tmp_path / "o", tensors, fp, format="gptq", config=config, progress=False)
    mixed = _records(inputs, "gptq_w4_g16_asym_actorder")
    mixed["layers"][R.MODULES[1]] = _records(inputs, "gptq_w8_perchannel_sym")["layers"][R.MODULES[1]]
    with pytest.raises(ValueError, match="one bits/group_size/sym"):
        export_hf(tmp_path / "o", tensors, mixed, format="gptq", config=config, progress=False)
    awq3 = _records(inputs, "gptq_w3_g32_asym_actorder")
    with pytest.raises(ValueError, match="4-bit"):
        export_hf(tmp_path / "o", tensors, awq3, format="awq", config=config, progress=False)
    with pytest.raises(ValueError, match="no tensor"):
        export_hf(tmp_path / "o", tensors, mixed, format="gptq", config=config, progress=False,
                  names={R.MODULES[0]: "model.nope", R.MODULES[1]: R.MODULES[1]})
    with pytest.raises(ValueError, match="config="):
        export_hf(tmp_path / "o", tensors, mixed, format="gptq", progress=False)
    assert not (tmp_path / "o").exists()
    ok = _records(inputs, "gptq_w2_g16_sym")
    export_hf(tmp_path / "o", tensors, ok, format="gptq", config=config, progress=False)
    with pytest.raises(FileExistsError):
        export_hf(tmp_path / "o", tensors, ok, format="gptq", config=config, progress=False)
