"""Path-keyed pytree helpers shared by every weightlab package.

A *path* is the "/"-joined sequence of keys leading to a leaf: ``{"params": {"Dense_0": {"kernel": w}}}`` has the
leaf ``"params/Dense_0/kernel"``. Paths are what users write regexes against ("only these layers"), what
safetensors files store, and what error messages name.

Works on any pytree: linen ``params`` dicts, ``nnx.State``, lists/tuples, NamedTuples, dataclasses.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
SEP = "/"

__all__ = [
    "key_to_str",
    "path_to_str",
    "flatten",
    "unflatten",
    "leaf_paths",
    "check_compatible",
    "select",
    "filter_paths",
    "map_with_path",
    "compute_in_float32",
    "to_compute_dtype",
    "LOW_PRECISION_DTYPES",
    "tree_bytes",
    "is_concrete",
]


def key_to_str(key: Any) -> str:
    """One path entry as a string: dict keys, sequence indices, attribute names, flattened indices."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    # nnx / other custom keys usually carry .key or .name; fall back to str().
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(path: Sequence[Any], sep: str = SEP) -> str:
    """A ``jax.tree_util`` key path as one string, its entries (:func:`key_to_str`) joined by ``sep``, e.g.
    ``(DictKey("Dense_0"), DictKey("kernel")) -> "Dense_0/kernel"``: the path names used by :func:`flatten` and
    every regex rule."""
    return sep.join(key_to_str(k) for k in path)


def _leaves_with_paths(tree: PyTree, sep: str = SEP, is_leaf=None) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_to_str(p, sep), leaf) for p, leaf in leaves]


def leaf_paths(tree: PyTree, sep: str = SEP) -> list[str]:
    """The paths of all leaves, in tree-flatten order."""
    return [p for p, _ in _leaves_with_paths(tree, sep)]


def flatten(tree: PyTree, sep: str = SEP) -> dict[str, Any]:
    """Flatten a pytree to ``{"path/to/leaf": leaf}`` (insertion order = tree-flatten order).

    Raises ``ValueError`` if two leaves map to the same path string (e.g. keys containing ``sep``).
    """
    out: dict[str, Any] = {}
    for p, leaf in _leaves_with_paths(tree, sep):
        if p in out:
            raise ValueError(f"two leaves flatten to the same path {p!r}; choose another separator than {sep!r}")
        out[p] = leaf
    return out


def unflatten(flat: Mapping[str, Any], like: PyTree | None = None, sep: str = SEP) -> PyTree:
    """Inverse of :func:`flatten`.

    With ``like`` (a template pytree of the same structure), the result has exactly ``like``'s structure and node
    types (NamedTuples, nnx.State, ...), with leaves taken from ``flat`` by path; a missing or extra path raises a
    ``ValueError`` naming it. Without ``like``, nested plain dicts are built from the paths (the natural inverse for
    safetensors-style flat dicts).
    """
    if like is not None:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
        paths = [path_to_str(p, sep) for p, _ in leaves]
        missing = [p for p in paths if p not in flat]
        if missing:
            raise ValueError(f"unflatten: path {missing[0]!r} of the template is missing from the flat dict")
        extra = sorted(set(flat) - set(paths))
        if extra:
            raise ValueError(f"unflatten: path {extra[0]!r} is not in the template")
        return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths])
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        keys = path.split(sep)
        node = nested
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ValueError(f"unflatten: {path!r} nests under a leaf at {k!r}")
            node = child
        if keys[-1] in node:
            raise ValueError(f"unflatten: {path!r} collides with an existing subtree")
        node[keys[-1]] = value
    return nested


def _describe(leaf: Any) -> str:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None:
        return f"{type(leaf).__name__} {leaf!r}"
    return f"shape={tuple(shape)} dtype={np.dtype(dtype).name if dtype is not None else None}"


def check_compatible(
    *trees: PyTree,
    names: Sequence[str] | None = None,
    check_dtype: bool = True,
    sep: str = SEP,
) -> None:
    """Raise ``ValueError`` unless all trees have the same paths, shapes and (optionally) dtypes.

    The message names the first differing path and shows both values, e.g.::

        tree 'model_1' differs from tree 'base' at 'params/Dense_0/kernel': shape=(64, 32) dtype=float32
        vs shape=(64, 16) dtype=float32
    """
    if len(trees) < 2:
        return
    names = list(names) if names is not None else [f"tree {i}" for i in range(len(trees))]
    if len(names) != len(trees):
        raise ValueError(f"check_compatible: {len(names)} names given for {len(trees)} trees")
    ref = _leaves_with_paths(trees[0], sep)
    ref_paths = [p for p, _ in ref]
    ref_set = set(ref_paths)
    for name, tree in zip(names[1:], trees[1:]):
        other = _leaves_with_paths(tree, sep)
        other_map = dict(other)
        # First path (in the reference's order) that is missing from the other tree.
        for p, leaf in ref:
            if p not in other_map:
                raise ValueError(
                    f"{name!r} differs from {names[0]!r} at {p!r}: missing in {name!r} "
                    f"(present in {names[0]!r} with {_describe(leaf)})"
                )
        for p, leaf in other:
            if p not in ref_set:
                raise ValueError(
                    f"{name!r} differs from {names[0]!r} at {p!r}: extra leaf in {name!r} with {_describe(leaf)}"
                )
        for p, leaf in ref:
            o = other_map[p]
            s_ref, s_o = np.shape(leaf), np.shape(o)
            if s_ref != s_o:
                raise ValueError(
                    f"{name!r} differs from {names[0]!r} at {p!r}: {_describe(leaf)} vs {_describe(o)}"
                )
            if check_dtype:
                d_ref = getattr(leaf, "dtype", None)
                d_o = getattr(o, "dtype", None)
                if d_ref is not None and d_o is not None and np.dtype(d_ref) != np.dtype(d_o):
                    raise ValueError(
                        f"{name!r} differs from {names[0]!r} at {p!r}: {_describe(leaf)} vs {_describe(o)}"
                    )
        # Same paths and shapes but different container types (e.g. dict vs FrozenDict vs State) is allowed.


def _compile(patterns: str | Iterable[str] | None) -> list[re.Pattern] | None:
    if patterns is None:
        return None
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    return [re.compile(p) if isinstance(p, str) else p for p in patterns]


def _matches(path: str, pats: list[re.Pattern] | None) -> bool:
    return pats is not None and any(p.search(path) for p in pats)


def select(
    tree: PyTree,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    sep: str = SEP,
) -> PyTree:
    """A pytree of Python bools with ``tree``'s structure: True where the leaf's path matches ``include``
    (any regex, ``re.search``; None = everything) and no ``exclude`` regex.

    The result is a valid mask for ``optax.masked`` and for every "only these layers" option.
    """
    inc, exc = _compile(include), _compile(exclude)

    def pick(path, _):
        p = path_to_str(path, sep)
        ok = True if inc is None else _matches(p, inc)
        return bool(ok and not _matches(p, exc))

    return jax.tree_util.tree_map_with_path(pick, tree)


def filter_paths(
    tree: PyTree,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    sep: str = SEP,
) -> dict[str, Any]:
    """The flat ``{path: leaf}`` dict of the leaves that :func:`select` keeps."""
    mask = flatten(select(tree, include, exclude, sep), sep)
    return {p: leaf for p, leaf in flatten(tree, sep).items() if mask[p]}


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree, sep: str = SEP) -> PyTree:
    """``jax.tree.map`` whose function also receives the leaf's path string first: ``fn(path, leaf, *rest_leaves)``."""
    return jax.tree_util.tree_map_with_path(lambda p, x, *r: fn(path_to_str(p, sep), x, *r), tree, *rest)


LOW_PRECISION_DTYPES = (jnp.bfloat16, jnp.float16)


def to_compute_dtype(x: Any) -> Any:
    """Upcast bf16/fp16 floating arrays to float32; leave everything else as is."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and any(np.dtype(dtype) == np.dtype(d) for d in LOW_PRECISION_DTYPES):
        return jnp.asarray(x, jnp.float32)
    return x


def _float_dtype(leaf: Any) -> Any:
    d = getattr(leaf, "dtype", None)
    return d if d is not None and jnp.issubdtype(d, jnp.floating) else None


def _dtype_template(result: PyTree, candidates: Sequence[Any]) -> dict[str, Any] | None:
    """``{path: dtype}`` of the first candidate tree whose leaf paths are exactly the result's (None if none)."""
    want = [p for p, _ in _leaves_with_paths(result)]
    for cand in candidates:
        leaves = _leaves_with_paths(cand)
        if [p for p, _ in leaves] == want and any(_float_dtype(x) is not None for _, x in leaves):
            return {p: _float_dtype(x) for p, x in leaves}
    return None


def compute_in_float32(fn: Callable | None = None, *, dtype_from: int | str = 0):
    """Dtype policy decorator: run ``fn`` with bf16/fp16 array leaves upcast to float32 and cast every floating
    output leaf back to the dtype of ITS OWN input leaf.

    The output leaf at path ``p`` takes the dtype of the leaf at ``p`` in the ``dtype_from`` argument (a position or
    keyword name), or in that argument's first element when it is a list/tuple of trees (``models``); then any other
    argument (or first element) with exactly the output's leaf paths is tried. So a merge of bf16 kernels and fp32
    norms returns bf16 kernels and fp32 norms. When no argument has the output's paths (a function returning a new
    structure), every floating output leaf takes the single floating dtype of the ``dtype_from`` argument (or of all
    arguments if it has none); if those inputs mix floating dtypes this raises ``ValueError`` instead of collapsing
    them to one. Non-floating outputs (masks, integer codes), and outputs whose input leaf is not floating, keep
    their dtype. Works under ``jax.jit`` (only structure and dtypes are read).
    """
    if fn is None:
        return functools.partial(compute_in_float32, dtype_from=dtype_from)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if isinstance(dtype_from, int):
            src = args[dtype_from] if dtype_from < len(args) else None
        else:
            src = kwargs.get(dtype_from)
        candidates = []
        for tree in [src, *args, *kwargs.values()]:
            if tree is None:
                continue
            candidates.append(tree)
            if isinstance(tree, (list, tuple)) and tree:
                candidates.append(tree[0])
        up = jax.tree_util.tree_map(to_compute_dtype, (args, kwargs))
        result = fn(*up[0], **up[1])
        template = _dtype_template(result, candidates)
        if template is not None:
            flat_out = _leaves_with_paths(result)
            leaves = [y.astype(template[p]) if template[p] is not None and _float_dtype(y) is not None else y
                      for p, y in flat_out]
            return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(result), leaves)
        pool = src if src is not None and any(_float_dtype(x) is not None for x in jax.tree_util.tree_leaves(src)) \
            else (args, kwargs)
        dtypes = {np.dtype(d) for d in map(_float_dtype, jax.tree_util.tree_leaves(pool)) if d is not None}
        if not dtypes:
            return result
        if len(dtypes) > 1:
            raise ValueError(f"compute_in_float32({getattr(fn, '__name__', fn)}): the output's paths match no input "
                             f"tree, and the inputs mix floating dtypes {sorted(d.name for d in dtypes)}, so the "
                             "output dtype of each leaf is undefined; return a tree shaped like an input")
        out_dtype = dtypes.pop()
        return jax.tree_util.tree_map(lambda y: y.astype(out_dtype) if _float_dtype(y) is not None else y, result)

    return wrapper


def is_concrete(x: Any) -> bool:
    """Whether ``x`` has values that can be read now, i.e. is not a tracer (``jax.jit``, ``grad``, ``vmap``,
    ``eval_shape``, ...). Value checks (NaN/Inf, hyper-parameter ranges) run only on concrete inputs, and must also
    test the *result* of their reduction: a concrete array closed over inside a trace reduces to a tracer."""
    return not isinstance(x, jax.core.Tracer)


def tree_bytes(tree: PyTree) -> int:
    """Total bytes of all array leaves (``size * itemsize``)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "dtype") and hasattr(leaf, "size"):
            total += int(leaf.size) * np.dtype(leaf.dtype).itemsize
    return total
