"""Export PTQ results as a packed checkpoint and load it back for dequantize-on-the-fly inference.

Every PTQ result of :mod:`quant.ptq` exports: :func:`quantized_tree` reads only the per-layer records of the report
(the report schema of :mod:`quant.ptq`: each record names its own ``format``, ``bits``, ``group_size`` and
``sym``, so no global config is needed) and packs the method's own ``codes``, never re-encodes its weights:

* ``format="int"`` (RTN, GPTQ, AWQ, RSQ, FlexRound, mixed precision): a :class:`quant.qarray.QuantizedArray` of
  :class:`quant.formats.IntFormat` ``(bits, symmetric=sym, granularity="group", group_size)`` — b-bit codes packed
  into bytes, group scales, uint8 zero points (asymmetric only; ``sym``: W = s (c − 2^(b−1)));
* an FP name (``"e2m1"``, ... : ZeroQuant-FP): a :class:`quant.formats.FloatFormat` QuantizedArray (codes are the
  format's bit patterns, W = s · decode(c));
* ``"codebook"``: the record's packed :class:`quant.ptq.codebook.CodebookWeight`;
* a record with ``packed`` (:func:`quant.ptq.rtn.rtn_format`: any :mod:`quant.formats` format): that array.

plus what the method needs at run time, applied in this order by :meth:`QuantizedLinear.dequantize`:

* ``in_perm`` (GPTQ act-order without static groups): the groups are contiguous in the processing order, so the
  rows are stored permuted and un-permuted after dequantization: W = W_stored[argsort(perm)];
* ``in_scale`` (AWQ, when 1/s cannot be folded): W = diag(1/s)·W_stored;
* ``rotation_seed`` (RSQ): W = R·W_stored with R = ``random_hadamard(n, seed)``;
* ``lorc_u`` / ``lorc_v`` (LoRC with its base ``report``): W = W + Q(Û) Q(V̂)ᵀ, the factors as QuantizedArrays.

With ``scale_dtype=jnp.float32`` the loaded weights equal the method's weights bit for bit (the product of the
Hadamard rotation and of the LoRC factors up to float32 rounding of the matmul); the default float16 scales (and
AWQ input scales) change each weight by a relative 2^-11 at most, the codes not at all.

``materialize(tree)`` turns the loaded tree back into float params; called inside ``jax.jit`` it dequantizes on the
fly, so only the packed tree lives in memory between calls.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.io import load_safetensors, safetensors_metadata, save_safetensors
from jaxmodels.tree import flatten, unflatten
from quant import formats as _formats
from quant.formats import FLOAT_SPECS, FloatFormat, IntFormat
from quant.packing import pack_bits
from quant.qarray import QuantizedArray, dequantize

__all__ = ["pack_layer", "quantized_tree", "save_quantized", "load_quantized", "materialize", "QuantizedLinear",
           "record_format", "packed_bytes", "packed_nbytes", "needs_perm"]


@jax.tree_util.register_pytree_with_keys_class
class QuantizedLinear:
    """A packed kernel and its run-time transforms (``in_perm`` / ``in_scale`` / ``rotation_seed`` / LoRC factors
    ``lorc_u`` ``[m, r]``, ``lorc_v`` ``[n, r]``, QuantizedArrays)."""

    _OPTIONAL = ("in_perm", "in_scale", "lorc_u", "lorc_v")

    def __init__(self, q: QuantizedArray, in_perm=None, in_scale=None, rotation_seed: int | None = None,
                 lorc_u=None, lorc_v=None):
        self.q, self.in_perm, self.in_scale, self.rotation_seed = q, in_perm, in_scale, rotation_seed
        self.lorc_u, self.lorc_v = lorc_u, lorc_v

    def tree_flatten_with_keys(self):
        K = jax.tree_util.GetAttrKey
        ch = [(K("q"), self.q)]
        names = []
        for n in self._OPTIONAL:
            if getattr(self, n) is not None:
                ch.append((K(n), getattr(self, n)))
                names.append(n)
        return ch, (tuple(names), self.rotation_seed)

    @classmethod
    def tree_unflatten(cls, aux, children):
        names, seed = aux
        kw = dict(zip(names, children[1:]))
        return cls(children[0], rotation_seed=seed, **kw)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(l.shape)) * np.dtype(l.dtype).itemsize for l in jax.tree_util.tree_leaves(self))

    def dequantize(self, dtype=jnp.float32):
        w = _dequant_base(self.q)
        if self.in_perm is not None:
            w = w[jnp.argsort(self.in_perm)]
        if self.in_scale is not None:
            w = w / self.in_scale.astype(w.dtype)[:, None]
        if self.rotation_seed is not None:
            from .rsq import random_hadamard

            w = jnp.asarray(random_hadamard(w.shape[0], self.rotation_seed), w.dtype) @ w
        if self.lorc_u is not None:
            w = w + (dequantize(self.lorc_u, jnp.float32) @ dequantize(self.lorc_v, jnp.float32).T).reshape(w.shape)
        return w.astype(dtype)


def _dequant_base(q):
    if isinstance(q, QuantizedArray):
        return dequantize(q, jnp.float32)
    return q.dequantize(jnp.float32)  # CodebookWeight


def record_format(rec: dict):
    """The :mod:`quant.formats` format of a per-layer record's codes (``format`` / ``bits`` / ``group_size`` /
    ``sym``; groups along the input axis of the ``[in, out]`` kernel). ValueError when the record lacks them."""
    missing = [k for k in ("format", "bits", "group_size") if k not in rec]
    if missing:
        raise ValueError(f"layer record has no {missing}: not a quant.ptq per-layer record (see quant.ptq.export)")
    name = rec["format"]
    n_in = int(np.shape(rec["weight"])[0])
    gs = n_in if rec["group_size"] in (-1, None) else int(rec["group_size"])
    if name == "int":
        return IntFormat(int(rec["bits"]), symmetric=bool(rec.get("sym", False)), granularity="group",
                         group_size=gs)
    if isinstance(name, str) and name in FLOAT_SPECS:
        return FloatFormat(name, granularity="group", group_size=gs)
    raise ValueError(f"layer record format {name!r} has no integer / FP code layout (codebook and rtn_format "
                     "records carry their own 'packed' array)")


def _check_same(got, want, what):
    want = jnp.asarray(want, jnp.float32)
    if got.shape != want.shape:
        raise ValueError(f"pack_layer: {what} shape {got.shape} != the record's {want.shape}")
    err = float(jnp.max(jnp.abs(got - want))) if got.size else 0.0
    tol = 1e-6 * max(float(jnp.max(jnp.abs(want))) if want.size else 0.0, 1e-30)
    if not err <= tol:
        raise ValueError(f"pack_layer: the record's codes and scales do not reproduce its {what} "
                         f"(max |diff| {err:.3g})")


def pack_layer(rec: dict, scale_dtype=jnp.float16) -> QuantizedLinear:
    """Pack one per-layer record of a PTQ report (see the module docstring) into a :class:`QuantizedLinear`: the
    record's ``codes`` ``[in, out]`` (original input order) with ``scale``/``zero`` ``[out, G]``, ``g_idx``,
    ``perm``, ``in_scale``, ``rotation_seed``, ``lorc``; a record with ``packed`` keeps that array. Checks (before
    returning) that the packed codes dequantize to the record's ``stored`` (or ``weight``) kernel."""
    if "packed" in rec and rec["packed"] is not None:
        q = rec["packed"]
    else:
        fmt = record_format(rec)
        codes = np.asarray(rec["codes"])
        n_in, n_out = codes.shape
        gs = fmt.group_size
        if n_in % gs:
            raise ValueError(f"pack_layer: {n_in} input features are not divisible by group_size {gs}")
        g_idx = np.asarray(rec.get("g_idx", np.arange(n_in) // gs))
        in_perm = None
        if not np.array_equal(g_idx, np.arange(n_in) // gs):
            perm = rec.get("perm")
            if perm is None or not np.array_equal(g_idx[np.asarray(perm)], np.arange(n_in) // gs):
                raise ValueError("pack_layer: groups are contiguous neither in the original nor in the processing "
                                 "order")
            codes = codes[np.asarray(perm)]
            in_perm = np.asarray(perm)
        if codes.max(initial=0) >= 2 ** fmt.bits:
            raise ValueError(f"pack_layer: codes exceed {fmt.bits} bits")
        scale = jnp.asarray(rec["scale"], jnp.float32).T  # [G, out]
        zero = None
        if isinstance(fmt, IntFormat) and not fmt.symmetric:
            zero = jnp.asarray(rec["zero"], jnp.float32).T.astype(jnp.uint8)
        dtype = np.dtype(jnp.asarray(rec["weight"]).dtype)
        q = QuantizedArray(pack_bits(jnp.asarray(codes, jnp.uint8), int(fmt.bits)), scale, zero, fmt, codes.shape,
                           dtype)
        stored = dequantize(q, jnp.float32)
        if in_perm is not None:
            stored = stored[np.argsort(in_perm)]
        _check_same(stored, rec.get("stored", rec["weight"]), "stored kernel")
        q = QuantizedArray(q.packed, scale.astype(scale_dtype), zero, fmt, q.shape, q.dtype)
        rec_perm = None if in_perm is None else jnp.asarray(in_perm, jnp.int16 if n_in < 32768 else jnp.int32)
        in_scale = rec.get("in_scale")
        lin = QuantizedLinear(q, rec_perm, None if in_scale is None else jnp.asarray(in_scale, scale_dtype),
                              rec.get("rotation_seed"))
        return _with_lorc(lin, rec)
    return _with_lorc(QuantizedLinear(q), rec) if "lorc" in rec else q


def _with_lorc(lin: QuantizedLinear, rec: dict):
    lr = rec.get("lorc")
    if lr is None:
        return lin
    if lr.get("U_packed") is None:
        raise ValueError("pack_layer: LoRC factors kept in float (factor_format=None) are not exportable; "
                         "use a quant.formats factor_format")
    lin.lorc_u, lin.lorc_v = lr["U_packed"], lr["V_packed"]
    return lin


def packed_bytes(shape: tuple[int, int], bits: int, group_size: int, perm: bool = False, sym: bool = False) -> int:
    """Bytes of one ``[in, out]`` integer kernel as :func:`pack_layer` stores it (float16 scales): the codes packed
    by :func:`quant.packing.pack_bits` (shape from ``jax.eval_shape``, nothing is computed), one float16 scale and
    (asymmetric only) one uint8 zero point per (group of ``group_size`` inputs, output), and the int16/int32
    act-order permutation when ``perm``."""
    n_in, n_out = shape
    gs = n_in if group_size == -1 else group_size
    packed = jax.eval_shape(lambda c: pack_bits(c, int(bits)), jax.ShapeDtypeStruct(tuple(shape), jnp.uint8))
    n_groups = (n_in // gs) * n_out
    nb = int(np.prod(packed.shape)) * packed.dtype.itemsize + n_groups * 2 + (0 if sym else n_groups)
    return int(nb + (n_in * (2 if n_in < 32768 else 4) if perm else 0))


def needs_perm(rec: dict) -> bool:
    """Whether :func:`pack_layer` stores an input permutation for the record (act-order with dynamic groups)."""
    n_in = len(rec["g_idx"])
    gs = n_in if rec["group_size"] in (-1, None) else rec["group_size"]
    return not np.array_equal(np.asarray(rec["g_idx"]), np.arange(n_in) // gs)


def packed_nbytes(tree, paths) -> int:
    """Stored bytes of the packed leaves at ``paths`` ("a/b/kernel") of a :func:`quantized_tree` tree."""
    total = 0
    for p in paths:
        node = tree
        for k in p.split("/"):
            node = node[k]
        if not _is_packed(node):
            raise ValueError(f"{p} is not a packed leaf")
        total += node.nbytes
    return total


def quantized_tree(params, report: dict, scale_dtype=jnp.float16):
    """``params`` with every layer of ``report["layers"]`` replaced by its packed form (:class:`QuantizedLinear`,
    or the record's own ``packed`` :class:`quant.qarray.QuantizedArray` / codebook weight); works on the report of
    every PTQ method of :mod:`quant.ptq` (each record names its own format, bits and group size)."""
    if not isinstance(report, dict) or not isinstance(report.get("layers"), dict):
        raise ValueError("report must be a quant.ptq report with a 'layers' dict")
    if report.get("method") == "lorc" and report.get("base") is None and report["layers"]:
        raise ValueError("a LoRC report made without the base method's report cannot be exported: "
                         "call lorc(params_float, params_quant, rank, report=base_report)")
    flat = dict(flatten(params))
    for p, rec in report["layers"].items():
        if p not in flat:
            raise ValueError(f"report layer {p!r} is not a leaf of params")
    for p, rec in report["layers"].items():
        flat[p] = pack_layer(rec, scale_dtype)
    return unflatten(flat)  # nested dicts with packed leaves


def _is_packed(l) -> bool:
    from .codebook import CodebookWeight

    return isinstance(l, (QuantizedLinear, QuantizedArray, CodebookWeight))


def materialize(tree, dtype=jnp.float32):
    """Float params from a tree holding :class:`QuantizedLinear` / QuantizedArray / codebook leaves (jit-able:
    dequantize on the fly)."""
    def f(l):
        if isinstance(l, QuantizedLinear):
            return l.dequantize(dtype)
        if isinstance(l, QuantizedArray):
            return dequantize(l, dtype)
        if _is_packed(l):
            return l.dequantize(dtype)
        return l

    return jax.tree_util.tree_map(f, tree, is_leaf=_is_packed)


# ------------------------------------------------------------------------------------------------ safetensors I/O

def _fmt_json(fmt) -> dict:
    return {"type": type(fmt).__name__,
            **{f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt) if f.init}}


def _fmt_from_json(d: dict):
    d = dict(d)
    cls = getattr(_formats, d.pop("type"))
    return cls(**d)


def _qa_meta(q: QuantizedArray) -> dict:
    return {"fmt": _fmt_json(q.fmt), "shape": list(q.shape), "dtype": np.dtype(q.dtype).name,
            "zero": q.zero is not None}


def _put_qa(arrays, p, q: QuantizedArray):
    arrays[p + "/packed"] = q.packed
    arrays[p + "/scale"] = q.scale
    if q.zero is not None:
        arrays[p + "/zero"] = q.zero


def _get_qa(flat, used, p, m) -> QuantizedArray:
    names = ["packed", "scale"] + (["zero"] if m["zero"] else [])
    used |= {f"{p}/{n}" for n in names}
    zero = jnp.asarray(flat[p + "/zero"]) if m["zero"] else None
    return QuantizedArray(jnp.asarray(flat[p + "/packed"]), jnp.asarray(flat[p + "/scale"]), zero,
                          _fmt_from_json(m["fmt"]), tuple(m["shape"]), np.dtype(m["dtype"]))


def save_quantized(path: str | os.PathLike, tree) -> int:
    """Write the tree to one safetensors file (formats and transforms in its metadata); returns the file size."""
    from jaxmodels.tree import path_to_str

    from .codebook import CodebookWeight

    arrays, meta = {}, {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_packed)[0]:
        p = path_to_str(kp)
        if isinstance(leaf, QuantizedLinear):
            m = {"kind": "linear", "rotation_seed": leaf.rotation_seed}
            if isinstance(leaf.q, CodebookWeight):
                m["base"] = _put_codebook(arrays, p + "/q", leaf.q)
            else:
                _put_qa(arrays, p + "/q", leaf.q)
                m["base"] = {"kind": "qarray", **_qa_meta(leaf.q)}
            for n in ("in_perm", "in_scale"):
                if getattr(leaf, n) is not None:
                    arrays[f"{p}/{n}"] = getattr(leaf, n)
            if leaf.lorc_u is not None:
                for n in ("lorc_u", "lorc_v"):
                    _put_qa(arrays, f"{p}/{n}", getattr(leaf, n))
                    m[n] = _qa_meta(getattr(leaf, n))
            meta[p] = m
        elif isinstance(leaf, QuantizedArray):
            _put_qa(arrays, p, leaf)
            meta[p] = {"kind": "qarray", **_qa_meta(leaf)}
        elif isinstance(leaf, CodebookWeight):
            meta[p] = _put_codebook(arrays, p, leaf)
        else:
            arrays[p] = leaf
    save_safetensors(path, arrays, metadata={"weightlab_ptq": json.dumps(meta)})
    return os.path.getsize(path)


def _put_codebook(arrays, p, cw) -> dict:
    for i, a in enumerate(cw.packed):
        arrays[f"{p}/packed{i}"] = a
    arrays[p + "/codebooks"] = cw.codebooks
    return {"kind": "codebook", "n_packed": len(cw.packed), "shape": list(cw.shape), "dim": cw.dim,
            "index_bits": cw.index_bits, "group_rows": cw.group_rows, "group_cols": cw.group_cols,
            "dtype": cw.dtype.name}


def _get_codebook(flat, used, p, m):
    from .codebook import CodebookWeight

    names = [f"packed{i}" for i in range(m["n_packed"])] + ["codebooks"]
    used |= {f"{p}/{n}" for n in names}
    return CodebookWeight(tuple(jnp.asarray(flat[f"{p}/packed{i}"]) for i in range(m["n_packed"])),
                          jnp.asarray(flat[p + "/codebooks"]), tuple(m["shape"]), m["dim"], m["index_bits"],
                          m["group_rows"], m["group_cols"], m["dtype"])


def load_quantized(path: str | os.PathLike):
    """Inverse of :func:`save_quantized`: a nested dict with the packed leaves it wrote."""
    meta = json.loads(safetensors_metadata(path)["weightlab_ptq"])
    flat = dict(load_safetensors(path))
    out, used = {}, set()
    for p, m in meta.items():
        kind = m.get("kind")
        if kind == "qarray":
            out[p] = _get_qa(flat, used, p, m)
        elif kind == "codebook":
            out[p] = _get_codebook(flat, used, p, m)
        elif kind == "linear":
            b = m["base"]
            q = _get_codebook(flat, used, p + "/q", b) if b["kind"] == "codebook" else _get_qa(flat, used, p + "/q", b)
            extra = {n: jnp.asarray(flat[f"{p}/{n}"]) for n in ("in_perm", "in_scale") if f"{p}/{n}" in flat}
            used |= {f"{p}/{n}" for n in extra}
            for n in ("lorc_u", "lorc_v"):
                if n in m:
                    extra[n] = _get_qa(flat, used, f"{p}/{n}", m[n])
            out[p] = QuantizedLinear(q, rotation_seed=m["rotation_seed"], **extra)
        else:
            raise ValueError(f"{path}: unknown packed entry {p!r} ({kind!r}); written by an older weightlab?")
    for p, v in flat.items():
        if p not in used:
            out[p] = jnp.asarray(v)
    return unflatten(out)
