"""How much each layer of a decoder contributes: Csordás, Manning & Potts (2025), "Do Language Models Use Their
Depth Efficiently?" (arXiv 2505.13898), §3, on the residual stream of :mod:`jaxmodels.analysis.sublayers`.

Contribution measures (the authors' ``analyze_norms``), per token t, averaged over the (non-padding) tokens::

    rel_attn_l  = ‖a_l‖ / ‖h_l‖              cos_attn_l  = cos(a_l, h_l)
    rel_mlp_l   = ‖m_l‖ / ‖h_l + a_l‖        cos_mlp_l   = cos(m_l, h_l + a_l)
    rel_layer_l = ‖a_l + m_l‖ / ‖h_l‖        cos_layer_l = cos(a_l + m_l, h_l)
    cos_io_l    = cos(h_{l+1}, h_l)

(a negative cosine erases part of the residual, a positive one reinforces it) and the mean norms ‖h_l‖, ‖a_l‖,
‖m_l‖. Skip effects (the authors' ``analyze_future_effects`` with no split position): skip part s (the whole layer,
its attention or its MLP: its update set to 0) for every position from ``no_skip_front`` on (the first token is
kept, as the authors do) and measure, with Δ_l = h_{l+1} − h_l the layer contributions and p = softmax(logits)::

    future[s, l] = R_t ‖Δ_l − Δ'_l‖ / ‖Δ_l‖            (Δ' with part s skipped; 0 for l < s, 1 at l = s)
    output[s]    = R_t ‖p' − p‖₂                       kl[s] = mean_t KL(p ‖ p')

with R_t the maximum over tokens (the authors' reduction) or the mean (``reduce="mean"``). Skipping the
attention recomputes the later MLP from the changed stream (the authors keep that layer's clean MLP output).
The paper's claims: the contributions drop in the second half of the network, and skipping a second-half layer
changes the future layers' contributions and the outputs less than skipping a first-half one.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmodels.analysis.sublayers import decoder_inputs, decoder_sublayers, residual_stream, token_mean
from jaxmodels.tree import is_concrete

__all__ = ["DepthContributions", "SkipEffects", "layer_contributions", "contributions_from_stream", "skip_effects"]

_EPS = 1e-6  # the authors' clamp of the norms in the denominators


class DepthContributions(NamedTuple):
    """Per-layer means over tokens (``[L]``; ``residual_norm`` ``[L+1]``, the last one ‖h_L‖)."""

    residual_norm: jax.Array
    attn_norm: jax.Array
    mlp_norm: jax.Array
    rel_attn: jax.Array
    rel_mlp: jax.Array
    rel_layer: jax.Array
    cos_attn: jax.Array
    cos_mlp: jax.Array
    cos_layer: jax.Array
    cos_io: jax.Array


class SkipEffects(NamedTuple):
    """``future [L, L]`` (row: the part skipped, column: the layer whose contribution changes), ``output [L]``
    (change of the output distribution), ``kl [L]`` (mean KL of the clean from the skipped distribution)."""

    future: jax.Array
    output: jax.Array
    kl: jax.Array


def _norm(x):
    return jnp.linalg.norm(x.astype(jnp.float32), axis=-1)


def _cos(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(a * b, -1) / (jnp.maximum(_norm(a), _EPS) * jnp.maximum(_norm(b), _EPS))


@jax.jit
def contributions_from_stream(hidden: jax.Array, attn: jax.Array, mlp: jax.Array,
                              token_weight: jax.Array) -> DepthContributions:
    """The measures of the module docstring from a residual stream (``hidden [L+1, B, T, d]``, ``attn`` /
    ``mlp [L, B, T, d]``, as :func:`jaxmodels.analysis.sublayers.residual_stream` returns) and token weights
    ``[B, T]`` (1 = real token, 0 = padding). Pure and jit-able.

    >>> s = residual_stream(model, params, ids)
    >>> contributions_from_stream(s.hidden, s.attn, s.mlp, jnp.ones(ids.shape)).rel_layer
    """
    h, after = hidden[:-1], hidden[:-1] + attn
    lay = attn + mlp
    w = token_weight
    m = functools.partial(token_mean, weight=w)
    return DepthContributions(
        residual_norm=m(_norm(hidden)), attn_norm=m(_norm(attn)), mlp_norm=m(_norm(mlp)),
        rel_attn=m(_norm(attn) / jnp.maximum(_norm(h), _EPS)),
        rel_mlp=m(_norm(mlp) / jnp.maximum(_norm(after), _EPS)),
        rel_layer=m(_norm(lay) / jnp.maximum(_norm(h), _EPS)),
        cos_attn=m(_cos(attn, h)), cos_mlp=m(_cos(mlp, after)), cos_layer=m(_cos(lay, h)),
        cos_io=m(_cos(hidden[1:], h)))


def layer_contributions(model, params, batch, attention_mask=None) -> DepthContributions:
    """:class:`DepthContributions` of ``model`` (a Llama-family or GPT-2 decoder) on ``batch`` (ids ``[B, T]`` or a
    dict with ``input_ids`` / ``attention_mask``; padding tokens weigh 0).

    >>> c = layer_contributions(model, params, calib_ids)
    >>> c.rel_layer            # [L]: ‖a_l + m_l‖ / ‖h_l‖ averaged over the tokens
    """
    _, am = decoder_inputs(batch, attention_mask)
    s = residual_stream(model, params, batch, attention_mask)
    return contributions_from_stream(s.hidden, s.attn, s.mlp, am)


_PARTS = ("layer", "attn", "mlp")


@functools.partial(jax.jit, static_argnums=(5,))
def _effects(d0, p0, stream_hidden, logits, w, reduce):
    d = stream_hidden[1:] - stream_hidden[:-1]
    p = jax.nn.softmax(logits, -1)

    def red(x):  # [B, T] -> scalar over the measured tokens
        if reduce == "max":
            return jnp.max(jnp.where(w > 0, x, -jnp.inf))
        return token_mean(x, w)

    rel = _norm(d0 - d) / jnp.maximum(_norm(d0), _EPS)  # [L, B, T]
    kl = token_mean(jnp.sum(jax.scipy.special.xlogy(p0, p0) - jax.scipy.special.xlogy(p0, p), -1), w)
    return jax.vmap(red)(rel), red(jnp.linalg.norm(p - p0, axis=-1)), kl


def skip_effects(model, params, batch, attention_mask=None, *, part: str = "layer", no_skip_front: int = 1,
                 reduce: str = "max") -> SkipEffects:
    """:class:`SkipEffects` of skipping each layer's ``part`` (``"layer"``, ``"attn"`` or ``"mlp"``) in turn, for
    positions ``>= no_skip_front`` (module docstring); ``reduce``: ``"max"`` over tokens (the paper) or ``"mean"``.
    The L skipped models run through the one compiled program of ``residual_stream`` (the skips are gates).

    >>> e = skip_effects(model, params, calib_ids, reduce="mean")
    >>> e.future[0]            # how much skipping layer 0 changes every layer's contribution
    """
    if part not in _PARTS:
        raise ValueError(f"skip_effects: part must be one of {_PARTS}, got {part!r}")
    if reduce not in ("max", "mean"):
        raise ValueError(f"skip_effects: reduce must be 'max' or 'mean', got {reduce!r}")
    sub = decoder_sublayers(model)
    ids, am = decoder_inputs(batch, attention_mask, getattr(model.config, "vocab_size", None))
    if int(no_skip_front) != no_skip_front or not 0 <= no_skip_front < ids.shape[1]:
        raise ValueError(f"skip_effects: no_skip_front must be an integer in [0, {ids.shape[1]}), got "
                         f"{no_skip_front!r}")
    n, t = sub.num_layers, ids.shape[1]
    pos = (jnp.arange(t) >= no_skip_front).astype(jnp.float32)  # 1 where the skip applies
    w = am.astype(jnp.float32) * pos[None]
    ones = jnp.ones((n, 2, t), jnp.float32)
    s0 = residual_stream(model, params, ids, am, gates=ones)
    d0, p0 = s0.hidden[1:] - s0.hidden[:-1], jax.nn.softmax(s0.logits, -1)
    rows = []
    for s in range(n):
        g = ones
        for c in {"layer": (0, 1), "attn": (0,), "mlp": (1,)}[part]:
            g = g.at[s, c].set(1.0 - pos)
        st = residual_stream(model, params, ids, am, gates=g)
        rows.append(_effects(d0, p0, st.hidden, st.logits, w, reduce))
    out = SkipEffects(*(jnp.stack([r[k] for r in rows]) for k in range(3)))
    if is_concrete(out.output) and not bool(jnp.all(jnp.isfinite(out.future))):
        raise FloatingPointError("skip_effects: non-finite effects (NaN/Inf in the model's activations?)")
    return out
