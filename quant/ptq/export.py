"""Export PTQ results as a packed checkpoint and load it back for dequantize-on-the-fly inference.

Every quantized kernel is stored as a :class:`quant.qarray.QuantizedArray` (b-bit codes packed into bytes, float16
group scales, uint8 zero points; asymmetric integer format, groups of ``group_size`` input features) plus what the
method needs at run time:

* ``in_perm`` (GPTQ act-order without static groups): the groups are contiguous in the processing order, so the
  rows are stored permuted and un-permuted after dequantization: W = W_stored[argsort(perm)];
* ``in_scale`` (AWQ, when 1/s cannot be folded): W = diag(1/s)·W_stored;
* ``rotation_seed`` (RSQ): W = R·W_stored with R = ``random_hadamard(n, seed)``.

``materialize(tree)`` turns the loaded tree back into float params; called inside ``jax.jit`` it dequantizes on the
fly, so only the packed tree lives in memory between calls.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.io import load_safetensors, safetensors_metadata, save_safetensors
from jaxmodels.tree import flatten, unflatten
from quant.formats import IntFormat, QParams
from quant.qarray import QuantizedArray, dequantize, quantize

__all__ = ["pack_layer", "quantized_tree", "save_quantized", "load_quantized", "materialize", "QuantizedLinear"]


@jax.tree_util.register_pytree_with_keys_class
class QuantizedLinear:
    """A packed kernel and its run-time input transform (``in_perm`` / ``in_scale`` / ``rotation_seed``)."""

    def __init__(self, q: QuantizedArray, in_perm=None, in_scale=None, rotation_seed: int | None = None):
        self.q, self.in_perm, self.in_scale, self.rotation_seed = q, in_perm, in_scale, rotation_seed

    def tree_flatten_with_keys(self):
        K = jax.tree_util.GetAttrKey
        ch = [(K("q"), self.q)]
        names = []
        for n in ("in_perm", "in_scale"):
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
        w = dequantize(self.q, dtype)
        if self.in_perm is not None:
            w = w[jnp.argsort(self.in_perm)]
        if self.in_scale is not None:
            w = w / self.in_scale.astype(w.dtype)[:, None]
        if self.rotation_seed is not None:
            from .rsq import random_hadamard

            w = jnp.asarray(random_hadamard(w.shape[0], self.rotation_seed), w.dtype) @ w
        return w


def pack_layer(rec: dict, bits: int, group_size: int, scale_dtype=jnp.float16) -> QuantizedLinear:
    """Pack one layer of a PTQ report (``stored`` kernel ``[in, out]`` on its grid ``scale``/``zero`` ``[out, G]``,
    ``g_idx``, ``perm``, ``in_scale``, ``rotation_seed``) into a :class:`QuantizedLinear`."""
    w = jnp.asarray(rec.get("stored", rec["weight"]), jnp.float32)
    n_in, n_out = w.shape
    gs = n_in if group_size == -1 else group_size
    perm = rec.get("perm")
    g_idx = np.asarray(rec.get("g_idx", np.arange(n_in) // gs))
    in_perm = None
    if not np.array_equal(g_idx, np.arange(n_in) // gs):
        if perm is None or not np.array_equal(g_idx[perm], np.arange(n_in) // gs):
            raise ValueError("pack_layer: groups are contiguous neither in the original nor in the processing order")
        w = w[np.asarray(perm)]
        in_perm = jnp.asarray(perm, jnp.int16 if n_in < 32768 else jnp.int32)
    fmt = IntFormat(bits, symmetric=False, granularity="group", group_size=gs)
    qp = QParams(jnp.asarray(rec["scale"], jnp.float32).T, jnp.asarray(rec["zero"], jnp.float32).T)  # [G, out]
    qa = quantize(w, fmt, qp, scale_dtype=jnp.float32)
    # the stored weight lies on its grid: re-encoding must reproduce it exactly
    back = dequantize(qa, jnp.float32)
    tol = 1e-4 * float(jnp.max(qp.scale))
    if float(jnp.max(jnp.abs(back - w))) > tol:
        raise ValueError("pack_layer: the stored kernel is not on the reported grid")
    qa = QuantizedArray(qa.packed, qa.scale.astype(scale_dtype), qa.zero, qa.fmt, qa.shape, qa.dtype)
    in_scale = rec.get("in_scale")
    return QuantizedLinear(qa, in_perm, None if in_scale is None else jnp.asarray(in_scale, jnp.float16),
                           rec.get("rotation_seed"))


def quantized_tree(params, report: dict):
    """``params`` with every layer of ``report["layers"]`` replaced by its :class:`QuantizedLinear`."""
    cfg = report.get("config", {})
    bits = cfg.get("bits") or cfg.get("gptq", {}).get("bits")
    gs = cfg.get("group_size") or cfg.get("gptq", {}).get("group_size")
    flat = dict(flatten(params))
    for p, rec in report["layers"].items():
        flat[p] = pack_layer(rec, rec.get("bits", bits), gs)  # mixed precision: bits per layer
    return unflatten(flat)  # nested dicts with QuantizedLinear leaves


def materialize(tree, dtype=jnp.float32):
    """Float params from a tree holding :class:`QuantizedLinear` leaves (jit-able: dequantize on the fly)."""
    return jax.tree_util.tree_map(lambda l: l.dequantize(dtype) if isinstance(l, QuantizedLinear) else l, tree,
                                  is_leaf=lambda l: isinstance(l, QuantizedLinear))


def save_quantized(path: str | os.PathLike, tree) -> int:
    """Write the tree to one safetensors file (formats and transforms in its metadata); returns the file size."""
    arrays, meta = {}, {}
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda l: isinstance(l, QuantizedLinear))[0]
    from jaxmodels.tree import path_to_str

    for kp, leaf in leaves:
        p = path_to_str(kp)
        if isinstance(leaf, QuantizedLinear):
            q = leaf.q
            arrays[p + "/packed"] = q.packed
            arrays[p + "/scale"] = q.scale
            arrays[p + "/zero"] = q.zero
            if leaf.in_perm is not None:
                arrays[p + "/in_perm"] = leaf.in_perm
            if leaf.in_scale is not None:
                arrays[p + "/in_scale"] = leaf.in_scale
            meta[p] = {"bits": q.fmt.bits, "group_size": q.fmt.group_size, "shape": list(q.shape),
                       "dtype": np.dtype(q.dtype).name, "rotation_seed": leaf.rotation_seed}
        else:
            arrays[p] = leaf
    save_safetensors(path, arrays, metadata={"weightlab_ptq": json.dumps(meta)})
    return os.path.getsize(path)


def load_quantized(path: str | os.PathLike):
    """Inverse of :func:`save_quantized`: a nested dict with :class:`QuantizedLinear` leaves."""
    meta = json.loads(safetensors_metadata(path)["weightlab_ptq"])
    flat = dict(load_safetensors(path))
    out = {}
    used = set()
    for p, m in meta.items():
        fmt = IntFormat(m["bits"], symmetric=False, granularity="group", group_size=m["group_size"])
        qa = QuantizedArray(jnp.asarray(flat[p + "/packed"]), jnp.asarray(flat[p + "/scale"]),
                            jnp.asarray(flat[p + "/zero"]), fmt, tuple(m["shape"]), np.dtype(m["dtype"]))
        extra = {n: jnp.asarray(flat[f"{p}/{n}"]) for n in ("in_perm", "in_scale") if f"{p}/{n}" in flat}
        out[p] = QuantizedLinear(qa, rotation_seed=m["rotation_seed"], **extra)
        used |= {p + "/" + n for n in ("packed", "scale", "zero", "in_perm", "in_scale")}
    for p, v in flat.items():
        if p not in used:
            out[p] = jnp.asarray(v)
    return unflatten(out)
