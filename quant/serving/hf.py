"""Write a :mod:`quant.ptq` result as a Hugging Face folder that serving stacks load, and read one back.

``export_hf(out_dir, model, report, format=...)`` with ``format``:

* ``"gptq"``: :mod:`quant.serving.gptq_format` (RTN / GPTQ / RSQ-free integer results, 2/3/4/8 bits, sym or asym,
  act-order ``g_idx``), ``quantization_config = {quant_method: gptq, bits, group_size, desc_act, sym,
  checkpoint_format}`` in ``config.json`` (and the same in ``quantize_config.json`` for AutoGPTQ / GPTQModel);
* ``"awq"``: :mod:`quant.serving.awq_format` (4-bit, consecutive groups), ``{quant_method: awq, version: gemm,
  zero_point, q_group_size / group_size, w_bit / bits, modules_to_not_convert}``;
* ``"fp8"``: :mod:`quant.serving.fp8_format` (E4M3, per-channel or per-tensor scales), ``{quant_method:
  compressed-tensors, format: float-quantized, quantization_status: compressed, config_groups, ignore}``.

``model`` is a Hugging Face folder (config.json + safetensors, sharded or not; tensors are streamed one at a time,
the other files — tokenizer, generation config — are copied) or a flat ``{hf_name: array}`` dict with ``config``.
The report's layers are named by ``names`` (a dict or a callable from report path to HF module name, e.g.
``"model.layers.0.self_attn.q_proj"``; default: the path without ``/kernel``, ``/`` -> ``.``). Each quantized module
``m`` loses ``m.weight`` and gains the format's tensors; every other tensor (biases included) is written as it is.
Every layer is checked before anything is written (:mod:`quant.serving.records`: code family, bits, group sizes
that divide, packing widths, run-time transforms, float16 range, the v1 zero-point rule); the folder appears at
``out_dir`` atomically (:class:`jaxmodels.atomic.AtomicOutput`), complete or not at all.

AWQ records with an explicit input scale ``s`` (no previous linear to fold ``1/s`` into; the Llama norms) are
written when ``fold_in_scale={module: [tensor names]}`` names the tensors that produce the module's input (the
norm's weight and bias): each is divided by ``s``, as AutoAWQ's ``scale_ln_fcs`` (modules sharing a tensor must
share ``s``).

``load_hf_quantized(path)`` reads any of the three back: ``{name: array}`` with each quantized module's
``m.weight`` dequantized in the nn.Linear layout ``[out, in]`` in the dtype the reference loaders compute in:
float16 ``W = s[g_idx] · (q − z[g_idx])`` for GPTQ / AWQ (the stored float16 scales times the integers, rounded
once to float16, as AutoGPTQ / GPTQModel / AutoAWQ), float32 ``weight · weight_scale`` for FP8; or with
``dequantize=False`` ``{m: QuantizedLinear}`` holding the kernel ``[in, out]`` for :func:`quant.ptq.materialize`.
(GPT-2's Conv1D keeps ``[in, out]`` weights: transpose ``m.weight`` for it.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxmodels.atomic import AtomicOutput
from jaxmodels.io import SafetensorsWriter, iter_safetensors, safetensors_specs
from jaxmodels.progress import progress_bar

from .awq_format import check_awq, pack_awq, unpack_awq
from .fp8_format import fp8_scheme, pack_fp8, unpack_fp8
from .gptq_format import check_gptq, pack_gptq, unpack_gptq
from .records import FPCodes, fp_codes, int_codes

__all__ = ["FORMATS", "export_hf", "load_hf_quantized", "hf_module_names", "to_quantized_linear"]

FORMATS = ("gptq", "awq", "fp8")
_SKIP_FILES = {"config.json", "model.safetensors.index.json", "quantize_config.json"}


def hf_module_names(report: dict, names=None) -> dict[str, str]:
    """``{report layer path: HF module name}`` (see the module docstring for ``names``)."""
    out = {}
    for p in report["layers"]:
        if names is None:
            m = p[: -len("/kernel")] if p.endswith("/kernel") else p
            m = m.replace("/", ".")
        elif callable(names):
            m = names(p)
        else:
            if p not in names:
                raise ValueError(f"report layer {p!r} has no entry in names")
            m = names[p]
        if not isinstance(m, str) or not m:
            raise ValueError(f"report layer {p!r}: HF module name must be a non-empty string, got {m!r}")
        out[p] = m
    if len(set(out.values())) != len(out):
        raise ValueError("two report layers map to the same HF module")
    return out


def _source(model, config):
    if isinstance(model, (str, os.PathLike)):
        src = Path(model)
        if not (src / "config.json").is_file():
            raise ValueError(f"{src}: not a Hugging Face folder (no config.json)")
        specs = safetensors_specs(src)
        cfg = json.loads((src / "config.json").read_text()) if config is None else dict(config)
        return src, specs, cfg
    if not isinstance(model, dict):
        raise TypeError(f"model must be a Hugging Face folder or a flat {{hf_name: array}} dict, got {type(model)}")
    if config is None:
        raise ValueError("a flat tensor dict needs config= (the config.json contents)")
    return None, dict(model), dict(config)


def _layers(fmt, report, names, specs, checkpoint_format, fold_in_scale):
    mods = hf_module_names(report, names)
    layers = {}
    for p, rec in report["layers"].items():
        m = mods[p]
        if f"{m}.weight" not in specs:
            raise ValueError(f"report layer {p!r}: the model has no tensor {m}.weight")
        shape = tuple(np.shape(specs[f"{m}.weight"]))
        n_in, n_out = np.shape(rec["weight"])
        if shape not in ((n_out, n_in), (n_in, n_out)):
            raise ValueError(f"report layer {p!r}: kernel [{n_in}, {n_out}] does not match {m}.weight {shape}")
        if fmt == "fp8":
            layers[m] = fp_codes(rec, m)
            continue
        fold = fmt == "awq" and rec.get("in_scale") is not None and m in (fold_in_scale or {})
        lin = int_codes(rec, m, "GPTQ" if fmt == "gptq" else "AutoAWQ GEMM", allow_in_scale=fold)
        check_gptq(lin, m, checkpoint_format) if fmt == "gptq" else check_awq(lin, m)
        lin.in_scale = np.asarray(rec["in_scale"], np.float32) if fold else None
        layers[m] = lin
    if fmt != "fp8" and layers:
        first = next(iter(layers.values()))
        for m, lin in layers.items():
            got, want = (lin.bits, lin.group_size, lin.sym), (first.bits, first.group_size, first.sym)
            if got != want:
                raise ValueError(f"{m}: {fmt} checkpoints have one bits/group_size/sym for every layer; "
                                 f"{got} != {want}")
    return layers


def _folds(layers, fold_in_scale, specs):
    """``{tensor name: s}`` of the AWQ input scales folded into the tensors that produce each module's input."""
    folds = {}
    for m, lin in layers.items():
        s = getattr(lin, "in_scale", None)
        if s is None:
            continue
        for t in fold_in_scale[m]:
            if t not in specs or tuple(np.shape(specs[t])) != s.shape:
                raise ValueError(f"{m}: fold_in_scale tensor {t!r} is not a [{s.size}] tensor of the model")
            if t in folds and not np.array_equal(folds[t], s):
                raise ValueError(f"{t}: modules folded into it have different AWQ input scales")
            folds[t] = s
    return folds


def quantization_config(fmt, layers, unquantized, checkpoint_format="gptq") -> dict:
    """The ``quantization_config`` of ``config.json`` for ``layers`` (one format)."""
    if fmt == "fp8":
        groups = {}
        for strategy in ("channel", "tensor"):
            targets = sorted(m for m, l in layers.items() if l.strategy == strategy)
            if targets:
                groups[f"group_{len(groups)}"] = fp8_scheme(strategy, targets)
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "quantization_status": "compressed", "config_groups": groups, "ignore": sorted(unquantized),
                "kv_cache_scheme": None, "global_compression_ratio": None}
    lin = next(iter(layers.values()))
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": lin.bits, "group_size": lin.group_size,
                "desc_act": any(not l.contiguous() for l in layers.values()), "sym": lin.sym,
                "checkpoint_format": checkpoint_format, "static_groups": False, "true_sequential": True,
                "pack_dtype": "int32", "meta": {"quantizer": ["weightlab"]}}
    return {"quant_method": "awq", "version": "gemm", "zero_point": True, "bits": 4, "w_bit": 4,
            "group_size": lin.group_size, "q_group_size": lin.group_size,
            "modules_to_not_convert": sorted(unquantized) or None}


def export_hf(out_dir, model, report: dict, *, format: str = "gptq", names=None, config: dict | None = None,
              checkpoint_format: str = "gptq", fold_in_scale: dict | None = None, overwrite: bool = False,
              progress: bool | None = None, extra_files: dict | None = None) -> Path:
    """Write ``report``'s layers in ``format`` with every other tensor of ``model`` (module docstring). Returns
    the folder. ``extra_files``: ``{file name: bytes | str | source path}`` written into the folder too (a
    tokenizer, a report), inside the same atomic step."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(report, dict) or not isinstance(report.get("layers"), dict) or not report["layers"]:
        raise ValueError("report must be a quant.ptq report with a non-empty 'layers' dict")
    src, specs, cfg = _source(model, config)
    layers = _layers(format, report, names, specs, checkpoint_format, fold_in_scale)
    folds = _folds(layers, fold_in_scale, specs) if format == "awq" else {}
    quantized = {f"{m}.weight" for m in layers}
    unquantized = [n[: -len(".weight")] for n, s in specs.items()
                   if n.endswith(".weight") and len(np.shape(s)) == 2 and n not in quantized]
    cfg["quantization_config"] = quantization_config(format, layers, unquantized, checkpoint_format)
    new = {}
    for m, lin in layers.items():
        packed = (pack_gptq(lin, checkpoint_format) if format == "gptq" else
                  pack_awq(lin) if format == "awq" else pack_fp8(lin))
        new.update({f"{m}.{k}": v for k, v in packed.items()})
    out_specs = {n: s for n, s in specs.items() if n not in quantized}
    out_specs.update(new)
    if src is None:
        stream = ((n, np.asarray(specs[n])) for n in specs)
    else:
        stream = iter_safetensors(src)
    out = AtomicOutput(out_dir, overwrite=overwrite)
    try:
        out.path.mkdir()
        with SafetensorsWriter(out.path / "model.safetensors", out_specs, {"format": "pt"}) as w:
            for n, v in progress_bar(stream, progress, total=len(specs), desc=f"export {format}"):
                if n in quantized:
                    continue
                if n in folds:
                    v = (np.asarray(v, np.float32) / folds[n]).astype(np.asarray(v).dtype)
                w.write(n, v)
            for n, v in new.items():
                w.write(n, v)
        if src is not None:
            for f in sorted(src.iterdir()):
                if f.is_file() and f.suffix != ".safetensors" and f.name not in _SKIP_FILES:
                    shutil.copy2(f, out.path / f.name)
        for fname, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                (out.path / fname).write_bytes(content)
            elif isinstance(content, str):
                (out.path / fname).write_text(content)
            else:
                shutil.copy2(content, out.path / fname)
        (out.path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if format == "gptq":
            (out.path / "quantize_config.json").write_text(
                json.dumps(cfg["quantization_config"], indent=2, sort_keys=True) + "\n")
    except BaseException:
        out.abort()
        raise
    return out.commit()


def to_quantized_linear(lin, dtype=np.float32):
    """:class:`quant.ptq.QuantizedLinear` of an :class:`IntCodes` / :class:`FPCodes` (kernel ``[in, out]``;
    act-order codes stored in group order with ``in_perm``)."""
    from quant.formats import FloatFormat, IntFormat
    from quant.packing import pack_bits
    from quant.ptq.export import QuantizedLinear
    from quant.qarray import QuantizedArray

    n_in, n_out = lin.shape
    if isinstance(lin, FPCodes):
        scale = jnp.asarray(lin.scale.reshape(1, -1))
        q = QuantizedArray(pack_bits(jnp.asarray(lin.codes, jnp.uint8), 8), scale, None,
                           FloatFormat("e4m3", granularity=lin.strategy), (n_in, n_out), np.dtype(dtype))
        return QuantizedLinear(q)
    n_groups = lin.scale.shape[0]
    gs = n_in // n_groups
    perm = None
    codes = lin.codes
    if not np.array_equal(lin.g_idx, np.arange(n_in) // gs):
        perm = np.argsort(lin.g_idx, kind="stable")
        if not np.array_equal(lin.g_idx[perm], np.arange(n_in) // gs):
            raise ValueError("g_idx groups are not all of size in/G: only dequantize=True can load this layer")
        codes = codes[perm]
    sym = bool(np.all(lin.zero == 2 ** (lin.bits - 1)))
    fmt = IntFormat(lin.bits, symmetric=sym, granularity="group", group_size=gs)
    zero = None if sym else jnp.asarray(lin.zero, jnp.uint8)
    q = QuantizedArray(pack_bits(jnp.asarray(codes, jnp.uint8), lin.bits), jnp.asarray(lin.scale, jnp.float16), zero,
                       fmt, (n_in, n_out), np.dtype(dtype))
    in_perm = None if perm is None else jnp.asarray(perm, jnp.int16 if n_in < 32768 else jnp.int32)
    return QuantizedLinear(q, in_perm)


def load_hf_quantized(path, *, dequantize: bool = True, progress: bool | None = None) -> dict:
    """Read a folder written by :func:`export_hf` (or by AutoGPTQ / GPTQModel / AutoAWQ / llm-compressor in these
    layouts): ``{name: array}``, quantized modules as ``m.weight`` ``[out, in]`` (float16 GPTQ / AWQ, float32
FP8), or ``{m:
    QuantizedLinear}`` with ``dequantize=False``."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") not in ("gptq", "awq", "compressed-tensors"):
        raise ValueError(f"{path}: config.json has no gptq / awq / compressed-tensors quantization_config")
    method = qc["quant_method"]
    if method == "compressed-tensors":
        fmts = {g.get("format", qc.get("format")) for g in qc["config_groups"].values()}
        if fmts != {"float-quantized"} or any(g["weights"]["type"] != "float" or g["weights"]["num_bits"] != 8
                                              for g in qc["config_groups"].values()):
            raise ValueError(f"{path}: only float-quantized FP8 compressed-tensors checkpoints are read, got {qc}")
    if method == "awq" and qc.get("version", "gemm").lower() != "gemm":
        raise ValueError(f"{path}: only the AWQ GEMM layout is read, got version {qc.get('version')!r}")
    marker = {"gptq": ".qweight", "awq": ".qweight", "compressed-tensors": ".weight_scale"}[method]
    specs = safetensors_specs(path)
    mods = {n[: -len(marker)] for n in specs if n.endswith(marker)}
    parts = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales"),
             "compressed-tensors": ("weight", "weight_scale")}[method]
    need = {m: {p for p in parts if f"{m}.{p}" in specs} for m in mods}
    for m, have in need.items():
        missing = set(parts) - have - ({"g_idx"} if method == "gptq" else set())
        if missing:
            raise ValueError(f"{path}: quantized module {m} lacks {sorted(missing)}")
    out, pending = {}, {m: {} for m in mods}
    for n, v in progress_bar(iter_safetensors(path), progress, total=len(specs), desc=f"load {method}"):
        m, _, leaf = n.rpartition(".")
        if m in pending and leaf in need[m]:
            pending[m][leaf] = v
            if len(pending[m]) < len(need[m]):
                continue
            t = pending.pop(m)
            if method == "gptq":
                lin = unpack_gptq(t, int(qc["bits"]), qc.get("checkpoint_format", "gptq"), qc.get("group_size", -1),
                                  bool(qc.get("sym", False)))
            elif method == "awq":
                if int(qc.get("bits", qc.get("w_bit", 4))) != 4:
                    raise ValueError(f"{path}: the AWQ GEMM layout is 4-bit, config says {qc}")
                lin = unpack_awq(t, qc.get("group_size", qc.get("q_group_size", -1)))
            else:
                lin = unpack_fp8(t)
            if dequantize:
                w = lin.dequantize() if isinstance(lin, FPCodes) else lin.dequantize(np.float16).astype(np.float16)
                out[f"{m}.weight"] = jnp.asarray(np.ascontiguousarray(w.T))
            else:
                out[m] = to_quantized_linear(lin)
        else:
            out[n] = jnp.asarray(v)
    return out
