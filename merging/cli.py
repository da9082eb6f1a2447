"""``python -m merging CONFIG.yaml --out DIR``: run a mergekit-style YAML config, streaming tensor by tensor.

Config (mergekit's schema, the ``models:`` form)::

    merge_method: ties
    base_model: /ckpt/base                  # .safetensors file, safetensors folder (sharded index ok), or orbax dir
    models:
      - model: /ckpt/math
        parameters: {weight: 1.0, density: 0.5}
      - model: /ckpt/code
        parameters:
          weight: [{filter: mlp, value: 0.3}, {value: 0.7}]   # per-tensor overrides: first matching filter wins
          density: 0.5
    parameters: {normalize: true, int8_mask: true}             # method-wide parameters (and per-model defaults)
    dtype: float32                          # compute/load dtype of the inputs (default: the base model's)
    out_dtype: bfloat16                     # optional output dtype (default: dtype)
    random_seed: 0                          # for dare_*/della* (or --random-seed)

A parameter value is a scalar, a list of ``{filter, value}`` conditions (``filter`` is a substring of the tensor
name, as mergekit; ``*`` or no filter matches everything), or a gradient (a list of numbers interpolated over the
layer index found in the tensor name, ``...layers.<i>...``). Per-model ``parameters`` take precedence over the
method-wide ``parameters``.

Guarantees:
- Streaming: for safetensors inputs the tensors of all models are read, merged and written one at a time, so peak
  memory is about (number of models + a few) x the largest tensor, not the model size.
- Validation before any work: unknown method/parameter, missing tensors, mismatched shapes and every
  hyper-parameter (density in (0, 1], ...) are checked for every tensor from headers alone; ``--dry-run`` stops
  there. NaN/Inf in an input tensor aborts the merge.
- Atomic output: everything is written into a staging directory next to ``--out`` that is put in place only after
  the last tensor (:class:`jaxmodels.io.AtomicOutput`); on any error nothing is left at ``--out``. With
  ``--overwrite`` a crash at any moment leaves ``--out`` holding the complete old or the complete new merge
  (``renameat2(RENAME_EXCHANGE)``, or a two-rename scheme that the next run repairs), never nothing.
- ``--shard``: each tensor is placed on a mesh over all devices (first divisible axis sharded) before merging;
  results are identical to one device.

The config schema, its validation and the per-tensor parameter resolution live in :mod:`merging.cli_config`
(every name is importable from here too); this module opens the checkpoints and runs the merge.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import merging  # noqa: F401  (registers every method)
from jaxmodels import io as jio
from jaxmodels.tree import flatten
from jaxmodels.progress import progress_bar

from merging.cli_config import (  # noqa: F401  (the config schema; every name stays importable from here)
    DTYPES, IGNORED_KEYS, MERGEKIT_PER_MODEL, MERGEKIT_REQUIRED_SHARED, REQUIRED, TOP_LEVEL_KEYS, ConfigError,
    MergeConfig, evaluate_setting, layer_index, load_config, resolve_params,
)

__all__ = ["MergeConfig", "load_config", "run_merge", "main", "ConfigError"]

# -----------------------------------------------------------------------------------------------------------------
# checkpoints

def _resolve(cfg: MergeConfig, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else cfg.root / path


def is_orbax(path: Path) -> bool:
    return path.is_dir() and not list(path.glob("*.safetensors")) and not (path / jio.INDEX_NAME).exists()


@dataclasses.dataclass
class Source:
    label: str
    path: Path
    kind: str  # "safetensors" | "orbax"
    specs: dict[str, jax.ShapeDtypeStruct]
    tree: Any = None  # orbax: restored flat dict

    def iter(self, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        if self.kind == "safetensors":
            return jio.iter_safetensors(self.path, names)
        return ((n, np.asarray(self.tree[n])) for n in names)


def open_source(label: str, path: Path) -> Source:
    if not path.exists():
        raise ConfigError(f"model {label!r}: {path} does not exist")
    try:
        if is_orbax(path):
            flat = flatten(jio.restore_checkpoint(path))
            specs = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in flat.items()}
            return Source(label, path, "orbax", specs, flat)
        return Source(label, path, "safetensors", jio.safetensors_specs(path))
    except jio.CheckpointError as e:
        raise ConfigError(f"model {label!r}: {e}") from e


def check_sources(ref: Source, others: list[Source]) -> None:
    """Every input has exactly ``ref``'s tensor names and shapes (checked from headers, before any work)."""
    for s in others:
        missing = [n for n in ref.specs if n not in s.specs]
        if missing:
            raise ConfigError(f"model {s.label!r} is missing tensor {missing[0]!r} (present in {ref.label!r})")
        extra = [n for n in s.specs if n not in ref.specs]
        if extra:
            raise ConfigError(f"model {s.label!r} has tensor {extra[0]!r} that {ref.label!r} does not have")
        for n, sp in ref.specs.items():
            if tuple(s.specs[n].shape) != tuple(sp.shape):
                raise ConfigError(f"tensor {n!r}: shape {tuple(s.specs[n].shape)} in {s.label!r} vs "
                                  f"{tuple(sp.shape)} in {ref.label!r}")


def _shard_spec(shape: tuple[int, ...], n: int):
    from jax.sharding import PartitionSpec as P

    for ax, d in enumerate(shape):
        if d % n == 0 and d >= n:
            return P(*([None] * ax + ["data"]))
    return P()


# -----------------------------------------------------------------------------------------------------------------
# the merge

def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def _low_memory_allocator():
    """glibc: serve blocks >= 256 KiB with mmap so a freed tensor goes straight back to the OS (by default glibc
    raises this threshold up to 32 MiB after frees and keeps freed multi-MB blocks, so the resident set would hold
    several tensors' worth of garbage). Process-wide; no-op off glibc."""
    if _libc():
        _libc().mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD


def _malloc_trim():
    """Hand freed heap memory back to the OS after each tensor (no-op off glibc)."""
    if _libc():
        _libc().malloc_trim(0)


_LIBC = None


def _call(cfg: MergeConfig, name: str, base, xs, kwargs, key):
    kw = dict(kwargs)
    if cfg.method.stochastic:
        kw["key"] = key
    b = None if base is None else {name: base}
    return cfg.method.fn(b, [{name: x} for x in xs], **kw)[name]


def validate_all(cfg: MergeConfig, ref: Source, num_layers: int, key) -> dict[str, dict[str, Any]]:
    """Resolve and check the hyper-parameters of every tensor by tracing the method on abstract inputs
    (``jax.eval_shape``: runs all of the method's validation, computes nothing)."""
    per_tensor = {}
    checked: dict[tuple, None] = {}
    for name, spec in ref.specs.items():
        kwargs = resolve_params(cfg, name, num_layers)
        per_tensor[name] = kwargs
        sig = (tuple(spec.shape), repr(sorted(kwargs.items())))
        if sig in checked:
            continue
        checked[sig] = None
        dt = cfg.dtype or spec.dtype
        if not np.issubdtype(np.dtype(dt), np.floating) and np.dtype(dt) != np.dtype(jnp.bfloat16):
            raise ConfigError(f"tensor {name!r}: dtype {np.dtype(dt)} cannot be merged (needs floating point)")
        abstract = jax.ShapeDtypeStruct(tuple(spec.shape), dt)
        try:
            jax.eval_shape(lambda b, xs: _call(cfg, name, b, xs, kwargs, key),
                           abstract if cfg.base_model is not None else None, [abstract] * len(cfg.models))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"tensor {name!r}: {e}") from None
    return per_tensor


def run_merge(config: str | os.PathLike | dict | MergeConfig, out: str | os.PathLike, *, dry_run: bool = False,
              progress: bool | None = None, shard: bool = False, random_seed: int | None = None,
              overwrite: bool = False, root: str | os.PathLike | None = None,
              low_memory: bool = True) -> dict[str, Any]:
    """Run a merge config; returns a summary dict (tensors, bytes read/written, output path).

    ``low_memory``: return each tensor's memory to the OS as soon as it is written (see
    :func:`_low_memory_allocator`), so the resident set stays at the tensors in flight."""
    cfg = config if isinstance(config, MergeConfig) else load_config(config, root)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists (pass --overwrite to replace it)")
    labels = ([cfg.base_model] if cfg.base_model is not None else []) + cfg.models
    sources = [open_source(lbl, _resolve(cfg, lbl)) for lbl in labels]
    kinds = {s.kind for s in sources}
    if len(kinds) > 1:
        raise ConfigError(f"all inputs must have one format, got {sorted(kinds)}")
    ref = sources[0]
    check_sources(ref, sources[1:])
    names = list(ref.specs)
    layers = [li for li in (layer_index(n) for n in names) if li is not None]
    num_layers = max(layers) + 1 if layers else 0
    seed = random_seed if random_seed is not None else (cfg.random_seed if cfg.random_seed is not None else 0)
    key = jax.random.key(seed)
    per_tensor = validate_all(cfg, ref, num_layers, key)
    out_dtypes = {n: np.dtype(cfg.out_dtype or cfg.dtype or ref.specs[n].dtype) for n in names}
    summary = {"tensors": len(names), "method": cfg.method.name, "out": str(out), "seed": seed,
               "bytes_read": sum(int(np.prod(s.specs[n].shape)) * np.dtype(s.specs[n].dtype).itemsize
                                 for s in sources for n in names),
               "bytes_written": sum(int(np.prod(ref.specs[n].shape)) * out_dtypes[n].itemsize for n in names)}
    if dry_run:
        return summary

    if low_memory:
        _low_memory_allocator()
    mesh = None
    if shard:
        from jaxmodels.sharding import make_mesh

        mesh = make_mesh()
    try:
        stage = jio.AtomicOutput(out, overwrite=overwrite)  # also repairs what a crashed earlier run left
    except FileExistsError:
        raise ConfigError(f"{out} already exists (pass --overwrite to replace it)") from None
    tmp = stage.path
    try:
        if ref.kind == "safetensors":
            tmp.mkdir()
            files = jio.safetensors_files(ref.path)
            sharded = ref.path.is_dir() and (ref.path / jio.INDEX_NAME).exists()
            file_of = {n: (files[n].name if sharded else "model.safetensors") for n in names}
            specs_by_file: dict[str, dict[str, Any]] = {}
            for n in names:
                specs_by_file.setdefault(file_of[n], {})[n] = jax.ShapeDtypeStruct(ref.specs[n].shape, out_dtypes[n])
            writers = {f: jio.SafetensorsWriter(tmp / f, sp, metadata={"format": "pt", "merge_method": cfg.method.name})
                       for f, sp in specs_by_file.items()}
            sink = lambda n, arr: writers[file_of[n]].write(n, arr)
        else:
            merged_flat: dict[str, Any] = {}
            sink = lambda n, arr: merged_flat.__setitem__(n, arr)
        iters = [s.iter(names) for s in sources]
        for name in progress_bar(names, progress, desc=f"merge ({cfg.method.name})", unit="tensor", leave=True,
                                 file=sys.stderr):
            arrays = []
            for s, it in zip(sources, iters):
                n2, arr = next(it)
                assert n2 == name
                if not np.all(np.isfinite(np.asarray(arr, np.float32) if arr.dtype == jnp.bfloat16 else arr)):
                    raise ConfigError(f"tensor {name!r} of model {s.label!r} contains NaN or Inf")
                if cfg.dtype is not None and arr.dtype != cfg.dtype:
                    arr = arr.astype(cfg.dtype)
                if mesh is not None:
                    from jax.sharding import NamedSharding

                    arr = jax.device_put(arr, NamedSharding(mesh, _shard_spec(arr.shape, mesh.size)))
                arrays.append(arr)
            base = arrays[0] if cfg.base_model is not None else None
            xs = arrays[1:] if cfg.base_model is not None else arrays
            merged = _call(cfg, name, base, xs, per_tensor[name], key)
            merged = np.asarray(jax.device_get(merged)).astype(out_dtypes[name])
            del arrays, base, xs
            sink(name, merged)
            del merged
            if low_memory:
                _malloc_trim()
        if ref.kind == "safetensors":
            for w in writers.values():
                w.close()
            if sharded:
                index = json.loads((ref.path / jio.INDEX_NAME).read_text())
                index["weight_map"] = {n: file_of[n] for n in names}
                index.setdefault("metadata", {})["total_size"] = summary["bytes_written"]
                (tmp / jio.INDEX_NAME).write_text(json.dumps(index, indent=2))
            if ref.path.is_dir():  # carry config/tokenizer files of the reference model, as mergekit does
                for f in ref.path.iterdir():
                    if f.is_file() and f.suffix in (".json", ".txt", ".model") and f.name != jio.INDEX_NAME:
                        shutil.copy2(f, tmp / f.name)
        else:
            from jaxmodels.tree import unflatten

            jio.save_checkpoint(tmp, unflatten(merged_flat))
        stage.commit()
    except BaseException:
        if "writers" in locals():
            for w in writers.values():
                w.abort()
        stage.abort()
        raise
    return summary


EPILOG = """examples:
  python -m merging ties.yaml --out merged/              # merge, writing merged/ atomically
  python -m merging ties.yaml --out merged/ --dry-run    # check config, tensors and shapes only
  python -m merging ties.yaml --out merged/ --overwrite --json --no-progress   # for scripts

exit codes: 0 merged (or the dry run passed), 2 bad input (config, checkpoints, existing --out)"""


def main(argv: list[str] | None = None) -> int:
    """The ``python -m merging CONFIG.yaml --out DIR`` entry point (``argv``: the arguments, default ``sys.argv[1:]``):
    runs :func:`run_merge` and returns the exit code, 0 (merged, or the dry run passed) or 2 (bad config, checkpoints
    or an existing ``--out``; argparse usage errors also exit 2). ``--json`` prints the summary or the error as one
    JSON object."""
    ap = argparse.ArgumentParser(prog="python -m merging", description="Merge checkpoints with a mergekit-style "
                                 "YAML config (streaming, atomic output).", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (merge_method, base_model, models, parameters, dtype)")
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    ap.add_argument("--dry-run", action="store_true", help="validate config, tensors and shapes, then stop")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar (also WEIGHTLAB_NO_PROGRESS=1)")
    ap.add_argument("--shard", action="store_true", help="merge each tensor sharded over all devices")
    ap.add_argument("--random-seed", type=int, default=None, help="seed for stochastic methods (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object (errors too)")
    args = ap.parse_args(argv)
    try:
        s = run_merge(args.config, args.out, dry_run=args.dry_run, progress=not args.no_progress, shard=args.shard,
                      random_seed=args.random_seed, overwrite=args.overwrite)
    except (ConfigError, jio.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": str(e)}))
        return 2
    if args.json:
        print(json.dumps({"ok": True, "dry_run": args.dry_run, **s}, default=str))
        return 0
    verb = "would merge" if args.dry_run else "merged"
    print(f"{verb} {s['tensors']} tensors with {s['method']} -> {s['out']} "
          f"({s['bytes_read'] / 1e6:.1f} MB read, {s['bytes_written'] / 1e6:.1f} MB written)")
    return 0
