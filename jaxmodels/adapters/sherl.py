"""SHERL: memory-efficient transfer by fusing frozen intermediate outputs (early route) into a few late layers.

Diao et al., "SHERL: Synthesizing High Accuracy and Efficient Memory for Resource-Limited Transfer Learning"
(ECCV 2024), as its reference code (``Paranioar/SHERL``, ``CLIP-ViL/src/lxrt/modeling.py``: ``Downsample``,
``Guidance``, ``Sherl_Block``) computes it. The frozen backbone's first ``L - 1`` layers run without gradients,
giving the outputs ``x_0`` (embeddings), ``x_1 .. x_{L-1}``; **early route** (per token / sample)::

    s_i = D_i(x_i),   D_i(x) = (W2 u + b2 + u) ⊙ σ(W3 u + b3),  u = relu(W1 x + b1)     (i = 0 .. L-1, width h)
    g = s_{L-1} (the deepest),  shallow s_0 .. s_{L-2}
    r_i = Σ_j relu(cos(s_i, s_j))                       (redundancy of s_i among the shallow outputs)
    a_i = relu(w_a · (s_i ⊙ g) + b_a) / r_i,   α_i = a_i / (Σ_j |a_j| + 1e-6)           (anti-redundancy weights)
    f = Σ_i α_i s_i + g
    x̃ = W_o relu(f) + b_o + tanh(γ / 0.1) · x_{L-1}       (γ = 0 at init: the late layer sees only the fusion)

**Late route**: only the last pre-trained layer(s) (fine-tuned) and the fusion parameters are trained, on
``x̃``; gradients never enter the frozen early layers, so no early activations are stored for the backward (the
memory claim). :func:`sherl_fuse` is the early route; the late layers are the model's own.

API::

    sherl = init_sherl(key, in_dims=[64, 64], hidden=16, out_dim=64)     # one D_i per intermediate output
    x_t = sherl_fuse(sherl, [x0, x1], last=x1)                           # early route (inputs stop-gradient)
    logits = late_layers(late_params, x_t)                                # the fine-tuned late layers
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.adapters._papers import check_finite, check_positive_int, check_real, uniform_arrays

PyTree = Any

__all__ = ["GATE_T", "init_sherl", "downsample", "redundancy", "guidance", "sherl_fuse", "sherl_num_params"]

GATE_T = 0.1  # Sherl_Block.gate_T


def _dense(specs, d_in, d_out):
    b = 1.0 / math.sqrt(d_in)  # torch nn.Linear default: U(-1/sqrt(d_in), 1/sqrt(d_in)) for weight and bias
    specs += [((d_in, d_out), b), ((d_out,), b)]


def init_sherl(key: jax.Array, in_dims: Sequence[int], hidden: int, out_dim: int) -> dict:
    """``{"down": [{fc1, fc2, fc3}] * L, "attn": {kernel [h, 1], bias [1]}, "out": {kernel [h, out], bias},
    "gate": [1]}`` (torch ``nn.Linear`` init, ``gate = 0``); ``in_dims``: widths of ``x_0 .. x_{L-1}`` (L >= 2).

    >>> sherl = init_sherl(jax.random.PRNGKey(0), [64, 64], hidden=16, out_dim=64)
    """
    if len(in_dims) < 2:
        raise ValueError(f"sherl: need at least two intermediate outputs (shallow + deepest), got {len(in_dims)}")
    dims = [check_positive_int(d, "in_dims", "sherl") for d in in_dims]
    h = check_positive_int(hidden, "hidden", "sherl")
    o = check_positive_int(out_dim, "out_dim", "sherl")
    specs: list = []
    for d in dims:
        _dense(specs, d, h)
        _dense(specs, h, h)
        _dense(specs, h, h)
    _dense(specs, h, 1)
    _dense(specs, h, o)
    a = uniform_arrays(key, specs)
    kb = lambda i: {"kernel": a[2 * i], "bias": a[2 * i + 1]}  # noqa: E731
    down = [{"fc1": kb(3 * i), "fc2": kb(3 * i + 1), "fc3": kb(3 * i + 2)} for i in range(len(dims))]
    n = 3 * len(dims)
    return {"down": down, "attn": kb(n), "out": kb(n + 1), "gate": jnp.zeros((1,), jnp.float32)}


def _lin(p, x):
    return x @ p["kernel"] + p["bias"]


def downsample(p: dict, x: jax.Array) -> jax.Array:
    """``D(x) = (W2 u + b2 + u) ⊙ σ(W3 u + b3)``, ``u = relu(W1 x + b1)`` (the reference ``Downsample``)."""
    u = jax.nn.relu(_lin(p["fc1"], x))
    return (_lin(p["fc2"], u) + u) * jax.nn.sigmoid(_lin(p["fc3"], u))


def _l2n(x, eps=1e-6):
    return x / (jnp.sqrt(jnp.sum(x * x, -1, keepdims=True)) + eps)


def redundancy(s: jax.Array) -> jax.Array:
    """``r_i = Σ_j relu(cos(s_i, s_j))`` for ``s [..., N, h]`` -> ``[..., N, 1]`` (``r_i >= 1``: the self term)."""
    n = _l2n(s)
    return jnp.sum(jax.nn.relu(n @ jnp.swapaxes(n, -1, -2)), -1, keepdims=True)


def guidance(attn: dict, guide: jax.Array, shallow: jax.Array) -> jax.Array:
    """``Σ_i α_i s_i + g`` with the anti-redundancy weights ``α`` (``guide [..., h]``, ``shallow [..., N, h]``)."""
    r = redundancy(shallow)
    a = jax.nn.relu(_lin(attn, shallow * guide[..., None, :])) / r
    a = a / (jnp.sum(jnp.abs(a), -2, keepdims=True) + 1e-6)
    return jnp.sum(a * shallow, -2) + guide


def sherl_fuse(sherl: dict, features: Sequence[jax.Array], last: jax.Array | None = None,
               gate_t: float = GATE_T) -> jax.Array:
    """The early route: ``x̃ = W_o relu(f) + b_o + tanh(γ / gate_t) · last`` (``last`` defaults to the deepest
    feature ``x_{L-1}``). ``features``: the frozen outputs ``x_0 .. x_{L-1}`` ([..., d_i] each); they and ``last``
    are wrapped in ``stop_gradient`` (no backward through the backbone). Jit-able.

    >>> x_t = sherl_fuse(sherl, [x, h0], last=h0); logits = late(params, x_t)
    """
    gate_t = check_real(gate_t, "gate_t", "sherl", lo=0, lo_open=True)
    features = list(features)
    if len(features) != len(sherl["down"]):
        raise ValueError(f"sherl: {len(features)} features for {len(sherl['down'])} downsample blocks")
    for i, (x, p) in enumerate(zip(features, sherl["down"])):
        if x.shape[-1] != p["fc1"]["kernel"].shape[0]:
            raise ValueError(f"sherl: feature {i} has width {x.shape[-1]}, block {i} expects "
                             f"{p['fc1']['kernel'].shape[0]}")
    if len({x.shape[:-1] for x in features}) != 1:
        raise ValueError(f"sherl: features disagree on their leading shape: {[x.shape for x in features]}")
    last = features[-1] if last is None else last
    if last.shape[:-1] != features[0].shape[:-1] or last.shape[-1] != sherl["out"]["kernel"].shape[1]:
        raise ValueError(f"sherl: last {last.shape} does not fit the output width {sherl['out']['kernel'].shape[1]}"
                         f" and leading shape {features[0].shape[:-1]}")
    check_finite(sherl, "sherl", "sherl")
    check_finite(features, "features", "sherl")
    sg = jax.lax.stop_gradient
    s = [downsample(p, sg(jnp.asarray(x, jnp.float32))) for p, x in zip(sherl["down"], features)]
    f = guidance(sherl["attn"], s[-1], jnp.stack(s[:-1], -2))
    gate = jnp.tanh(sherl["gate"][0] / gate_t)
    return _lin(sherl["out"], jax.nn.relu(f)) + gate * sg(jnp.asarray(last, jnp.float32))


def sherl_num_params(sherl: dict) -> int:
    """Trainable parameters of the early route."""
    return int(sum(x.size for x in jax.tree.leaves(sherl)))
