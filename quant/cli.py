"""``python -m quant CONFIG.yaml --out DIR``: quantize a Hugging Face decoder folder with a named PTQ method and write
a serving format, the quantization twin of ``python -m merging``.

Config::

    model: path/to/hf_folder        # config.json + safetensors (Llama / Mistral / Qwen2 / GPT-2); tokenizer.json
    method: gptq                    # rtn | gptq | awq | rsq | flexround | zeroquant_fp
    bits: 4                         # 2..8 (zeroquant_fp: 4 -> FP4 e2m1, 6 -> FP6 e3m2, 8 -> FP8 e4m3)
    group_size: 128                 # input features per scale, -1: one per output channel
    sym: false
    act_order: true                 # gptq / rsq / zeroquant_fp (GPTQ's desc_act)
    static_groups: false            # gptq / rsq / zeroquant_fp
    calibration: {text: corpus.txt, samples: 128, seq_len: 512, seed: 0}   # every method but rtn
    format: gptq                    # gptq | awq | fp8 | weightlab
    checkpoint_format: gptq_v2      # format gptq only: gptq (v1, z - 1 zero points) | gptq_v2; required if asym
    granularity: channel            # format fp8 with method rtn: channel | tensor
    tokenizer: path/to/tokenizer.json   # default: the model folder's tokenizer.json
    options: {percdamp: 0.01}       # any other field of the method's config dataclass (GPTQConfig, AWQConfig, ...)

Paths are relative to the config file. Calibration takes ``samples`` windows of ``seq_len`` tokens at seeded random
offsets of the tokenized text (the GPTQ / AWQ references' C4 / Pile sampling, on a local text), one batch.
Only the decoder blocks' linears are quantized (embeddings, norms and the LM head stay as they are); ``rtn`` with
``format: fp8`` rounds them to FP8 E4M3 (``quant.ptq.rtn_format``, per-channel or per-tensor scales). ``awq`` with
``format: awq``: a layer whose scale cannot be folded into a previous layer (``o_proj`` under GQA) is stored
unscaled on the AWQ grid, as AutoAWQ does (the GEMM layout has no run-time input scale).

Validation before any work (``--dry-run`` stops there): unknown keys / methods / formats / options, bits and group
sizes the method or the format cannot hold, a group size that does not divide some linear's inputs, packing widths
of the format, a method the format cannot store (RSQ's rotation in GPTQ, FP codes in GPTQ/AWQ), a missing model,
config, tokenizer or calibration file, a text too short for ``seq_len``, an existing ``--out`` without
``--overwrite``. Output: ``--out`` appears atomically (:class:`jaxmodels.atomic.AtomicOutput`) with the quantized
weights in the chosen format (:func:`quant.serving.export_hf`; ``weightlab``: :func:`quant.ptq.save_quantized`),
the model's config (plus ``quantization_config``), its tokenizer files and ``quant_report.json`` (method, config,
per-layer relative output errors).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QuantConfig", "ConfigError", "load_config", "run_quantize", "main", "METHODS", "FORMATS"]

METHODS = ("rtn", "gptq", "awq", "rsq", "flexround", "zeroquant_fp")
FORMATS = ("gptq", "awq", "fp8", "weightlab")
KEYS = {"model", "method", "bits", "group_size", "sym", "act_order", "static_groups", "calibration", "format",
        "checkpoint_format", "granularity", "tokenizer", "options"}
CALIB_KEYS = {"text", "samples", "seq_len", "seed"}
# the formats each method's records fit (RSQ needs its rotation at run time; ZeroQuant-FP codes are FP)
FORMAT_METHODS = {"gptq": {"rtn", "gptq", "awq", "flexround"}, "awq": {"rtn", "gptq", "awq", "flexround"},
                  "fp8": {"rtn", "zeroquant_fp"}, "weightlab": set(METHODS)}
FP_BITS = {4: "e2m1", 6: "e3m2", 8: "e4m3"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


class ConfigError(ValueError):
    """The quantization config or its inputs are invalid (raised before any work)."""


@dataclasses.dataclass
class QuantConfig:
    """A parsed, validated quantization config (:func:`load_config`; keys as in the module docstring): the resolved
    ``model`` folder and ``tokenizer`` paths, ``method``, ``bits``, ``group_size``, ``sym``, ``act_order``,
    ``static_groups``, ``format``, ``checkpoint_format``, ``granularity``, the ``calibration`` settings (None for an
    ``rtn`` config without one), the method's extra ``options`` and the model's ``config.json`` as ``hf_config``."""

    model: Path
    method: str
    bits: int
    group_size: int
    sym: bool
    act_order: bool
    static_groups: bool
    format: str
    checkpoint_format: str
    granularity: str
    tokenizer: Path
    calibration: dict | None
    options: dict
    hf_config: dict

    def method_config(self):
        """The method's config dataclass (validated)."""
        from quant import ptq

        o = dict(self.options)
        base = dict(bits=self.bits, group_size=self.group_size, sym=self.sym)
        gptq_kw = dict(base, act_order=self.act_order, static_groups=self.static_groups)
        if self.method == "rtn":
            cfg = ptq.RTNConfig(**base, **o)
        elif self.method == "gptq":
            cfg = ptq.GPTQConfig(**gptq_kw, **o)
        elif self.method == "awq":
            cfg = ptq.AWQConfig(**base, **o)
        elif self.method == "rsq":
            cfg = ptq.RSQConfig(gptq=ptq.GPTQConfig(**gptq_kw), **o)
        elif self.method == "flexround":
            cfg = ptq.FlexRoundConfig(**base, **o)
        else:
            cfg = ptq.ZeroQuantFPConfig(weight_format=FP_BITS[self.bits], group_size=self.group_size,
                                        act_order=self.act_order, static_groups=self.static_groups, **o)
        cfg.validate()
        return cfg


def _method_fields(method: str) -> set[str]:
    from quant import ptq

    cls = {"rtn": ptq.RTNConfig, "gptq": ptq.GPTQConfig, "awq": ptq.AWQConfig, "rsq": ptq.RSQConfig,
           "flexround": ptq.FlexRoundConfig, "zeroquant_fp": ptq.ZeroQuantFPConfig}[method]
    taken = {"bits", "group_size", "sym", "act_order", "static_groups", "gptq", "weight_format"}
    return {f.name for f in dataclasses.fields(cls)} - taken


def _int(raw, key, default=None):
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"config: `{key}` must be an integer, got {v!r}")
    return v


def _bool(raw, key, default=False):
    v = raw.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"config: `{key}` must be true or false, got {v!r}")
    return v


def load_config(path_or_dict, root: str | os.PathLike | None = None) -> QuantConfig:
    """Parse and validate a config (YAML file or dict; paths relative to the file, or to ``root``)."""
    import yaml

    if isinstance(path_or_dict, dict):
        raw, root = dict(path_or_dict), Path(root or ".")
    else:
        p = Path(path_or_dict)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        root = Path(root) if root is not None else p.parent
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping with at least `model` and `method`")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ConfigError(f"config: unknown key(s) {unknown}; known: {sorted(KEYS)}")
    for k in ("model", "method"):
        if k not in raw:
            raise ConfigError(f"config: `{k}` is required")
    method = raw["method"]
    if method not in METHODS:
        raise ConfigError(f"config: unknown method {method!r}; one of {list(METHODS)}")
    fmt = raw.get("format", "weightlab")
    if fmt not in FORMATS:
        raise ConfigError(f"config: unknown format {fmt!r}; one of {list(FORMATS)}")
    if method not in FORMAT_METHODS[fmt]:
        raise ConfigError(f"config: format {fmt!r} cannot hold {method!r} results "
                          f"(it holds {sorted(FORMAT_METHODS[fmt])})")
    bits = _int(raw, "bits", 4)
    gs = _int(raw, "group_size", 128)
    sym, act_order, static = _bool(raw, "sym"), _bool(raw, "act_order"), _bool(raw, "static_groups")
    if method == "zeroquant_fp":
        if bits not in FP_BITS:
            raise ConfigError(f"config: zeroquant_fp takes bits in {sorted(FP_BITS)} (FP4 / FP6 / FP8), got {bits}")
    elif fmt == "fp8":
        if bits != 8:
            raise ConfigError(f"config: format fp8 stores 8-bit E4M3 codes, got bits {bits}")
    elif not 2 <= bits <= 8:
        raise ConfigError(f"config: bits must be in 2..8, got {bits}")
    if gs != -1 and gs < 1:
        raise ConfigError(f"config: group_size must be -1 or a positive integer, got {gs}")
    if (act_order or static) and method not in ("gptq", "rsq", "zeroquant_fp"):
        raise ConfigError(f"config: act_order / static_groups are GPTQ options; {method!r} has none")
    if fmt == "gptq" and bits not in (2, 3, 4, 8):
        raise ConfigError(f"config: GPTQ checkpoints hold 2/3/4/8-bit codes, got {bits}")
    if fmt == "awq":
        if bits != 4:
            raise ConfigError(f"config: the AutoAWQ GEMM layout holds 4-bit codes, got {bits}")
        if act_order and not static:
            raise ConfigError("config: the AutoAWQ GEMM layout has no g_idx: act_order needs static_groups")
    if fmt == "fp8":
        if method == "zeroquant_fp" and gs != -1:
            raise ConfigError("config: format fp8 holds one scale per output channel: set group_size: -1")
        if method == "zeroquant_fp" and bits != 8:
            raise ConfigError("config: format fp8 holds E4M3 codes: zeroquant_fp needs bits: 8")
    if fmt == "gptq" and not sym and "checkpoint_format" not in raw:
        raise ConfigError("config: asymmetric GPTQ export needs `checkpoint_format`: gptq_v2 (zero points as they "
                          "are; GPTQModel) or gptq (v1, z - 1: transformers / vLLM; export fails if a group's zero "
                          "point is 0, which v1 readers cannot represent)")
    cf = raw.get("checkpoint_format", "gptq")
    if cf not in ("gptq", "gptq_v2") or ("checkpoint_format" in raw and fmt != "gptq"):
        raise ConfigError(f"config: checkpoint_format is gptq | gptq_v2 and only for format gptq, got {cf!r}")
    gran = raw.get("granularity", "channel")
    if gran not in ("channel", "tensor") or ("granularity" in raw and not (fmt == "fp8" and method == "rtn")):
        raise ConfigError(f"config: granularity is channel | tensor and only for format fp8 with rtn, got {gran!r}")
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"config: `options` must be a mapping, got {options!r}")
    bad = sorted(set(options) - _method_fields(method))
    if bad:
        raise ConfigError(f"config: unknown option(s) {bad} for {method!r}; known: {sorted(_method_fields(method))}")
    model = (root / str(raw["model"])).resolve() if not Path(str(raw["model"])).is_absolute() else Path(raw["model"])
    if not (model / "config.json").is_file():
        raise ConfigError(f"config: model {model} is not a Hugging Face folder (no config.json)")
    hf_config = json.loads((model / "config.json").read_text())
    tok = raw.get("tokenizer")
    tok = model / "tokenizer.json" if tok is None else (root / str(tok)).resolve()
    calib = raw.get("calibration")
    if method != "rtn" or calib is not None:
        if not isinstance(calib, dict):
            raise ConfigError(f"config: method {method!r} needs `calibration: {{text, samples, seq_len}}`")
        bad = sorted(set(calib) - CALIB_KEYS)
        if bad or "text" not in calib:
            raise ConfigError(f"config: calibration needs `text` and takes {sorted(CALIB_KEYS)}; got {sorted(calib)}")
        calib = {"text": (root / str(calib["text"])).resolve(), "samples": _int(calib, "samples", 128),
                 "seq_len": _int(calib, "seq_len", 512), "seed": _int(calib, "seed", 0)}
        if not calib["text"].is_file():
            raise ConfigError(f"config: calibration text {calib['text']} does not exist")
        if calib["samples"] < 1 or calib["seq_len"] < 2:
            raise ConfigError(f"config: calibration needs samples >= 1 and seq_len >= 2, got {calib}")
        if not tok.is_file():
            raise ConfigError(f"config: no tokenizer at {tok} (calibration text must be tokenized)")
    cfg = QuantConfig(model, method, bits, gs, sym, act_order, static, fmt, cf, gran, tok, calib, dict(options),
                      hf_config)
    try:
        cfg.method_config()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config: invalid {method} settings: {e}") from None
    return cfg


def _check_model(cfg: QuantConfig):
    """The model, its BlockModel-free description and the block linears' specs; every shape checked."""
    from jaxmodels.io import CheckpointError
    from jaxmodels.models.pretrained import config_from_hf, model_from_config, param_specs

    try:
        mcfg = config_from_hf(cfg.hf_config, str(cfg.model / "config.json"))
    except CheckpointError as e:
        raise ConfigError(f"model: {e}") from None
    specs = param_specs(model_from_config(mcfg))
    linears = {p: s.shape for p, s in specs.items() if re.match(r"layers_\d+/", p) and p.endswith("/kernel")}
    if not linears:
        raise ConfigError(f"model {cfg.model}: no decoder-block linears found")
    if cfg.calibration is not None and cfg.calibration["seq_len"] > int(getattr(mcfg, "max_position_embeddings",
                                                                                 1 << 30)):
        raise ConfigError(f"calibration seq_len {cfg.calibration['seq_len']} exceeds the model's "
                          f"max_position_embeddings {mcfg.max_position_embeddings}")
    b = cfg.bits
    for p, (n_in, n_out) in linears.items():
        if cfg.group_size != -1 and n_in % cfg.group_size:
            raise ConfigError(f"{p}: group_size {cfg.group_size} does not divide its {n_in} input features")
        if cfg.format == "gptq":
            for what, n in (("input", n_in), ("output", n_out)):
                if (n * b) % 32 or (b == 3 and n % 32):
                    raise ConfigError(f"{p}: {n} {what} features do not pack into int32 words at {b} bits")
        if cfg.format == "awq" and n_out % 8:
            raise ConfigError(f"{p}: {n_out} output features are not a multiple of 8 (AutoAWQ GEMM)")
    return mcfg, linears


def _calibration(cfg: QuantConfig):
    if cfg.calibration is None:
        return None
    from jaxmodels.text import encode, load_tokenizer

    c = cfg.calibration
    tokens = encode(load_tokenizer(cfg.tokenizer), c["text"].read_text())
    n = c["seq_len"]
    if tokens.size < n + 1:
        raise ConfigError(f"calibration text {c['text']} has {tokens.size} tokens, fewer than seq_len + 1 = {n + 1}")
    starts = np.random.default_rng(c["seed"]).integers(0, tokens.size - n, size=c["samples"])
    ids = np.stack([tokens[s:s + n] for s in starts]).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _run_method(cfg: QuantConfig, params, bm, batch, progress):
    from quant import ptq

    mc = cfg.method_config()
    if cfg.method == "rtn" and cfg.format == "fp8":
        from quant.formats import FloatFormat

        include = "^(" + "|".join(re.escape(p) for p in bm.block_paths) + ")/.*kernel$"
        return ptq.rtn_format(params, FloatFormat("e4m3", granularity=cfg.granularity), include=include)
    fn = {"rtn": ptq.rtn, "gptq": ptq.gptq, "awq": ptq.awq, "rsq": ptq.rsq, "flexround": ptq.flexround,
          "zeroquant_fp": ptq.zeroquant_fp}[cfg.method]
    return fn(params, bm, batch, mc, progress=progress)


def _unscaled_awq_layers(params, qparams, report, bm, cfg):
    """AutoAWQ folds every scale into a previous layer and leaves a group it cannot fold unscaled (``o_proj``
    under GQA: llm-awq ``auto_scale_block`` skips it); the GEMM layout has no run-time input scale. Layers whose
    record keeps ``in_scale`` are therefore re-quantized from their float kernel on the same AWQ grid without a
    scale (``quant.ptq.awq.awq_codes``, no clip search); their ``error`` is dropped."""
    import jax.numpy as jnp

    from jaxmodels.tree import flatten, unflatten
    from quant.ptq.awq import awq_codes

    prevs = {g.prev for g in bm.awq_groups if g.prev is not None}
    flat, qflat = flatten(params), dict(flatten(qparams))
    layers = dict(report["layers"])
    for p, rec in report["layers"].items():
        if rec.get("in_scale") is None:
            continue
        if p.split("/")[-2] in prevs:
            raise ConfigError(f"{p}: keeps an AWQ input scale and receives another group's 1/s: not exportable "
                              "to AutoAWQ GEMM")
        w = jnp.asarray(flat[p], jnp.float32)  # [in, out]
        codes, scale, zero = awq_codes(w.T, cfg.bits, cfg.group_size, cfg.sym)
        n_in, n_out = w.shape
        gs = n_in if cfg.group_size == -1 else cfg.group_size
        z = jnp.full_like(scale, 2 ** (cfg.bits - 1)) if zero is None else zero
        g = codes.reshape(n_out, n_in // gs, gs).astype(jnp.float32)
        w_hat = (scale[..., None] * (g - z[..., None])).reshape(n_out, n_in).T
        layers[p] = {**rec, "weight": w_hat.astype(flat[p].dtype), "codes": codes.T, "scale": scale, "zero": zero,
                     "stored": w_hat, "in_scale": None, "error": None}
        qflat[p] = layers[p]["weight"]
    return unflatten(qflat, like=qparams), {**report, "layers": layers}


def _summary(cfg: QuantConfig, report: dict | None) -> dict:
    layers = {}
    for p, r in (report or {}).get("layers", {}).items():
        e = r.get("error")
        layers[p] = {"bits": r.get("bits"), "group_size": r.get("group_size"),
                     "error": None if e is None else float(np.asarray(e))}
    return {"method": cfg.method, "format": cfg.format, "bits": cfg.bits, "group_size": cfg.group_size,
            "sym": cfg.sym, "act_order": cfg.act_order, "static_groups": cfg.static_groups, "options": cfg.options,
            "calibration": None if cfg.calibration is None else {k: str(v) if isinstance(v, Path) else v
                                                                 for k, v in cfg.calibration.items()},
            "layers": layers}


def run_quantize(config, out: str | os.PathLike, *, dry_run: bool = False, overwrite: bool = False,
                 progress: bool | None = None, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run a quantization config; returns a summary (layers quantized, output path)."""
    cfg = config if isinstance(config, QuantConfig) else load_config(config, root)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists (pass --overwrite to replace it)")
    mcfg, linears = _check_model(cfg)
    batch = _calibration(cfg)
    summary = {"method": cfg.method, "format": cfg.format, "layers": len(linears), "out": str(out)}
    if dry_run:
        return summary

    from jaxmodels.models.pretrained import hf_name, load_pretrained
    from jaxmodels.tree import flatten
    from quant.ptq.block_models import block_model

    model, params = load_pretrained(cfg.model, progress=progress)
    bm = block_model(model)
    qparams, report = _run_method(cfg, params, bm, batch, progress)
    if cfg.method == "awq" and cfg.format == "awq":
        qparams, report = _unscaled_awq_layers(params, qparams, report, bm, cfg)
    extra = {f: cfg.model / f for f in TOKENIZER_FILES if (cfg.model / f).is_file()}
    if cfg.tokenizer.is_file():
        extra["tokenizer.json"] = cfg.tokenizer
    extra["quant_report.json"] = json.dumps(_summary(cfg, report), indent=2) + "\n"
    if cfg.format == "weightlab":
        _write_weightlab(out, cfg, qparams, report, extra, overwrite)
    else:
        from quant.serving import export_hf

        tensors = {}
        for p, leaf in flatten(qparams).items():
            name, transpose = hf_name(mcfg, p)
            a = np.asarray(leaf)
            tensors[name] = np.ascontiguousarray(a.T) if transpose else a
        names = {p: hf_name(mcfg, p)[0][: -len(".weight")] for p in report["layers"]}
        try:
            export_hf(out, tensors, report, format=cfg.format, names=names, config=cfg.hf_config,
                      checkpoint_format=cfg.checkpoint_format, overwrite=overwrite, progress=progress,
                      extra_files=extra)
        except ValueError as e:
            raise ConfigError(f"export: {e}") from e
    summary["layers"] = len(report["layers"])
    return summary


def _write_weightlab(out, cfg, qparams, report, extra, overwrite):
    import shutil

    from jaxmodels.atomic import AtomicOutput
    from quant.ptq import quantized_tree, save_quantized

    tree = quantized_tree(qparams, report)
    stage = AtomicOutput(out, overwrite=overwrite)
    try:
        stage.path.mkdir()
        save_quantized(stage.path / "model.safetensors", tree)
        hf = dict(cfg.hf_config, quantization_config={"quant_method": "weightlab", "method": cfg.method,
                                                      "bits": cfg.bits, "group_size": cfg.group_size})
        (stage.path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        for f, content in extra.items():
            if isinstance(content, str):
                (stage.path / f).write_text(content)
            else:
                shutil.copy2(content, stage.path / f)
    except BaseException:
        stage.abort()
        raise
    stage.commit()


EPILOG = """examples:
  python -m quant gptq.yaml --out llama-gptq/             # quantize, writing llama-gptq/ atomically
  python -m quant gptq.yaml --out llama-gptq/ --dry-run   # check config, model shapes and calibration only
  python -m quant awq.yaml --out llama-awq/ --overwrite --json --no-progress   # for scripts

exit codes: 0 quantized (or the dry run passed), 2 bad input (config, model folder, existing --out)"""


def main(argv: list[str] | None = None) -> int:
    """The ``python -m quant CONFIG.yaml --out DIR`` entry point (``argv``: the arguments, default ``sys.argv[1:]``):
    runs :func:`run_quantize` and returns the exit code, 0 (quantized, or the dry run passed) or 2 (bad config, model
    folder or an existing ``--out``; argparse usage errors also exit 2). ``--json`` prints the summary or the error as
    one JSON object."""
    ap = argparse.ArgumentParser(prog="python -m quant", description="Quantize a Hugging Face decoder folder with a "
                                 "PTQ method and write a serving format (atomic output).", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (model, method, bits, group_size, sym, calibration, format, ...)")
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    ap.add_argument("--dry-run", action="store_true", help="validate config, model shapes and calibration, then stop")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar (also WEIGHTLAB_NO_PROGRESS=1)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object (errors too)")
    args = ap.parse_args(argv)
    from jaxmodels.io import CheckpointError

    try:
        s = run_quantize(args.config, args.out, dry_run=args.dry_run, overwrite=args.overwrite,
                         progress=False if args.no_progress else None)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": str(e)}))
        return 2
    if args.json:
        print(json.dumps({"ok": True, "dry_run": args.dry_run, **s}, default=str))
        return 0
    verb = "would quantize" if args.dry_run else "quantized"
    print(f"{verb} {s['layers']} linears with {s['method']} -> {s['out']} ({s['format']})")
    return 0
