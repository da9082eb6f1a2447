"""Checkpoint I/O: orbax-checkpoint for pytrees (restored straight into a target sharding) and ``.safetensors``
(bf16 included) to and from path-keyed dicts or pytrees.

Guarantees:
- Writes are atomic: data goes to a temporary name in the destination directory and is renamed into place only when
  complete and fsynced (the directory is fsynced after the rename), so a crash never leaves a half-written file.
- Overwrites are atomic too (``save_checkpoint(overwrite=True)``, the merging CLI's ``--overwrite``): one
  :class:`AtomicOutput` stages the new tree and swaps it in with ``renameat2(RENAME_EXCHANGE)`` where the OS has it,
  else with a two-rename scheme whose every crash state the next writer repairs; see :mod:`jaxmodels.atomic`.
- Reading a truncated or corrupt file raises :class:`CheckpointError` naming the file.
- Safetensors can be read one tensor at a time (:func:`iter_safetensors`, :func:`safetensors_specs`) and written one
  tensor at a time (:class:`SafetensorsWriter`), so checkpoints larger than memory can be streamed.
- Sharded Hugging Face folders (``model.safetensors.index.json``) are read through the same functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxmodels.atomic import AtomicOutput, atomic_replace, fsync_dir, recover_output
from jaxmodels.tree import flatten, unflatten

PyTree = Any

__all__ = [
    "CheckpointError",
    "atomic_path",
    "AtomicOutput",
    "atomic_replace",
    "recover_output",
    "save_checkpoint",
    "restore_checkpoint",
    "save_safetensors",
    "load_safetensors",
    "iter_safetensors",
    "safetensors_specs",
    "safetensors_files",
    "SafetensorsWriter",
    "SAFETENSORS_DTYPES",
]


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, truncated, corrupt or does not match what was asked."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block finishes without error.

    The temp file lives in the same directory, so ``os.replace`` is an atomic rename on POSIX; the file is fsynced
    before the rename and the directory after it. For directories, or to replace an existing output, see
    :class:`AtomicOutput`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------------------------------------------
# orbax


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_checkpoint(path: str | os.PathLike, tree: PyTree, overwrite: bool = False) -> Path:
    """Save a pytree of arrays with orbax (sharded arrays are written by every host's shards).

    The checkpoint is written into a staging directory next to ``path`` and put in place by
    :class:`AtomicOutput`: with ``overwrite=True`` a crash at any moment leaves ``path`` holding the complete old
    or the complete new checkpoint (never nothing), and leftovers of an earlier crash are cleaned first.
    With several JAX processes every host must write into the same directory, which orbax coordinates; there
    the checkpoint is written straight to a new ``path`` (orbax's own tmp-then-rename) and ``overwrite`` is refused.
    """
    path = Path(path).absolute()

    def write(target):
        ckptr = _checkpointer()
        try:
            ckptr.save(target, tree)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()

    if jax.process_count() > 1:
        if os.path.lexists(path):
            raise CheckpointError(f"{path}: checkpoint already exists" + (
                "; atomic overwrite needs a single process (save to a new path)" if overwrite else
                " (pass overwrite=True to replace it)"))
        write(path)
        return path
    try:
        out = AtomicOutput(path, overwrite=overwrite)
    except FileExistsError:
        raise CheckpointError(f"{path}: checkpoint already exists (pass overwrite=True to replace it)") from None
    with out as staged:
        write(staged)
    return path


def restore_checkpoint(path: str | os.PathLike, target: PyTree | None = None, shardings: PyTree | None = None) -> PyTree:
    """Restore an orbax checkpoint.

    ``target``: a pytree of arrays or ``jax.ShapeDtypeStruct`` giving structure, shapes and dtypes (checked).
    ``shardings``: a pytree of ``jax.sharding.Sharding`` (e.g. from :func:`jaxmodels.sharding.rules_to_shardings`);
    arrays are restored directly into that sharding, never materialized on one device first.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    ckptr = _checkpointer()
    try:
        if target is None and shardings is None:
            return ckptr.restore(path)
        if target is None:
            meta = ckptr.metadata(path)
            tree_meta = getattr(meta, "item_metadata", meta)
            tree_meta = getattr(tree_meta, "tree", tree_meta)
            target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree_meta)
        if shardings is not None:
            abstract = jax.tree_util.tree_map(
                lambda t, s: jax.ShapeDtypeStruct(np.shape(t), t.dtype, sharding=s), target, shardings)
        else:
            abstract = jax.tree_util.tree_map(lambda t: jax.ShapeDtypeStruct(np.shape(t), t.dtype), target)
        return ckptr.restore(path, abstract)
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types for corrupt / mismatched checkpoints
        raise CheckpointError(f"{path}: cannot restore checkpoint: {type(e).__name__}: {e}") from e
    finally:
        ckptr.close()


# ----------------------------------------------------------------------------------------------------------------
# safetensors

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_TO_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


def _st_dtype(dtype: Any) -> str:
    dt = np.dtype(dtype)
    if dt not in _DTYPE_TO_ST:
        raise CheckpointError(f"dtype {dt} cannot be stored in safetensors")
    return _DTYPE_TO_ST[dt]


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))  # tobytes() writes C order whatever the strides


def safetensors_files(path: str | os.PathLike) -> dict[str, Path]:
    """Map tensor name -> file for a ``.safetensors`` file or a folder (sharded with an index, or one file)."""
    path = Path(path)
    if path.is_dir():
        index = path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            return {name: path / fname for name, fname in weight_map.items()}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: folder holds no .safetensors file and no {INDEX_NAME}")
        out: dict[str, Path] = {}
        for f in files:
            for name in safetensors_specs(f):
                out[name] = f
        return out
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    return {name: path for name in safetensors_specs(path)}


@contextlib.contextmanager
def _open(path: Path):
    """``safetensors.safe_open`` (memory-mapped, lazy) with library errors turned into a CheckpointError naming
    the file. The flax backend is used because the numpy backend cannot read BF16."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    try:
        handle = safe_open(str(path), framework="flax")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file: {e}") from e
    with handle as h:
        yield h


def safetensors_specs(path: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """Names, shapes and dtypes of a safetensors file or folder, reading only headers."""
    path = Path(path)
    if path.is_dir():
        out = {}
        by_file: dict[Path, list[str]] = {}
        for name, f in safetensors_files(path).items():
            by_file.setdefault(f, []).append(name)
        for f, names in by_file.items():
            specs = safetensors_specs(f)
            for name in names:
                if name not in specs:
                    raise CheckpointError(f"{f}: index lists {name!r} but the file does not contain it")
                out[name] = specs[name]
        return out
    out = {}
    with _open(path) as h:
        for name in h.keys():
            sl = h.get_slice(name)
            st = sl.get_dtype()
            if st not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {st}")
            out[name] = jax.ShapeDtypeStruct(tuple(sl.get_shape()), SAFETENSORS_DTYPES[st])
    return out


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    with _open(Path(path)) as h:
        return dict(h.metadata() or {})


def _data_layout(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset where tensor data starts, raw JSON header) of a file already validated by :func:`_open`."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def _pread_exact(fd: int, nbytes: int, offset: int, path: Path, name: str) -> bytearray:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            raise CheckpointError(f"{path}: truncated while reading tensor {name!r}")
        got += k
    return buf


def iter_safetensors(
    path: str | os.PathLike, names: list[str] | None = None, as_numpy: bool = True
) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, array)`` one tensor at a time (file order, or ``names`` order).

    Each file is validated by ``safetensors.safe_open`` first; each tensor is then read with ``pread`` into a fresh
    buffer, so memory holds one tensor at a time (a memory map would keep every touched page resident until the
    file is closed, which defeats streaming a checkpoint larger than memory).
    Arrays are NumPy (bf16 as ``ml_dtypes.bfloat16``) by default, or ``jax.Array`` with ``as_numpy=False``.
    """
    files = safetensors_files(path)
    order = list(files) if names is None else list(names)
    for name in order:
        if name not in files:
            raise CheckpointError(f"{path}: no tensor named {name!r}")
    layouts: dict[Path, tuple[int, dict[str, Any]]] = {}
    fds: dict[Path, int] = {}
    try:
        for name in order:
            f = files[name]
            if f not in layouts:
                with _open(f):  # the library's validation: header, offsets, file size
                    pass
                layouts[f] = _data_layout(f)
                fds[f] = os.open(f, os.O_RDONLY)
            start, header = layouts[f]
            if name not in header:
                raise CheckpointError(f"{f}: index lists {name!r} but the file does not contain it")
            spec = header[name]
            b, e = spec["data_offsets"]
            buf = _pread_exact(fds[f], e - b, start + b, f, name)
            arr = np.frombuffer(buf, dtype=SAFETENSORS_DTYPES[spec["dtype"]]).reshape(spec["shape"])
            yield name, (arr if as_numpy else jnp.asarray(arr))
    finally:
        for fd in fds.values():
            os.close(fd)


def load_safetensors(
    path: str | os.PathLike,
    like: PyTree | None = None,
    names: list[str] | None = None,
    as_numpy: bool = False,
    nested: bool = False,
) -> Any:
    """Read a safetensors file or folder.

    Returns a flat ``{name: array}`` dict; with ``like`` (a template pytree whose flattened paths are the tensor
    names) the tree is rebuilt with that structure and shapes/dtypes are checked; with ``nested=True`` nested dicts
    are built by splitting names on "/".
    """
    flat = dict(iter_safetensors(path, names=names, as_numpy=as_numpy))
    if like is not None:
        tmpl = flatten(like)
        for name, leaf in tmpl.items():
            if name in flat and (np.shape(leaf) != flat[name].shape or np.dtype(leaf.dtype) != flat[name].dtype):
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape={flat[name].shape} dtype={flat[name].dtype}, template wants "
                    f"shape={tuple(np.shape(leaf))} dtype={np.dtype(leaf.dtype)}")
        try:
            return unflatten(flat, like=like)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    if nested:
        return unflatten(flat)
    return flat


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time (for outputs larger than memory).

    The ``safetensors`` package only serializes a whole dict held in memory, so this writer lays out the documented
    format itself (8-byte little-endian header length, JSON header, 8-byte aligned, then the raw data);
    files it writes are read back by ``safetensors.safe_open`` in the tests.

    The header needs every tensor's shape and dtype up front (``specs``: name -> ShapeDtypeStruct / array), then
    :meth:`write` is called once per tensor in any order; tensors are placed at their header offsets. The file
    appears at ``path`` only after :meth:`close` succeeds with every tensor written (atomic rename); on error or
    if a tensor is missing the temporary file is removed and nothing is left at ``path``.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, Any], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._specs = {}
        for name, s in specs.items():
            shape = tuple(int(d) for d in np.shape(s))
            dtype = np.dtype(s.dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _st_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._specs[name] = (shape, dtype, offset)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._fh.truncate(self._data_start + offset)

    def write(self, name: str, array: Any) -> None:
        if name not in self._specs:
            self.abort()
            raise CheckpointError(f"{self.path}: tensor {name!r} was not declared in the header")
        shape, dtype, off = self._specs[name]
        arr = _to_numpy(array)
        if arr.shape != shape or arr.dtype != dtype:
            self.abort()
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is shape={arr.shape} dtype={arr.dtype}, declared shape={shape} dtype={dtype}")
        self._fh.seek(self._data_start + off)
        self._fh.write(arr.tobytes())
        self._written.add(name)

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self._tmp.exists():
            self._tmp.unlink()

    def close(self) -> Path:
        missing = [n for n in self._specs if n not in self._written]
        if missing:
            self.abort()
            raise CheckpointError(f"{self.path}: tensor {missing[0]!r} was never written; nothing saved")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return False
        self.close()
        return False


def save_safetensors(path: str | os.PathLike, tree: PyTree, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a pytree (or a flat ``{name: array}`` dict) to one ``.safetensors`` file, atomically.

    Names are the "/"-joined pytree paths (a flat dict's keys are used as they are).
    """
    flat = flatten(tree)
    for name, leaf in flat.items():
        if not hasattr(leaf, "dtype"):
            raise CheckpointError(f"{path}: leaf {name!r} is a {type(leaf).__name__}, not an array")
    with SafetensorsWriter(path, flat, metadata) as w:
        for name, leaf in flat.items():
            w.write(name, leaf)
    return Path(path)
