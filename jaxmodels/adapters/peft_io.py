"""Adapters in PEFT's files: ``adapter_model.safetensors`` + ``adapter_config.json`` (peft 0.21 layout).

Tensor names (torch layout, ``<hf>`` the Hugging Face module path, e.g. ``model.layers.0.self_attn.q_proj``)::

    base_model.model.<hf>.lora_A.weight [r, in]      = lora_Aᵀ        (Linear)
    base_model.model.<hf>.lora_B.weight [out, r]     = lora_Bᵀ
    base_model.model.<hf>.lora_magnitude_vector [out] = lora_magnitude  (DoRA)
    base_model.model.<hf>.lora_embedding_A [r, vocab] = lora_Aᵀ        (Embedding)
    base_model.model.<hf>.lora_embedding_B [d, r]     = lora_Bᵀ
    base_model.model.<hf>.lora_magnitude_vector [d]   = lora_magnitude  (DoRA on an Embedding)

so ``ΔW_torch [out, in] = s B_t A_t = (s A B)ᵀ``: the same delta in both libraries. Linen module paths map to
Hugging Face module paths by per-family rules (:data:`NAME_MAPS`: ``llama`` (Llama / Mistral / Qwen2, paths of
:mod:`jaxmodels.models.llama`) and ``bert`` (``BertModel``, paths of :mod:`jaxmodels.models.bert`)). The config
keeps PEFT's names: ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``use_dora``, ``rank_pattern``,
``alpha_pattern`` (keys matched as PEFT does: ``re.match(rf"(.*\\.)?({key})$", module)``) and ``target_modules``
(a list of suffixes, or one regex that must ``fullmatch`` the module name).

``save_adapter`` writes ``target_modules`` as one regex matching exactly the saved modules, a ``rank_pattern`` /
``alpha_pattern`` entry (the escaped full module name) for each module whose rank / alpha differs from the
config's, and both files into one directory atomically (:class:`jaxmodels.atomic.AtomicOutput`).
``load_adapter`` ignores ``<hf>.base_layer.weight`` (PEFT's copy of a whole embedding table, written with
``save_embedding_layers``) and refuses every other tensor it does not know.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxmodels.adapters.lora import LoraConfig, adapter_modules, exact_target, merge
from jaxmodels.atomic import AtomicOutput
from jaxmodels.io import CheckpointError, load_safetensors, save_safetensors
from jaxmodels.tree import unflatten

__all__ = ["NAME_MAPS", "save_adapter", "load_adapter", "merge_adapter", "conv_to_peft", "conv_from_peft",
           "hf_module_name", "linen_module_name",
           "PEFT_PREFIX", "ADAPTER_FILE", "CONFIG_FILE"]

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

# family -> (linen -> hf rules, hf -> linen rules, embedding modules (linen regex))
NAME_MAPS: dict[str, dict[str, Any]] = {
    "llama": dict(
        to_hf=[(r"^embed_tokens$", "model.embed_tokens"),
               (r"^layers_(\d+)/(self_attn|mlp)/([qkvo]_proj|gate_proj|up_proj|down_proj)$", r"model.layers.\1.\2.\3"),
               (r"^lm_head$", "lm_head")],
        to_linen=[(r"^model\.embed_tokens$", "embed_tokens"),
                  (r"^model\.layers\.(\d+)\.(self_attn|mlp)\.([qkvo]_proj|gate_proj|up_proj|down_proj)$",
                   r"layers_\1/\2/\3"),
                  (r"^lm_head$", "lm_head")],
        embed=r"^embed_tokens$"),
    "bert": dict(
        to_hf=[(r"^embeddings/(word_embeddings|position_embeddings|token_type_embeddings)$", r"embeddings.\1"),
               (r"^layer_(\d+)/attention/(query|key|value)$", r"encoder.layer.\1.attention.self.\2"),
               (r"^layer_(\d+)/attention/attention_output$", r"encoder.layer.\1.attention.output.dense"),
               (r"^layer_(\d+)/intermediate$", r"encoder.layer.\1.intermediate.dense"),
               (r"^layer_(\d+)/output$", r"encoder.layer.\1.output.dense")],
        to_linen=[(r"^(?:bert\.)?embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)$",
                   r"embeddings/\1"),
                  (r"^(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)$", r"layer_\1/attention/\2"),
                  (r"^(?:bert\.)?encoder\.layer\.(\d+)\.attention\.output\.dense$",
                   r"layer_\1/attention/attention_output"),
                  (r"^(?:bert\.)?encoder\.layer\.(\d+)\.intermediate\.dense$", r"layer_\1/intermediate"),
                  (r"^(?:bert\.)?encoder\.layer\.(\d+)\.output\.dense$", r"layer_\1/output")],
        embed=r"^embeddings/"),
    # GPT-2's Conv1D stores W [in, out] (PEFT: fan_in_fan_out=True); lora_A/lora_B keep the Linear layouts.
    "gpt2": dict(
        to_hf=[(r"^(wte|wpe)$", r"transformer.\1"),
               (r"^layers_(\d+)/(attn|mlp)/(c_attn|c_proj|c_fc)$", r"transformer.h.\1.\2.\3")],
        to_linen=[(r"^transformer\.(wte|wpe)$", r"\1"),
                  (r"^transformer\.h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)$", r"layers_\1/\2/\3")],
        embed=r"^(wte|wpe)$", fan_in_fan_out=True),
}


def _apply_rules(name: str, rules) -> str | None:
    for pat, repl in rules:
        if re.match(pat, name):
            return re.sub(pat, repl, name)
    return None


def hf_module_name(module: str, model_type: str) -> str:
    """Linen module path -> Hugging Face module path; ``ValueError`` if the family has no rule for it."""
    out = _apply_rules(module, _family(model_type)["to_hf"])
    if out is None:
        raise ValueError(f"no {model_type!r} Hugging Face name for linen module {module!r}")
    return out


def linen_module_name(hf: str, model_type: str) -> str:
    """Hugging Face module path -> linen module path (the inverse of :func:`hf_module_name`, by the family's
    ``to_linen`` rules in :data:`NAME_MAPS`), e.g. ``linen_module_name("model.layers.0.self_attn.q_proj", "llama")
    == "layers_0/self_attn/q_proj"``; ``ValueError`` if the family has no rule for it."""
    out = _apply_rules(hf, _family(model_type)["to_linen"])
    if out is None:
        raise ValueError(f"no linen path for {model_type!r} Hugging Face module {hf!r}")
    return out


def _family(model_type: str) -> dict:
    if model_type not in NAME_MAPS:
        raise ValueError(f"model_type must be one of {sorted(NAME_MAPS)}, got {model_type!r}")
    return NAME_MAPS[model_type]


def _detect(names, direction: str) -> str:
    fits = [t for t, fam in NAME_MAPS.items() if all(_apply_rules(n, fam[direction]) is not None for n in names)]
    if len(fits) != 1:
        raise ValueError(f"cannot tell the model family of modules {sorted(names)[:3]}... (matches {fits}); "
                         f"pass model_type= (one of {sorted(NAME_MAPS)})")
    return fits[0]


def _pattern_get(pattern: Mapping[str, Any], name: str, default):
    for key, v in pattern.items():  # PEFT's get_pattern_key
        if re.match(rf"(.*\.)?({key})$", name):
            return v
    return default


# ------------------------------------------------------------------------------------------------- conv layouts

def conv_to_peft(a: np.ndarray, b: np.ndarray, magnitude: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """weightlab conv adapter ``(A [kh, kw, in, r], B [r, out][, m [out]])`` -> PEFT's ``(A [r, in, kh, kw],
    B [out, r, 1, 1][, m [1, out, 1, 1]])``.

    >>> a_t, b_t = conv_to_peft(np.zeros((3, 3, 16, 4)), np.zeros((4, 32)))   # (4, 16, 3, 3), (32, 4, 1, 1)
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 4 or b.ndim != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"conv_to_peft: expected lora_A [kh, kw, in, r] and lora_B [r, out], got {a.shape} / "
                         f"{b.shape}")
    out = (np.transpose(a, (3, 2, 0, 1)), b.T[:, :, None, None])
    if magnitude is None:
        return out
    m = np.asarray(magnitude)
    if m.shape != (b.shape[1],):
        raise ValueError(f"conv_to_peft: lora_magnitude {m.shape} does not fit lora_B {b.shape}")
    return out + (m[None, :, None, None],)


def conv_from_peft(a_t: np.ndarray, b_t: np.ndarray, magnitude: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Inverse of :func:`conv_to_peft`: PEFT's ``(A [r, in, kh, kw], B [out, r, 1, 1][, m [1, out, 1, 1]])`` ->
    ``(A [kh, kw, in, r], B [r, out][, m [out]])``.

    >>> a, b = conv_from_peft(np.zeros((4, 16, 3, 3)), np.zeros((32, 4, 1, 1)))   # (3, 3, 16, 4), (4, 32)
    """
    a_t, b_t = np.asarray(a_t), np.asarray(b_t)
    if a_t.ndim != 4 or b_t.ndim != 4 or b_t.shape[2:] != (1, 1) or a_t.shape[0] != b_t.shape[1]:
        raise ValueError(f"conv_from_peft: expected lora_A [r, in, kh, kw] and lora_B [out, r, 1, 1], got "
                         f"{a_t.shape} / {b_t.shape}")
    out = (np.transpose(a_t, (2, 3, 1, 0)), b_t[:, :, 0, 0].T)
    if magnitude is None:
        return out
    m = np.asarray(magnitude)
    if m.size != b_t.shape[0]:
        raise ValueError(f"conv_from_peft: lora_magnitude_vector {m.shape} does not fit lora_B {b_t.shape}")
    return out + (m.reshape(-1),)


# ------------------------------------------------------------------------------------------------- save

def save_adapter(directory: str | os.PathLike, adapters: Any, config: LoraConfig, *, model_type: str | None = None,
                 base_model_name_or_path: str | None = None, task_type: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``adapters`` as PEFT does into ``directory`` (atomically; ``overwrite`` to replace). ``model_type``
    (a key of :data:`NAME_MAPS`) is detected from the module paths when omitted. Linear / Embedding adapters are
    written transposed (torch layout), Conv adapters (``lora_A [kh, kw, in, r]``) in PEFT's ``lora.Conv2d`` layouts
    (:func:`conv_to_peft`)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    mods = adapter_modules(adapters)
    model_type = model_type or _detect(list(mods), "to_hf")
    fam = _family(model_type)
    tensors: dict[str, np.ndarray] = {}
    hf_names, rank_pattern, alpha_pattern = [], {}, {}
    for m, ad in sorted(mods.items()):
        a, b = np.asarray(ad["lora_A"]), np.asarray(ad["lora_B"])
        mag = None if "lora_magnitude" not in ad else np.asarray(ad["lora_magnitude"])
        hf = hf_module_name(m, model_type)
        key = PEFT_PREFIX + hf
        if a.ndim == 4 and b.ndim == 2:
            conv = conv_to_peft(a, b, mag)
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = conv[:2]
            if mag is not None:
                tensors[f"{key}.lora_magnitude_vector"] = conv[2]
        elif a.ndim == 2 and b.ndim == 2:
            ka, kb = (("lora_embedding_A", "lora_embedding_B") if re.search(fam["embed"], m)
                      else ("lora_A.weight", "lora_B.weight"))
            tensors[f"{key}.{ka}"], tensors[f"{key}.{kb}"] = a.T, b.T
            if mag is not None:
                tensors[f"{key}.lora_magnitude_vector"] = mag
        else:
            raise ValueError(f"save_adapter: {m!r} has lora_A {a.shape} / lora_B {b.shape}; PEFT files hold 2-D "
                             "Linear/Embedding or 2-D-conv ([kh, kw, in, r]) adapters")
        hf_names.append(hf)
        if a.shape[-1] != config.rank:
            rank_pattern[re.escape(hf)] = int(a.shape[-1])
        if config.alpha_for(m) != float(config.alpha):
            alpha_pattern[re.escape(hf)] = config.alpha_for(m)
    if not hf_names:
        raise ValueError("save_adapter: the adapter pytree is empty")
    if any("lora_magnitude" in ad for ad in mods.values()) != bool(config.use_dora):
        raise ValueError("save_adapter: config.use_dora does not match the adapters (lora_magnitude leaves)")
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": int(config.rank), "lora_alpha": _num(config.alpha), "lora_dropout": float(config.dropout),
        "use_rslora": bool(config.use_rslora), "use_dora": bool(config.use_dora),
        "target_modules": "^(?:" + "|".join(re.escape(n) for n in hf_names) + ")$",
        "rank_pattern": rank_pattern, "alpha_pattern": {k: _num(v) for k, v in alpha_pattern.items()},
        "bias": "none", "fan_in_fan_out": bool(fam.get("fan_in_fan_out", False)), "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with AtomicOutput(directory, overwrite=overwrite) as tmp:
        tmp.mkdir()
        save_safetensors(tmp / ADAPTER_FILE, {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                         metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def _num(x):
    x = float(x)
    return int(x) if x.is_integer() else x


# ------------------------------------------------------------------------------------------------- load

_SUFFIXES = {".lora_A.weight": ("lora_A", False), ".lora_B.weight": ("lora_B", False),
             ".lora_embedding_A": ("lora_A", True), ".lora_embedding_B": ("lora_B", True),
             ".lora_magnitude_vector": ("lora_magnitude", False),
             ".lora_magnitude_vector.weight": ("lora_magnitude", False)}


def load_adapter(directory: str | os.PathLike, *, model_type: str | None = None, dtype: Any = None
                 ) -> tuple[Any, LoraConfig]:
    """Read PEFT's two files from ``directory`` -> ``(adapters, LoraConfig)``; linen paths by ``model_type``
    (detected when omitted). ``dtype``: cast the adapters (default: as stored)."""
    directory = Path(directory)
    cfg_path, st_path = directory / CONFIG_FILE, directory / ADAPTER_FILE
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise CheckpointError(f"load_adapter: {p} is missing")
    raw = json.loads(cfg_path.read_text())
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {raw.get('peft_type')!r} is not LORA")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_path}: bias={raw['bias']!r} is not supported (only 'none')")
    flat = load_safetensors(st_path)
    per_module: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in flat.items():
        if not name.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{st_path}: tensor {name!r} does not start with {PEFT_PREFIX!r}")
        rest = name[len(PEFT_PREFIX):]
        if rest.endswith(".base_layer.weight"):
            continue  # a saved copy of the base embedding table (save_embedding_layers): not an adapter
        for suf, (leaf, _) in _SUFFIXES.items():
            if rest.endswith(suf):
                per_module.setdefault(rest[: -len(suf)], {})[leaf] = np.asarray(arr)
                break
        else:
            raise CheckpointError(f"{st_path}: unknown adapter tensor {name!r}")
    if not per_module:
        raise CheckpointError(f"{st_path}: no adapter tensors")
    model_type = model_type or _detect(list(per_module), "to_linen")
    alpha, r = float(raw.get("lora_alpha", 8)), int(raw.get("r", 8))
    out, rank_pattern, alpha_pattern = {}, {}, {}
    for hf, leaves in per_module.items():
        m = linen_module_name(hf, model_type)
        if "lora_A" not in leaves or "lora_B" not in leaves:
            raise CheckpointError(f"{st_path}: module {hf!r} lacks lora_A or lora_B")
        if leaves["lora_A"].ndim == 4:
            try:
                conv = conv_from_peft(leaves["lora_A"], leaves["lora_B"], leaves.get("lora_magnitude"))
            except ValueError as e:
                raise CheckpointError(f"{st_path}: module {hf!r}: {e}") from None
            vals = dict(zip(("lora_A", "lora_B", "lora_magnitude"), conv))
        else:
            vals = {k: (v.T if k != "lora_magnitude" else v) for k, v in leaves.items()}
        for leaf, v in vals.items():
            out[f"{m}/{leaf}"] = jnp.asarray(v, dtype) if dtype is not None else jnp.asarray(v)
        rank = int(leaves["lora_A"].shape[0])
        a_m = float(_pattern_get(raw.get("alpha_pattern") or {}, hf, alpha))
        if rank != r:
            rank_pattern[f"^{re.escape(m)}$"] = rank
        if a_m != alpha:
            alpha_pattern[f"^{re.escape(m)}$"] = a_m
    config = LoraConfig(rank=r, alpha=alpha, target=exact_target({k.rsplit("/", 1)[0] for k in out}),
                        dropout=float(raw.get("lora_dropout", 0.0)), use_rslora=bool(raw.get("use_rslora", False)),
                        use_dora=bool(raw.get("use_dora", False)), rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern)
    return unflatten(out), config


def merge_adapter(params: Any, adapters: Any, config: LoraConfig) -> Any:
    """Params (e.g. from ``load_pretrained``) with the adapters merged in: :func:`jaxmodels.adapters.merge`."""
    return merge(params, adapters, config)
