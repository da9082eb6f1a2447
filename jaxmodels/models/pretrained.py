"""Hugging Face decoder folders (``config.json`` + safetensors, one file or sharded with
``model.safetensors.index.json``) to ``(model, params)`` and back.

``load_pretrained(path, dtype=None, shardings=None, mesh=None)`` dispatches on ``config["model_type"]`` (else
``architectures``): llama / mistral / qwen2 -> :class:`~jaxmodels.models.llama.Llama`, gpt2 ->
:class:`~jaxmodels.models.gpt2.GPT2`. Tensor names map mechanically (:func:`hf_name`)::

    Llama family:  model.layers.{i}.self_attn.q_proj.weight [out, in]  <->  layers_{i}/self_attn/q_proj/kernel [in, out]
                   model.embed_tokens.weight <-> embed_tokens/embedding,  *.weight of a norm <-> */scale,
                   model.norm.weight <-> norm/scale,  lm_head.weight <-> lm_head/kernel (transposed; untied only)
    GPT-2:         transformer.h.{i}.attn.c_attn.weight [in, out]  <->  layers_{i}/attn/c_attn/kernel (no transpose:
                   Conv1D), transformer.wte.weight <-> wte/embedding, transformer.ln_f.weight <-> ln_f/scale

Streaming: every tensor is memory-mapped where it lies in its file and placed straight onto its sharding with
``jax.make_array_from_callback`` (each device's shard reads only its slice; the transpose is a view), so a model
larger than one device loads without a host copy of the model. Everything is checked before any tensor is read:
unknown architecture, a missing / unexpected tensor, a shape that does not match the config -> ``CheckpointError``
naming the tensor.

``save_pretrained(path, model, params)`` writes ``config.json`` + ``model.safetensors`` (atomically, tensor by
tensor) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads (checked by
``scripts/make_hf_reference.py --check``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

from jaxmodels.io import (SAFETENSORS_DTYPES, AtomicOutput, CheckpointError, SafetensorsWriter, _data_layout,
                          safetensors_files, safetensors_specs)
from jaxmodels.models.gpt2 import GPT2, GPT2Config
from jaxmodels.models.llama import Llama, LlamaConfig
from jaxmodels.progress import progress_bar
from jaxmodels.sharding import rules_to_shardings
from jaxmodels.tree import check_compatible, flatten, unflatten

__all__ = ["load_pretrained", "save_pretrained", "config_from_hf", "model_from_config", "hf_name",
           "param_specs", "ARCHITECTURES"]

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2",
                 "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "GPT2LMHeadModel": "gpt2"}
# buffers some checkpoints carry that are not parameters
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


def config_from_hf(raw: Mapping[str, Any], where: str = "config.json") -> LlamaConfig | GPT2Config:
    """The model config for a transformers ``config.json`` dict (error naming the model type if unknown)."""
    mt = raw.get("model_type")
    if mt is None:
        archs = [a for a in raw.get("architectures") or [] if a in ARCHITECTURES]
        if not archs:
            raise CheckpointError(f"{where}: no model_type and no known architecture in {raw.get('architectures')}")
        mt = ARCHITECTURES[archs[0]]
    if mt not in ("llama", "mistral", "qwen2", "gpt2"):
        raise CheckpointError(f"{where}: unsupported model_type {mt!r} (supported: llama, mistral, qwen2, gpt2)")
    raw = {**raw, "model_type": mt}
    try:
        return GPT2Config.from_hf_dict(raw) if mt == "gpt2" else LlamaConfig.from_hf_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: {e}") from e


def model_from_config(config: LlamaConfig | GPT2Config, dtype: Any = None, param_dtype: Any = jnp.float32):
    """The linen module for a config (``dtype``: computation dtype, None = the parameters')."""
    if isinstance(config, GPT2Config):
        return GPT2(config, dtype=dtype, param_dtype=param_dtype)
    if isinstance(config, LlamaConfig):
        return Llama(config, dtype=dtype, param_dtype=param_dtype)
    raise TypeError(f"model_from_config: expected a LlamaConfig or GPT2Config, got {type(config).__name__}")


def param_specs(model) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat ``{path: ShapeDtypeStruct}`` of the model's parameters (from ``jax.eval_shape``, nothing allocated)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return flatten(shapes)


def hf_name(config: LlamaConfig | GPT2Config, path: str) -> tuple[str, bool]:
    """``(Hugging Face tensor name, transposed)`` of a flax parameter path (module docstring)."""
    parts = path.split("/")
    leaf = parts[-1]
    m = re.fullmatch(r"layers_(\d+)", parts[0])
    mods = ([("h" if isinstance(config, GPT2Config) else "layers"), m.group(1)] if m else [parts[0]]) + parts[1:-1]
    transpose = False
    if leaf == "kernel":
        transpose = not isinstance(config, GPT2Config)
        leaf = "weight"
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    name = ".".join(mods + [leaf])
    if isinstance(config, GPT2Config):
        return "transformer." + name, False
    return (name if parts[0] == "lm_head" else "model." + name), transpose


def _read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"{path}: no config.json (a Hugging Face model folder is expected)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from e


def _resolve_shardings(shardings, specs: dict[str, jax.ShapeDtypeStruct], mesh) -> dict[str, Sharding]:
    if shardings is None:
        dev = SingleDeviceSharding(jax.devices()[0])
        return {k: dev for k in specs}
    if isinstance(shardings, Sharding):
        return {k: shardings for k in specs}
    if isinstance(shardings, (list, tuple)) and all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str)
                                                    for r in shardings):
        if mesh is None:
            raise ValueError("load_pretrained: sharding rules need a mesh= (e.g. jaxmodels.make_mesh(model=2))")
        return flatten(rules_to_shardings(unflatten(specs), shardings, mesh))
    flat = flatten(shardings)  # a nested pytree or a flat {path: sharding} dict
    missing = [k for k in specs if k not in flat]
    if missing:
        raise ValueError(f"load_pretrained: shardings has no entry for parameter {missing[0]!r}")
    return {k: flat[k] for k in specs}


def _mapped_reader(file: Path, layout: tuple[int, dict], name: str):
    start, header = layout
    spec = header[name]
    dt = SAFETENSORS_DTYPES[spec["dtype"]]
    shape = tuple(spec["shape"])
    b, e = spec["data_offsets"]
    if e - b == 0:
        return np.zeros(shape, dt)
    return np.memmap(file, dtype=dt, mode="r", offset=start + b, shape=shape)


def load_pretrained(path: str | os.PathLike, dtype: Any = None, shardings: Any = None, mesh: Any = None,
                    progress: bool | None = None):
    """``(model, params)`` from a Hugging Face folder (module docstring).

    ``dtype``: cast floating tensors to it (e.g. ``jnp.bfloat16``); None keeps the checkpoint's dtype. The model
    computes in the parameters' dtype and returns float32 logits.
    ``shardings``: None (default device), one ``Sharding`` for every tensor, a pytree / flat dict of shardings
    keyed like the params, or sharding rules (e.g. ``LLAMA_RULES_TP``) with ``mesh``. Each tensor is placed onto
    its sharding as it is read.
    """
    path = Path(path)
    if dtype is not None and not jnp.issubdtype(np.dtype(dtype), jnp.floating):
        raise ValueError(f"load_pretrained: dtype must be a floating dtype (e.g. jnp.bfloat16), got {dtype}")
    if mesh is not None and shardings is None:
        raise ValueError("load_pretrained: mesh= is used with sharding rules (shardings=LLAMA_RULES_TP, ...); "
                         "pass shardings too")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a Hugging Face model folder is expected)")
    config = config_from_hf(_read_config(path), str(path / "config.json"))
    model = model_from_config(config)
    expected = param_specs(model)
    names = {hf_name(config, p)[0]: p for p in expected}
    files = safetensors_files(path)
    specs = safetensors_specs(path)  # validates every file (header, offsets, size)
    tied = isinstance(config, GPT2Config) or config.tie_word_embeddings
    plan: dict[str, tuple[str, bool]] = {}
    for tensor in specs:
        key = tensor
        if isinstance(config, GPT2Config) and key not in names and "transformer." + key in names:
            key = "transformer." + key
        if key in names:
            plan[names[key]] = (tensor, hf_name(config, names[key])[1])
        elif _IGNORED.search(tensor) or (tied and tensor == "lm_head.weight"):
            continue
        else:
            raise CheckpointError(f"{path}: unexpected tensor {tensor!r} (not a parameter of {type(model).__name__} "
                                  f"with this config.json)")
    for p in expected:
        if p not in plan:
            raise CheckpointError(f"{path}: missing tensor {hf_name(config, p)[0]!r} (for parameter {p!r})")
    for p, (tensor, transpose) in plan.items():
        shape = specs[tensor].shape[::-1] if transpose else specs[tensor].shape
        if tuple(shape) != tuple(expected[p].shape):
            raise CheckpointError(f"{path}: tensor {tensor!r} has shape {tuple(specs[tensor].shape)}, config.json "
                                  f"implies {tuple(expected[p].shape[::-1] if transpose else expected[p].shape)}")
        if not (jnp.issubdtype(specs[tensor].dtype, jnp.floating)):
            raise CheckpointError(f"{path}: tensor {tensor!r} has dtype {specs[tensor].dtype}, expected floating point")
    placed = _resolve_shardings(shardings, expected, mesh)
    layouts: dict[Path, tuple[int, dict]] = {}
    out = {}
    for p in progress_bar(list(expected), progress, desc="load", unit="tensor"):
        tensor, transpose = plan[p]
        f = files[tensor]
        if f not in layouts:
            layouts[f] = _data_layout(f)
        src = _mapped_reader(f, layouts[f], tensor)
        if transpose:
            src = src.T
        target = np.dtype(dtype) if dtype is not None else src.dtype

        def shard(index, src=src, target=target):
            # a fresh copy of this device's slice only (never an alias of the read-only file mapping)
            return np.array(src[index], dtype=target, order="C", copy=True)

        out[p] = jax.make_array_from_callback(tuple(expected[p].shape), placed[p], shard)
        del src
    params = unflatten(out)
    return model, params


def save_pretrained(path: str | os.PathLike, model, params: Any, overwrite: bool = False,
                    progress: bool | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (Hugging Face names and layouts) into the folder ``path``,
    atomically (:class:`~jaxmodels.atomic.AtomicOutput`; ``overwrite=True`` replaces an existing folder).

    Params must match the model's parameter tree (shapes and paths; any float dtype, all the same); tensors are
    fetched from the devices one at a time. Tied heads are not written (transformers re-ties them).
    """
    config = model.config
    if not isinstance(config, (LlamaConfig, GPT2Config)):
        raise TypeError(f"save_pretrained: expected a Llama or GPT2 model, got {type(model).__name__}")
    expected = param_specs(model)
    flat = flatten(params)
    try:
        check_compatible(expected, flat, names=["model", "params"], check_dtype=False)
    except ValueError as e:
        raise ValueError(f"save_pretrained: {e}") from e
    dtypes = {np.dtype(v.dtype) for v in flat.values()}
    if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
        raise ValueError(f"save_pretrained: params must share one floating dtype, got {sorted(map(str, dtypes))}")
    dt = next(iter(dtypes))
    specs, where = {}, {}
    for p, leaf in flat.items():
        name, transpose = hf_name(config, p)
        shape = tuple(np.shape(leaf))[::-1] if transpose else tuple(np.shape(leaf))
        specs[name] = jax.ShapeDtypeStruct(shape, dt)
        where[name] = (p, transpose)
    raw = config.to_hf_dict()
    raw["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(dt.name, dt.name)
    raw["torch_dtype"] = raw["dtype"]
    try:
        out = AtomicOutput(path, overwrite=overwrite)
    except FileExistsError:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)") from None
    with out as staged:
        staged.mkdir()
        (staged / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        with SafetensorsWriter(staged / "model.safetensors", specs, metadata={"format": "pt"}) as w:
            for name in progress_bar(list(specs), progress, desc="save", unit="tensor"):
                p, transpose = where[name]
                arr = np.asarray(jax.device_get(flat[p]))
                w.write(name, np.ascontiguousarray(arr.T) if transpose else arr)
    return Path(path)
