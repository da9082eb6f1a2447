"""The interaction basis: a per-layer activation basis invariant to the degeneracies of linear dependence between
activations and between the gradients passed back, and the sparsity of the interactions between adjacent layers.

Bushnaq, Mendel, Heimersheim et al., "Using Degeneracy in the Loss Landscape for Mechanistic Interpretability"
(arXiv 2405.10927, section 6, the Interaction Basis) and its empirical companion "The Local Interaction Basis"
(LIB, arXiv 2405.10928), as the authors' code builds it (github.com/ApolloResearch/rib,
``rib/interaction_algos.py`` ``calculate_interaction_rotations``; edges as ``rib/linalg.py`` ``calc_edge_squared``).
For a network of node layers ``f⁰ = x, f^{l+1} = g_l(f^l)`` (per example, row vectors, ``f̂ = f C``), from the output
backwards::

    C_L   = U_L                                   (eigenvectors of the output Gram matrix: the output's PCA rotation)
    G_l   = 1/N Σ_x f^l(x)ᵀ f^l(x) = U D Uᵀ       (uncentered Gram matrix; directions with D_k ≤ rtol·D_max dropped)
    J_l(x)= ∂ (g_l(f^l) C_{l+1}) / ∂ f^l          (Jacobian into the next layer's basis, [d_l, d̂_{l+1}])
    M_l   = (U D^{1/2})ᵀ [1/N Σ_x J_l J_lᵀ] (U D^{1/2}) = V Λ Vᵀ    (Jacobian Gram in whitened coordinates)
    C_l   = U D^{-1/2} V Λ^{1/2}                  (columns with Λ_k ≤ rtol·Λ_max dropped, sorted by Λ descending)

so in the basis ``f̂ = f C_l`` the activations are uncorrelated with second moments ``Λ`` and the Jacobian Gram of
the next layer is the identity: any invertible linear reparameterization ``f^l → f^l A`` (absorbed by ``g_l``)
leaves ``f̂`` unchanged, up to column signs. Dropped directions are kept as zero columns, so every shape is static
(jit-able); ``rank`` counts the kept ones. ``Λ`` is the eigenvalue of ``M`` (the papers' point-Jacobian rule);
the rib code's later variant rescales by an integrated-gradient ``Λ'`` matrix, which is not implemented.

Interactions (edges) between adjacent layers, in any bases ``C_l, C_{l+1}`` (``C = I``: neurons; ``pca_basis``:
PCA), are the squared integrated-gradient attributions from the zero baseline, averaged over the data::

    ĝ_l(f̂) = g_l(f̂ C_l⁺) C_{l+1}
    E_l[i, j] = 1/N Σ_x ( f̂_i(x) ∫₀¹ ∂ĝ_{l,j}(α f̂(x)) / ∂f̂_i dα )²      (midpoint rule, ``n_alphas`` points;
                                                                             ``n_alphas=1`` is rib's α = 1/2)

``edge_sparsity`` measures how concentrated the interaction mass is: with ``p = E / ΣE`` over all edges, the
share of the ``k`` largest, the fewest edges holding a ``mass`` share (e.g. 99%), the entropy ``H = -Σ p log p``
and the effective number of edges ``exp(H)`` (the papers' claim: sparser interactions in the interaction basis
than in the neuron or PCA basis). The degeneracy paper's modularity metric (clustering of the interaction
graph) is not implemented.

API::

    fns = dense_layer_fns(params)                         # a Flax MLP's Dense layers as per-example functions
    bases = local_interaction_basis(fns, x)                     # [InteractionBasis] for f⁰ .. f^L
    edges = interaction_edges(fns, x, [b.c for b in bases], [b.c_pinv for b in bases])
    s = edge_sparsity(edges[1], k=50, mass=0.99)          # EdgeSparsity(top_k_mass, edges_for_mass, ...)
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.analysis.spectral import _check_float_array
from jaxmodels.tree import is_concrete

__all__ = ["InteractionBasis", "EdgeSparsity", "dense_layer_fns", "node_activations", "local_interaction_basis",
           "pca_basis", "neuron_basis", "interaction_edges", "edge_sparsity"]

LayerFn = Callable[[jax.Array], jax.Array]


class InteractionBasis(NamedTuple):
    """One node layer's basis: ``f̂ = f @ c`` (``c [d, d]``, zero columns past ``rank``), ``f ≈ f̂ @ c_pinv`` on the
    kept subspace, ``scales`` the second moments ``Λ`` of the kept features (descending, 0 for dropped ones)."""

    c: jax.Array
    c_pinv: jax.Array
    scales: jax.Array
    rank: jax.Array


class EdgeSparsity(NamedTuple):
    """Concentration of an edge matrix's mass: share of the ``k`` largest edges, the number of largest edges that
    hold a ``mass`` share of the total, entropy of ``E / ΣE`` (nats) and the effective number ``exp(entropy)``."""

    top_k_mass: jax.Array
    edges_for_mass: jax.Array
    entropy: jax.Array
    effective_edges: jax.Array


def dense_layer_fns(params, activation: Callable = nn.relu) -> list[LayerFn]:
    """The Dense layers ``Dense_0 .. Dense_L`` of a Flax ``MLP`` params dict as per-example functions
    ``h -> activation(h @ kernel + bias)`` (no activation after the last).

    >>> fns = dense_layer_fns(variables["params"])        # MLP(features=(32, 32)): 3 functions, 4 node layers
    """
    names = sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
    if not names:
        raise ValueError("params has no Dense_<i> layers")
    fns = []
    for i, name in enumerate(names):
        kernel, bias = params[name]["kernel"], params[name].get("bias")
        last = i == len(names) - 1

        def fn(h, kernel=kernel, bias=bias, last=last):
            z = h @ kernel.astype(jnp.float32)
            if bias is not None:
                z = z + bias.astype(jnp.float32)
            return z if last else activation(z)

        fns.append(fn)
    return fns


def _check_fns_and_x(layer_fns, x):
    if isinstance(layer_fns, (str, bytes)) or not isinstance(layer_fns, Sequence) or len(layer_fns) == 0:
        raise ValueError("layer_fns must be a non-empty sequence of per-example functions f^l -> f^{l+1}")
    if not all(callable(f) for f in layer_fns):
        raise ValueError("every entry of layer_fns must be callable")
    _check_float_array(x, "x", 2, 2)


def node_activations(layer_fns: Sequence[LayerFn], x: jax.Array) -> list[jax.Array]:
    """The activations ``[f⁰ = x, f¹, ..., f^L]`` (each ``[N, d_l]``) of the per-example ``layer_fns`` on ``x [N, d]``.

    >>> acts = node_activations(dense_layer_fns(params), x)
    """
    _check_fns_and_x(layer_fns, x)
    return _node_acts(layer_fns, jnp.asarray(x, jnp.float32))


def _node_acts(layer_fns, x):
    acts = [x]
    for fn in layer_fns:
        out = jax.vmap(fn)(acts[-1])
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"each layer function must map a vector to a vector, got an output of shape {out.shape}")
        acts.append(out.astype(jnp.float32))
    return acts


def _eigh_desc(a):
    w, v = jnp.linalg.eigh(0.5 * (a + a.T))
    w, v = w[::-1], v[:, ::-1]
    return jnp.maximum(w, 0.0), v


def _check_rtol(rtol):
    if not 0.0 <= float(rtol) < 1.0:
        raise ValueError(f"rtol must be in [0, 1), got {rtol}")


def pca_basis(acts: jax.Array, *, rtol: float = 1e-5) -> InteractionBasis:
    """The PCA rotation of activations ``acts [N, d]``: ``c = U`` (eigenvectors of the uncentered Gram matrix
    ``actsᵀ acts / N``, descending; directions with eigenvalue ≤ ``rtol·max`` zeroed), ``scales`` the eigenvalues.

    >>> b = pca_basis(acts[1])                            # rib's basis_formula="svd" comparison basis
    """
    _check_float_array(acts, "acts", 2, 2)
    _check_rtol(rtol)
    a = jnp.asarray(acts, jnp.float32)
    d, u = _eigh_desc(a.T @ a / a.shape[0])
    keep = d > rtol * d[0]
    u = jnp.where(keep[None, :], u, 0.0)
    return InteractionBasis(u, u.T, jnp.where(keep, d, 0.0), jnp.sum(keep).astype(jnp.int32))


def neuron_basis(dim: int) -> InteractionBasis:
    """The neuron (standard) basis of a ``dim``-wide layer: ``c = c_pinv = I``.

    >>> b = neuron_basis(32)
    """
    if int(dim) < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    eye = jnp.eye(int(dim), dtype=jnp.float32)
    return InteractionBasis(eye, eye, jnp.ones(int(dim), jnp.float32), jnp.asarray(int(dim), jnp.int32))


def local_interaction_basis(layer_fns: Sequence[LayerFn], x: jax.Array, *, rtol: float = 1e-5,
                      rotate_output: bool = True) -> list[InteractionBasis]:
    """The interaction basis of every node layer ``f⁰ = x .. f^L`` of the per-example ``layer_fns`` on the data
    ``x [N, d]`` (module docstring): ``C_L`` the output's PCA rotation (identity if ``rotate_output=False``), then
    ``C_l = U D^{-1/2} V Λ^{1/2}`` backwards. ``rtol`` drops directions whose Gram eigenvalue (``D``) or Jacobian
    eigenvalue (``Λ``) is at most ``rtol`` times the largest (kept as zero columns). Jit-able with ``layer_fns``
    closed over (e.g. ``jax.jit(lambda p, x: local_interaction_basis(dense_layer_fns(p), x))``).

    >>> bases = local_interaction_basis(dense_layer_fns(params), x_train[:512])
    >>> f_hat = node_activations(fns, x)[1] @ bases[1].c  # uncorrelated, second moments bases[1].scales
    """
    _check_fns_and_x(layer_fns, x)
    _check_rtol(rtol)
    acts = _node_acts(layer_fns, jnp.asarray(x, jnp.float32))
    n = acts[0].shape[0]
    out = pca_basis(acts[-1], rtol=rtol) if rotate_output else neuron_basis(acts[-1].shape[1])
    bases = [out]
    for l in range(len(layer_fns) - 1, -1, -1):
        f = acts[l]
        d, u = _eigh_desc(f.T @ f / n)
        keep_d = d > rtol * d[0]
        sq = jnp.where(keep_d, jnp.sqrt(d), 0.0)
        inv_sq = jnp.where(keep_d, 1.0 / jnp.sqrt(jnp.where(keep_d, d, 1.0)), 0.0)
        c_next = bases[0].c
        fn = layer_fns[l]
        jac = jax.vmap(jax.jacfwd(lambda h: fn(h).astype(jnp.float32) @ c_next))(f)  # [N, d̂_{l+1}, d_l]
        m_dash = jnp.einsum("nji,njk->ik", jac, jac) / n                            # 1/N Σ J Jᵀ (row layout)
        uds = u * sq[None, :]
        lam, v = _eigh_desc(uds.T @ m_dash @ uds)
        keep = lam > rtol * jnp.maximum(lam[0], jnp.finfo(jnp.float32).tiny)
        lam = jnp.where(keep, lam, 0.0)
        c = (u * inv_sq[None, :]) @ v * jnp.sqrt(lam)[None, :]
        c_pinv = (jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)[:, None] * v.T) @ uds.T
        bases.insert(0, InteractionBasis(c, c_pinv, lam, jnp.sum(keep).astype(jnp.int32)))
    return bases


def interaction_edges(layer_fns: Sequence[LayerFn], x: jax.Array, cs: Sequence[jax.Array],
                      c_pinvs: Sequence[jax.Array], *, n_alphas: int = 1) -> list[jax.Array]:
    """Edges ``E_l [d_l, d_{l+1}]`` between node layers ``l`` and ``l+1`` in the bases ``cs[l]`` (``f̂ = f @ c``) and
    their inverses ``c_pinvs[l]`` (module docstring: squared integrated-gradient attributions from 0, midpoint rule
    with ``n_alphas`` points, averaged over ``x``). ``len(cs) == len(layer_fns) + 1``.

    >>> edges = interaction_edges(fns, x, [b.c for b in bases], [b.c_pinv for b in bases], n_alphas=4)
    """
    _check_fns_and_x(layer_fns, x)
    if len(cs) != len(layer_fns) + 1 or len(c_pinvs) != len(cs):
        raise ValueError(f"need {len(layer_fns) + 1} bases (one per node layer), got {len(cs)} and {len(c_pinvs)}")
    if int(n_alphas) < 1:
        raise ValueError(f"n_alphas must be >= 1, got {n_alphas}")
    shapes = jax.eval_shape(lambda x: _node_acts(layer_fns, x), jax.ShapeDtypeStruct(x.shape, jnp.float32))
    for l, (a, c, cp) in enumerate(zip(shapes, cs, c_pinvs)):
        if c.ndim != 2 or c.shape[0] != a.shape[1] or cp.shape != (c.shape[1], c.shape[0]):
            raise ValueError(f"node layer {l}: basis shapes {c.shape} / {cp.shape} do not fit width {a.shape[1]}")
    acts = _node_acts(layer_fns, jnp.asarray(x, jnp.float32))
    alphas = (jnp.arange(int(n_alphas), dtype=jnp.float32) + 0.5) / int(n_alphas)
    edges = []
    for l, fn in enumerate(layer_fns):
        c_in, cp_in, c_out = (jnp.asarray(cs[l], jnp.float32), jnp.asarray(c_pinvs[l], jnp.float32),
                              jnp.asarray(cs[l + 1], jnp.float32))
        f_hat = acts[l] @ c_in

        def g_hat(h, fn=fn, cp_in=cp_in, c_out=c_out):
            return fn(h @ cp_in).astype(jnp.float32) @ c_out

        def ig(fh, g_hat=g_hat):  # ∫ ∂ĝ_j(α f̂)/∂f̂_i dα, [d_in_hat, d_out_hat]
            jac = jax.vmap(lambda a: jax.jacfwd(g_hat)(a * fh))(alphas)  # [A, d_out, d_in]
            return jnp.mean(jac, axis=0).T

        attr = jax.vmap(ig)(f_hat) * f_hat[:, :, None]                   # [N, d_in, d_out]
        edges.append(jnp.mean(attr ** 2, axis=0))
    return edges


def edge_sparsity(edges: jax.Array, k: int = 1, mass: float = 0.99) -> EdgeSparsity:
    """How concentrated the interaction mass of ``edges`` (any shape, non-negative) is: the share of the ``k``
    largest entries, the fewest largest entries holding a ``mass`` share of the total (int32), the entropy of
    ``p = edges / Σ edges`` and ``exp(entropy)`` (lower counts and entropy: sparser).

    >>> s = edge_sparsity(edges[1], k=32, mass=0.99)
    """
    _check_float_array(edges, "edges", 1)
    if not 1 <= int(k) <= edges.size:
        raise ValueError(f"k must be in [1, {edges.size}], got {k}")
    if not 0.0 < float(mass) <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if is_concrete(edges) and bool(jnp.any(jnp.asarray(edges) < 0)):
        raise ValueError("edges must be non-negative")
    return _edge_sparsity(jnp.asarray(edges, jnp.float32).reshape(-1), k=int(k), mass=float(mass))


@functools.partial(jax.jit, static_argnames=("k", "mass"))
def _edge_sparsity(e, *, k, mass):
    p = e / jnp.maximum(jnp.sum(e), jnp.finfo(jnp.float32).tiny)
    srt = jnp.sort(p)[::-1]
    top = jnp.sum(srt[:k])
    cum = jnp.cumsum(srt)
    n_mass = jnp.minimum(jnp.sum(cum < mass * cum[-1] * (1 - 1e-6)) + 1, p.size).astype(jnp.int32)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return EdgeSparsity(top, n_mass, ent, jnp.exp(ent))
