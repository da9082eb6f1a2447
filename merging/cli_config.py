"""The config half of ``python -m merging`` (:mod:`merging.cli`): mergekit's YAML schema, its validation and the
per-tensor resolution of every parameter (filters, gradients over the layer index, mergekit's per-model defaults).
Split out of :mod:`merging.cli`, which runs the merge and re-exports every name defined here."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

import merging  # noqa: F401  (registers every method)
from merging import registry

__all__ = ["MergeConfig", "ConfigError", "load_config", "layer_index", "evaluate_setting", "resolve_params",
           "DTYPES", "MERGEKIT_PER_MODEL", "MERGEKIT_REQUIRED_SHARED", "REQUIRED"]

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16, "fp32": np.float32,
          "fp16": np.float16, "bf16": jnp.bfloat16, "float64": np.float64}
TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "random_seed",
                  "tokenizer_source", "tokenizer", "chat_template", "name"}
IGNORED_KEYS = {"tokenizer_source", "tokenizer", "chat_template", "name"}


class ConfigError(ValueError):
    """The merge config or its inputs are invalid (raised before anything is written)."""


@dataclasses.dataclass
class MergeConfig:
    """A parsed, validated merge config (:func:`load_config`): the registered ``method``, ``base_model`` (None for
    methods without a base), the non-base ``models`` in config order, their per-model ``model_params`` settings, the
    method-wide ``params`` settings, ``dtype`` (None: the base model's), ``out_dtype`` (None: ``dtype``),
    ``random_seed`` and the ``root`` that relative model paths resolve against."""

    method: registry.MergeMethod
    base_model: str | None
    models: list[str]                    # the non-base inputs, in config order
    model_params: list[dict[str, Any]]   # per-model parameter settings
    params: dict[str, Any]               # method-wide parameter settings
    dtype: Any | None
    out_dtype: Any | None
    random_seed: int | None
    root: Path


def _dtype(name: Any, what: str) -> Any:
    if name is None:
        return None
    if str(name) not in DTYPES:
        raise ConfigError(f"{what}: unknown dtype {name!r}; one of {sorted(DTYPES)}")
    return np.dtype(DTYPES[str(name)])


def load_config(path_or_dict: str | os.PathLike | dict, root: str | os.PathLike | None = None) -> MergeConfig:
    """Parse and validate a mergekit-style config (YAML file or dict). Model paths are relative to the config."""
    import yaml

    if isinstance(path_or_dict, dict):
        raw, root = path_or_dict, Path(root or ".")
    else:
        p = Path(path_or_dict)
        if not p.exists():
            raise ConfigError(f"{p}: no such config file")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        root = Path(root) if root is not None else p.parent
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping with at least `merge_method` and `models`")
    if "slices" in raw or "modules" in raw:
        raise ConfigError("config: `slices`/`modules` (layer surgery) are not supported; use the `models:` form")
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"config: unknown key(s) {unknown}; known: {sorted(TOP_LEVEL_KEYS)}")
    if "merge_method" not in raw:
        raise ConfigError("config: `merge_method` is required")
    try:
        method = registry.get(str(raw["merge_method"]))
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    entries = raw.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise ConfigError("config: `models` must be a non-empty list of {model: PATH, parameters: {...}}")
    base = raw.get("base_model")
    names, mparams = [], []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"model": e}
        if not isinstance(e, dict) or "model" not in e:
            raise ConfigError(f"config: models[{i}] must be a mapping with a `model` key, got {e!r}")
        extra = set(e) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"config: models[{i}] has unknown key(s) {sorted(extra)}")
        names.append(str(e["model"]))
        mparams.append(dict(e.get("parameters") or {}))
    params = dict(raw.get("parameters") or {})
    if method.needs_base is True and base is None:
        raise ConfigError(f"config: merge_method {method.name!r} needs `base_model`")
    if method.needs_base is False and base is not None and base not in names:
        base = None  # mergekit ignores an unused base for methods without one
    if base is not None and method.needs_base is not False:
        keep = [(n, p) for n, p in zip(names, mparams) if n != base]
        names, mparams = [n for n, _ in keep], [p for _, p in keep]
    elif method.needs_base is False:
        base = None
    known = set(method.params)
    for where, ps in [("parameters", params)] + [(f"models[{names[i]!r}].parameters", p) for i, p in
                                                  enumerate(mparams)]:
        bad = sorted(set(ps) - known)
        if bad:
            raise ConfigError(f"config: {where}: unknown parameter(s) {bad} for {method.name!r}; "
                              f"known: {sorted(known)}")
    for i, p in enumerate(mparams):
        bad = sorted(k for k in p if k not in method.per_model)
        if bad:
            raise ConfigError(f"config: models[{names[i]!r}].parameters: {bad} is method-wide for {method.name!r}; "
                              "put it under the top-level `parameters`")
    if not names:
        raise ConfigError("config: no models to merge besides the base model")
    seed = raw.get("random_seed")
    return MergeConfig(method, base, names, mparams, params, _dtype(raw.get("dtype"), "dtype"),
                       _dtype(raw.get("out_dtype"), "out_dtype"), None if seed is None else int(seed), Path(root))


# -----------------------------------------------------------------------------------------------------------------
# parameter resolution (mergekit's evaluate_setting)

_LAYER_RE = re.compile(r"(?:^|[./])(?:layers?|h|blocks?|block)[./_](\d+)(?:[./]|$)")


def layer_index(name: str) -> int | None:
    """The layer index in a tensor name, or None: the first number after ``layer``/``layers``/``h``/``block``/``blocks``
    between separators (``.``, ``/``, ``_``), e.g. ``"model.layers.3.mlp.up_proj.weight" -> 3``,
    ``"transformer.h.11.attn.c_attn.weight" -> 11``, ``"block_2/conv1/kernel" -> 2``, ``"lm_head.weight" -> None``.
    The position at which a gradient setting is interpolated."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def evaluate_setting(name: str, setting: Any, t: float) -> Any:
    """Resolve a parameter setting for tensor ``name`` at layer fraction ``t`` (scalars, filter lists, gradients)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
                raise ConfigError(f"parameter condition must be {{filter: STR, value: X}}, got {cond!r}")
            f = cond.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate_setting(name, cond["value"], t)
        return None
    raise ConfigError(f"unexpected parameter setting {setting!r}")


# mergekit 0.1.5's parameter schema (``ParameterSpec``s of merge_methods/generalized_task_arithmetic.py, linear.py,
# nuslerp.py, slerp.py) for the methods weightlab shares with it: a per-model parameter that a model does not set
# (neither in its own ``parameters`` nor method-wide) takes the spec's default, and a REQUIRED one is a ConfigError.
REQUIRED = "<required>"
_GTA = {"weight": REQUIRED, "density": 1.0}
MERGEKIT_PER_MODEL: dict[str, dict[str, Any]] = {
    "linear": {"weight": REQUIRED}, "nuslerp": {"weight": REQUIRED},
    "task_arithmetic": _GTA, "ties": _GTA, "dare_linear": _GTA, "dare_ties": _GTA,
    "breadcrumbs": {**_GTA, "gamma": 0.01}, "breadcrumbs_ties": {**_GTA, "gamma": 0.01},
    "della": {**_GTA, "epsilon": 0.15}, "della_linear": {**_GTA, "epsilon": 0.15},
}
MERGEKIT_REQUIRED_SHARED: dict[str, tuple[str, ...]] = {"slerp": ("t",)}


def resolve_params(cfg: MergeConfig, name: str, num_layers: int) -> dict[str, Any]:
    """Function keyword arguments for tensor ``name``: method defaults < method-wide < per-model settings.

    Per-model parameters follow mergekit's schema (:data:`MERGEKIT_PER_MODEL`): a model without a setting gets
    mergekit's default (density 1.0, gamma 0.01, epsilon 0.15) and a required one (``weight``) missing for any
    model is a ConfigError. Methods mergekit does not have: a per-model parameter is set for every model or none
    (then the function's default)."""
    li = layer_index(name)
    t = 0.0 if li is None or num_layers <= 1 else li / (num_layers - 1)
    method = cfg.method
    kwargs: dict[str, Any] = {}
    for k in MERGEKIT_REQUIRED_SHARED.get(method.name, ()):
        if (evaluate_setting(name, cfg.params[k], t) if k in cfg.params else None) is None:
            raise ConfigError(f"tensor {name!r}: parameter {k!r} is required by {method.name!r} (as in mergekit)")
    for k, default in method.defaults.items():
        v = evaluate_setting(name, cfg.params[k], t) if k in cfg.params else None
        kwargs[k] = default if v is None else v
    schema = MERGEKIT_PER_MODEL.get(method.name)
    for k in method.per_model:
        glob = evaluate_setting(name, cfg.params[k], t) if k in cfg.params else None
        vals = []
        for mp in cfg.model_params:
            v = evaluate_setting(name, mp[k], t) if k in mp else None
            vals.append(glob if v is None else v)
        if schema is not None and k in schema:
            if schema[k] is REQUIRED and any(v is None for v in vals):
                missing = cfg.models[vals.index(None)]
                raise ConfigError(f"tensor {name!r}: parameter {k!r} is required by {method.name!r} (as in mergekit) "
                                  f"and not set for model {missing!r}")
            vals = [schema[k] if v is None else v for v in vals]
        if all(v is None for v in vals):
            continue  # function default
        if any(v is None for v in vals):
            missing = cfg.models[vals.index(None)]
            raise ConfigError(f"tensor {name!r}: parameter {k!r} is not set for model {missing!r}")
        kwargs[k] = vals
    return registry.python_kwargs(kwargs)
