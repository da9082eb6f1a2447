"""Permutation alignment of hidden units (Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023).

A :class:`PermutationSpec` says which axes of which parameters share a permutation: ``axes_to_perm[path]`` has one
entry per axis of the leaf at ``path`` (a permutation name or ``None``), ``perm_to_axes[name]`` lists every
``(path, axis)`` the permutation acts on. Permuting every listed axis consistently leaves the network's function
unchanged.

Weight matching (the paper's Algorithm 1): find permutations ``π`` of model B's hidden units maximizing
``Σ_ℓ ⟨W_ℓ^A, P_ℓ W_ℓ^B P_{ℓ-1}ᵀ⟩``. Coordinate descent: for one permutation ``p`` at a time (random order), with all
others fixed, the objective is linear in ``P_p``::

    C_p = Σ_{(w, axis) ∈ p} W^A_(axis) · (π_{-p}(W^B))_(axis)ᵀ            # [n, n]
    π_p = argmax_π Σ_i C_p[i, π(i)]                                     # linear_sum_assignment

repeated until a full sweep improves nothing (or ``max_iter``). Activation matching (the paper's Section 3.1):
``π_p = argmax_π Σ_i Σ_x z^A_i(x) z^B_{π(i)}(x)`` over the hidden activations ``z`` at the units of ``p``
(one linear assignment per permutation; the activations of A and B are those of the unpermuted models).

Argument order (package docstring): trees first, then the spec, then the rest: ``weight_matching(params_a, params_b,
spec)``, ``activation_matching(params_a, params_b, apply_fn, batches, perm_layers)``, ``apply_permutation(params,
spec, perm)``, ``identity_permutation(params, spec)``, ``matching_objective(params_a, params_b, spec)``. A
:class:`PermutationSpec` passed where a tree belongs (the old ``apply_permutation(spec, perm, params)`` order) raises
a ``TypeError``.

Specs for ``jaxmodels`` models: :func:`mlp_permutation_spec`, :func:`vit_permutation_spec` and
:func:`gpt_permutation_spec` (residual stream and MLP hidden units of every block; attention's per-head q/k and v/out
dimensions are left unpermuted), :func:`resnet_permutation_spec` (ResNet-20 variables, BatchNorm statistics included).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jaxmodels.capture import capture_outputs
from jaxmodels.progress import progress_bar
from jaxmodels.tree import check_compatible, flatten, unflatten

PyTree = Any
Perm = dict[str, np.ndarray]

__all__ = [
    "PermutationSpec",
    "permutation_spec_from_axes_to_perm",
    "mlp_permutation_spec",
    "vit_permutation_spec",
    "gpt_permutation_spec",
    "resnet_permutation_spec",
    "apply_permutation",
    "identity_permutation",
    "invert_permutation",
    "weight_matching",
    "activation_matching",
    "matching_objective",
]


class PermutationSpec(NamedTuple):
    """Which axes of which parameters share a permutation: ``axes_to_perm[path]`` has one entry per axis of the leaf at
    ``path`` (a permutation name or None); ``perm_to_axes[name]`` lists every ``(path, axis)`` that permutation acts on.
    Build one with :func:`permutation_spec_from_axes_to_perm`."""

    perm_to_axes: dict[str, list[tuple[str, int]]]
    axes_to_perm: dict[str, tuple[str | None, ...]]


def permutation_spec_from_axes_to_perm(axes_to_perm: Mapping[str, Sequence[str | None]]) -> PermutationSpec:
    """The :class:`PermutationSpec` of an ``axes_to_perm`` mapping (``{path: (perm name or None per axis)}``, paths as
    in :func:`jaxmodels.tree.flatten`), e.g. ``{"Dense_0/kernel": (None, "P_0"), "Dense_0/bias": ("P_0",),
    "Dense_1/kernel": ("P_0", None)}``; ``perm_to_axes`` is derived from it."""
    perm_to_axes: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for path, axis_perms in axes_to_perm.items():
        for axis, p in enumerate(axis_perms):
            if p is not None:
                perm_to_axes[p].append((path, axis))
    return PermutationSpec(dict(perm_to_axes), {k: tuple(v) for k, v in axes_to_perm.items()})


def mlp_permutation_spec(num_hidden_layers: int, prefix: str = "") -> PermutationSpec:
    """Spec for :class:`jaxmodels.models.MLP` (``Dense_0 .. Dense_L``): permutation ``P_i`` on the outputs of
    ``Dense_i`` (kernel axis 1, bias) and the inputs of ``Dense_{i+1}`` (kernel axis 0)."""
    if num_hidden_layers < 1:
        raise ValueError(f"mlp_permutation_spec: num_hidden_layers must be >= 1, got {num_hidden_layers}")
    L = num_hidden_layers
    a2p: dict[str, tuple] = {}
    for i in range(L + 1):
        p_in = None if i == 0 else f"P_{i - 1}"
        p_out = None if i == L else f"P_{i}"
        a2p[f"{prefix}Dense_{i}/kernel"] = (p_in, p_out)
        a2p[f"{prefix}Dense_{i}/bias"] = (p_out,)
    return permutation_spec_from_axes_to_perm(a2p)


def _norm_axes(prefix: str, p: str) -> dict[str, tuple]:
    return {f"{prefix}/scale": (p,), f"{prefix}/bias": (p,)}


def _block_axes(b: str, r: str, m: str, norms: Sequence[str], norm_has_bias: bool) -> dict[str, tuple]:
    """Axes of one pre/post/peri-norm transformer block (``attn/{query,key,value,out}``, ``mlp/{fc1,fc2}``)."""
    a2p: dict[str, tuple] = {}
    for n in norms:
        a2p[f"{b}/{n}/scale"] = (r,)
        if norm_has_bias:
            a2p[f"{b}/{n}/bias"] = (r,)
    for n in ("query", "key", "value"):
        a2p[f"{b}/attn/{n}/kernel"] = (r, None)
        a2p[f"{b}/attn/{n}/bias"] = (None,)
    a2p[f"{b}/attn/out/kernel"] = (None, r)
    a2p[f"{b}/attn/out/bias"] = (r,)
    a2p[f"{b}/mlp/fc1/kernel"] = (r, m)
    a2p[f"{b}/mlp/fc1/bias"] = (m,)
    a2p[f"{b}/mlp/fc2/kernel"] = (m, r)
    a2p[f"{b}/mlp/fc2/bias"] = (r,)
    return a2p


def vit_permutation_spec(depth: int, pool: str = "cls", norm_has_bias: bool = True) -> PermutationSpec:
    """Spec for :class:`jaxmodels.models.ViT`: one residual-stream permutation ``P_res`` (patch embedding outputs,
    class token, position embedding, every norm, q/k/v inputs, attention ``out`` and ``fc2`` outputs, head inputs;
    LayerNorm/RMSNorm commute with a feature permutation) and ``P_mlp_i`` on block ``i``'s MLP hidden units.
    Attention's internal dimensions stay unpermuted (a permutation there must respect heads).
    ``norm_has_bias=False`` for RMSNorm."""
    r = "P_res"
    a2p: dict[str, tuple] = {
        "patch_embed/kernel": (None, None, None, r), "patch_embed/bias": (r,), "pos_embed": (None, None, r),
        "head/kernel": (r, None), "head/bias": (None,)}
    if pool == "cls":
        a2p["cls"] = (None, None, r)
    for i in range(depth):
        a2p.update(_block_axes(f"block_{i}", r, f"P_mlp_{i}", ("norm1", "norm2"), norm_has_bias))
    a2p["norm/scale"] = (r,)
    if norm_has_bias:
        a2p["norm/bias"] = (r,)
    return permutation_spec_from_axes_to_perm(a2p)


def gpt_permutation_spec(depth: int, placement: str = "pre", norm_has_bias: bool = True,
                         tie_embeddings: bool = True) -> PermutationSpec:
    """Spec for :class:`jaxmodels.models.GPT` (unscanned layers ``block_i``): the residual permutation ``P_res`` acts
    on the token embedding (axis 1; with tied embeddings this also permutes the output projection), the position
    embedding, every norm, attention/MLP inputs and outputs and the untied head; ``P_mlp_i`` on block ``i``'s MLP
    hidden units. Attention's internal dimensions stay unpermuted."""
    if placement not in ("pre", "post", "peri"):
        raise ValueError(f"gpt_permutation_spec: placement must be pre/post/peri, got {placement!r}")
    r = "P_res"
    a2p: dict[str, tuple] = {"embed/embedding": (None, r), "pos_embed": (None, None, r)}
    norms = ("norm1", "norm2") + (("attn_out_norm", "mlp_out_norm") if placement == "peri" else ())
    for i in range(depth):
        a2p.update(_block_axes(f"block_{i}", r, f"P_mlp_{i}", norms, norm_has_bias))
    if placement != "post":
        a2p["norm/scale"] = (r,)
        if norm_has_bias:
            a2p["norm/bias"] = (r,)
    if not tie_embeddings:
        a2p["head/kernel"] = (r, None)
    return permutation_spec_from_axes_to_perm(a2p)


def resnet_permutation_spec(num_blocks: int = 9, downsample_at: Sequence[int] = (3, 6), shortcut: str = "B",
                            batch_stats: bool = True) -> PermutationSpec:
    """Spec for :class:`jaxmodels.models.ResNet` (e.g. ResNet-20) over the *variables* dict
    ``{"params": ..., "batch_stats": ...}`` (``batch_stats=False``: over ``{"params": ...}`` only).

    ``P_block_k``: block ``k``'s inner channels (``conv1`` outputs, ``bn1``, ``conv2`` inputs). With
    ``shortcut="B"`` (projection shortcuts) each stage's residual stream has its own permutation ``P_stage_s``
    (stem / ``conv2`` / ``bn2`` / shortcut outputs, ``conv1`` and shortcut inputs, head inputs). With
    ``shortcut="A"`` the zero-padded identity shortcut ties each stage's channels to a fixed slice of the next one, so
    only the block-inner permutations are used (the residual streams stay unpermuted)."""
    if shortcut not in ("A", "B"):
        raise ValueError(f"resnet_permutation_spec: shortcut must be 'A' or 'B', got {shortcut!r}")
    ds = set(downsample_at)
    bn_leaves = [("params", "scale"), ("params", "bias")] + (
        [("batch_stats", "mean"), ("batch_stats", "var")] if batch_stats else [])

    def bn(name, p):
        return {f"{col}/{name}/{leaf}": (p,) for col, leaf in bn_leaves}

    def res(stage):
        return f"P_stage_{stage}" if shortcut == "B" else None

    a2p: dict[str, tuple] = {"params/stem_conv/kernel": (None, None, None, res(0)), **bn("stem_bn", res(0))}
    stage = 0
    for k in range(num_blocks):
        b, inner = f"block_{k}", f"P_block_{k}"
        s_in = res(stage)
        if k in ds:
            stage += 1
        s_out = res(stage)
        a2p[f"params/{b}/conv1/kernel"] = (None, None, s_in, inner)
        a2p.update(bn(f"{b}/bn1", inner))
        a2p[f"params/{b}/conv2/kernel"] = (None, None, inner, s_out)
        a2p.update(bn(f"{b}/bn2", s_out))
        if k in ds and shortcut == "B":
            a2p[f"params/{b}/shortcut_conv/kernel"] = (None, None, s_in, s_out)
            a2p.update(bn(f"{b}/shortcut_bn", s_out))
    a2p["params/head/kernel"] = (res(stage), None)
    a2p["params/head/bias"] = (None,)
    return permutation_spec_from_axes_to_perm(a2p)


def _check_spec(spec: PermutationSpec, flat: Mapping[str, Any]) -> dict[str, int]:
    missing = [k for k in spec.axes_to_perm if k not in flat]
    if missing:
        raise ValueError(f"permutation spec names {missing[0]!r}, which is not a leaf of the params "
                         f"(leaves: {sorted(flat)[:8]}...)")
    sizes: dict[str, int] = {}
    for p, axes in spec.perm_to_axes.items():
        for path, axis in axes:
            shape = np.shape(flat[path])
            if axis >= len(shape):
                raise ValueError(f"permutation {p!r}: {path!r} has no axis {axis} (shape {shape})")
            n = shape[axis]
            if sizes.setdefault(p, n) != n:
                raise ValueError(f"permutation {p!r}: {path!r} axis {axis} has size {n}, others {sizes[p]}")
    return sizes


def _check_order(method: str, trees: Sequence[Any], spec: Any, signature: str) -> None:
    if any(isinstance(t, PermutationSpec) for t in trees) or not isinstance(spec, PermutationSpec):
        raise TypeError(f"{method}: arguments are {signature} (trees first, then the PermutationSpec)")


def identity_permutation(params: PyTree, spec: PermutationSpec) -> Perm:
    """The identity ``{perm_name: arange(n)}`` for every permutation of ``spec``."""
    _check_order("identity_permutation", [params], spec, "(params, spec)")
    sizes = _check_spec(spec, flatten(params))
    return {p: np.arange(n) for p, n in sizes.items()}


def invert_permutation(perm: Perm) -> Perm:
    """The inverse of every permutation in ``perm`` (``{name: indices}``): ``argsort(perm[name])``, so
    ``apply_permutation(apply_permutation(params, spec, perm), spec, invert_permutation(perm)) == params``."""
    return {p: np.argsort(np.asarray(v)) for p, v in perm.items()}


def _permuted(spec, perm, path, w, except_axis=None, xp=jnp):
    for axis, p in enumerate(spec.axes_to_perm.get(path, ())):
        if axis == except_axis or p is None:
            continue
        w = xp.take(w, xp.asarray(perm[p]), axis=axis)
    return w


def apply_permutation(params: PyTree, spec: PermutationSpec, perm: Perm) -> PyTree:
    """Permute every axis named in ``spec``: ``w' = take(w, perm[p], axis)`` per (axis, p). The result computes
    exactly the same function as ``params`` (a re-indexing of hidden units). Works under ``jax.jit`` and on
    sharded leaves; leaves not in ``spec`` are returned as is."""
    _check_order("apply_permutation", [params], spec, "(params, spec, perm)")
    flat = flatten(params)
    sizes = _check_spec(spec, flat)
    for p, n in sizes.items():
        if p not in perm:
            raise ValueError(f"apply_permutation: no entry for permutation {p!r}")
        if np.shape(perm[p]) != (n,):
            raise ValueError(f"apply_permutation: permutation {p!r} has shape {np.shape(perm[p])}, expected ({n},)")
    out = {k: _permuted(spec, perm, k, v) for k, v in flat.items()}
    return unflatten(out, like=params)


def matching_objective(params_a: PyTree, params_b: PyTree, spec: PermutationSpec) -> float:
    """``Σ_{w ∈ spec} ⟨W^A, W^B⟩`` (the weight-matching objective at the identity; apply a permutation to B first)."""
    _check_order("matching_objective", [params_a, params_b], spec, "(params_a, params_b, spec)")
    fa, fb = flatten(params_a), flatten(params_b)
    return float(sum(np.vdot(np.asarray(fa[k], np.float64), np.asarray(fb[k], np.float64))
                     for k in spec.axes_to_perm))


def _lsa(C: np.ndarray) -> np.ndarray:
    ri, ci = linear_sum_assignment(C, maximize=True)
    assert (ri == np.arange(len(ri))).all()
    return ci


def weight_matching(params_a: PyTree, params_b: PyTree, spec: PermutationSpec, *, max_iter: int = 100,
                    init_perm: Perm | None = None, seed: int = 0, progress: bool | None = None) -> Perm:
    """Permutations ``π`` such that ``apply_permutation(spec, π, params_b)`` is closest to ``params_a`` in the
    weight-matching objective (coordinate descent with ``scipy.optimize.linear_sum_assignment``, float64 on host).
    Returns ``{perm_name: int array}``."""
    _check_order("weight_matching", [params_a, params_b], spec, "(params_a, params_b, spec)")
    if max_iter < 1:
        raise ValueError(f"weight_matching: max_iter must be >= 1, got {max_iter}")
    check_compatible(params_a, params_b, names=["params_a", "params_b"], check_dtype=False)
    fa = {k: np.asarray(v, np.float64) for k, v in flatten(params_a).items() if k in spec.axes_to_perm}
    fb = {k: np.asarray(v, np.float64) for k, v in flatten(params_b).items() if k in spec.axes_to_perm}
    sizes = _check_spec(spec, fa)
    perm = {p: np.arange(n) for p, n in sizes.items()} if init_perm is None else \
        {p: np.asarray(v).copy() for p, v in init_perm.items()}
    names = sorted(sizes)
    rng = np.random.default_rng(seed)
    for _ in progress_bar(range(max_iter), progress, desc="weight matching", leave=False):
        improved = False
        for i in rng.permutation(len(names)):
            p = names[i]
            n = sizes[p]
            C = np.zeros((n, n))
            for path, axis in spec.perm_to_axes[p]:
                wa = np.moveaxis(fa[path], axis, 0).reshape(n, -1)
                wb = np.moveaxis(_permuted(spec, perm, path, fb[path], except_axis=axis, xp=np), axis, 0)
                C += wa @ wb.reshape(n, -1).T
            ci = _lsa(C)
            old = C[np.arange(n), perm[p]].sum()
            new = C[np.arange(n), ci].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                improved = True
                perm[p] = ci
        if not improved:
            break
    return perm


def activation_matching(params_a: PyTree, params_b: PyTree, apply_fn: Callable, batches: Iterable,
                        perm_layers: Mapping[str, str | Sequence[str]], *,
                        activation: Callable[[jax.Array], jax.Array] | None = None,
                        progress: bool | None = None) -> Perm:
    """Activation matching: for each permutation ``p``, ``perm_layers[p]`` names the linear layer(s) (module paths)
    whose outputs are the units ``p`` permutes; ``activation`` (e.g. ``jax.nn.relu``) is applied to those outputs
    (a permutation commutes with any elementwise activation, so matching pre-activations is also valid).
    ``C_p = Σ_x Σ_layers z_A(x)ᵀ z_B(x)``; ``π_p = argmax_π Σ_i C_p[i, π(i)]``."""
    if callable(params_a) and not callable(apply_fn):
        raise TypeError("activation_matching: arguments are (params_a, params_b, apply_fn, batches, perm_layers)")
    act = (lambda z: z) if activation is None else activation
    layers = {p: [v] if isinstance(v, str) else list(v) for p, v in perm_layers.items()}

    @jax.jit
    def cross(pa, pb, x):
        out = {}
        for p, ls in layers.items():
            c = 0.0
            for layer in ls:
                za = jnp.concatenate([act(z).reshape(-1, z.shape[-1]) for z in capture_outputs(apply_fn, pa, x, layer)])
                zb = jnp.concatenate([act(z).reshape(-1, z.shape[-1]) for z in capture_outputs(apply_fn, pb, x, layer)])
                c = c + jnp.dot(za.astype(jnp.float32).T, zb.astype(jnp.float32),
                                precision=jax.lax.Precision.HIGHEST)
            out[p] = c
        return out

    total = None
    for x in progress_bar(batches, progress, desc="activation matching", leave=False):
        c = cross(params_a, params_b, x)
        total = c if total is None else jax.tree.map(jnp.add, total, c)
    if total is None:
        raise ValueError("activation_matching: `batches` is empty")
    return {p: _lsa(np.asarray(c, np.float64)) for p, c in total.items()}
