"""Which blocks, attention and MLP sublayers a decoder can drop: He et al. (2024), "What Matters in Transformers?
Not All Attention is Needed" (arXiv 2406.15786; the authors' LLM-Drop code, ``block_drop.py`` / ``layer_drop.py``).

Redundancy of a module = one minus the cosine similarity of its input and output hidden states, averaged over the
calibration tokens (the paper's importance; higher = more important). On the residual stream of
:mod:`jaxmodels.analysis.sublayers` (``h_l`` into block l, ``a_l`` / ``m_l`` its attention / MLP updates)::

    S_block_l = 1 − mean_t cos(h_l, h_{l+1})
    S_attn_l  = 1 − mean_t cos(h_l, h_l + a_l)                  (LLM-Drop's ``layer_drop_norm=True``: the input of
    S_mlp_l   = 1 − mean_t cos(h_l + a_l, h_l + a_l + m_l)       the sublayer's pre-norm and the residual output)

all from one pass of the unpruned model (the reference's one-shot "discrete" dropping; padding tokens weigh 0,
the reference averages over its unpadded windows). Drop procedures (``target``), each removing the ``n``
lowest-S modules:

* ``"block"`` — Block Drop: whole blocks ranked by ``S_block``;
* ``"attn"`` — Attention Drop: attention sublayers ranked by ``S_attn`` (the MLPs stay);
* ``"mlp"`` — MLP Drop, the paper's comparison;
* ``"joint"`` — Joint Layer Drop: the 2L scores ``[S_attn, S_mlp]`` ranked together (ties: attention first).

The reduced model is a :class:`~jaxmodels.analysis.sublayers.KeptSublayers` structure plus the params without
the dropped sub-trees (:func:`~jaxmodels.analysis.sublayers.drop_sublayer_params`); it runs with
:func:`~jaxmodels.analysis.sublayers.sublayer_forward` / ``sublayer_apply`` (dropped sublayers are not computed),
and a Block Drop result becomes a plain smaller model with
:func:`~jaxmodels.analysis.sublayers.remove_blocks`. Not implemented: the reference's iterative dropping (scores
recomputed after each drop) and consecutive-block dropping.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.analysis.sublayers import (KeptSublayers, decoder_inputs, decoder_sublayers, drop_sublayer_params,
                                          residual_stream)

__all__ = ["RedundancyScores", "LayerDropConfig", "redundancy_from_stream", "redundancy_scores", "select_drops",
           "random_drops", "layer_drop", "DROP_TARGETS"]

DROP_TARGETS = ("block", "attn", "mlp", "joint")


class RedundancyScores(NamedTuple):
    """``S = 1 − mean cos(input, output)`` per block, attention and MLP sublayer (``[L]`` float32 each)."""

    block: jax.Array
    attn: jax.Array
    mlp: jax.Array


def _cos(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    den = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)
    return jnp.sum(a * b, -1) / den


@jax.jit
def _cos_sums(hidden, attn, mlp, token_weight):
    w = jnp.asarray(token_weight, jnp.float32)
    h, after = hidden[:-1], hidden[:-1] + attn
    cs = jnp.stack([_cos(h, hidden[1:]), _cos(h, after), _cos(after, hidden[1:])])  # [3, L, B, T]
    return jnp.sum(cs * w, axis=(-2, -1)), jnp.sum(w)


def redundancy_from_stream(hidden: jax.Array, attn: jax.Array, mlp: jax.Array,
                           token_weight: jax.Array) -> RedundancyScores:
    """The scores of the module docstring from one residual stream (``hidden [L+1, B, T, d]``, ``attn`` / ``mlp
    [L, B, T, d]``) and token weights ``[B, T]``. Pure and jit-able.

    >>> s = residual_stream(model, params, ids)
    >>> redundancy_from_stream(s.hidden, s.attn, s.mlp, jnp.ones(ids.shape)).attn
    """
    sums, w = _cos_sums(hidden, attn, mlp, token_weight)
    s = 1.0 - sums / jnp.maximum(w, 1e-30)
    return RedundancyScores(s[0], s[1], s[2])


def _batches(calib) -> list:
    batches = list(calib) if isinstance(calib, (list, tuple)) else [calib]
    if not batches:
        raise ValueError("calib: no calibration batch")
    return batches


def redundancy_scores(params, model, calib) -> RedundancyScores:
    """:class:`RedundancyScores` of ``model`` (Llama family or GPT-2) on ``calib``: one batch (ids ``[B, T]`` or
    a dict with ``input_ids`` / ``attention_mask``) or a list of them; the means run over all their tokens.

    >>> sc = redundancy_scores(params, model, {"input_ids": calib_ids})
    >>> sc.attn.mean() < sc.mlp.mean()          # attention is the more redundant sublayer
    """
    decoder_sublayers(model)  # ValueError for a model without a sublayer split
    vocab = getattr(model.config, "vocab_size", None)
    total, weight = 0.0, 0.0
    for b in _batches(calib):
        ids, am = decoder_inputs(b, None, vocab)
        s = residual_stream(model, params, ids, am)
        sums, w = _cos_sums(s.hidden, s.attn, s.mlp, am)
        total, weight = total + sums, weight + w
    if not float(weight) > 0:
        raise ValueError("calib: every token is padding")
    s = 1.0 - total / weight
    if not bool(jnp.all(jnp.isfinite(s))):
        raise FloatingPointError("redundancy_scores: non-finite scores (NaN/Inf in the model's activations?)")
    return RedundancyScores(s[0], s[1], s[2])


def _check(num_layers, n, target):
    if target not in DROP_TARGETS:
        raise ValueError(f"target must be one of {DROP_TARGETS}, got {target!r}")
    cap = 2 * num_layers if target == "joint" else num_layers
    if int(n) != n or not 0 <= n <= cap or (target == "block" and n >= num_layers):
        raise ValueError(f"n must be an integer in [0, {cap - (target == 'block')}] for target {target!r} and "
                         f"{num_layers} layers, got {n!r}")


def _keep(num_layers, target, order: Sequence[int]) -> KeptSublayers:
    if target == "block":
        return KeptSublayers.without(num_layers, blocks=order)
    if target == "attn":
        return KeptSublayers.without(num_layers, attn=order)
    if target == "mlp":
        return KeptSublayers.without(num_layers, mlp=order)
    return KeptSublayers.without(num_layers, attn=[i for i in order if i < num_layers],
                                 mlp=[i - num_layers for i in order if i >= num_layers])


def select_drops(scores: RedundancyScores, n: int, target: str = "attn") -> KeptSublayers:
    """The :class:`KeptSublayers` with the ``n`` lowest-S modules of ``target`` dropped (module docstring; a
    stable sort: among equal scores the lower index, and attention before MLP, goes first).

    >>> keep = select_drops(scores, 1, "attn")      # Attention Drop of the most redundant attention sublayer
    """
    L = int(np.asarray(scores.block).shape[0])
    _check(L, n, target)
    s = {"block": scores.block, "attn": scores.attn, "mlp": scores.mlp}.get(target)
    s = np.concatenate([np.asarray(scores.attn), np.asarray(scores.mlp)]) if target == "joint" else np.asarray(s)
    if not np.all(np.isfinite(s)):
        raise ValueError("select_drops: scores contain NaN/Inf")
    return _keep(L, target, [int(i) for i in np.argsort(s, kind="stable")[:int(n)]])


def random_drops(num_layers: int, n: int, target: str = "joint", seed: int = 0) -> KeptSublayers:
    """``n`` modules of ``target`` dropped uniformly at random (the papers' random baseline).

    >>> keep = random_drops(3, 1, "joint", seed=0)
    """
    _check(num_layers, n, target)
    m = 2 * num_layers if target == "joint" else num_layers
    return _keep(num_layers, target, [int(i) for i in np.random.default_rng(seed).permutation(m)[:int(n)]])


@dataclasses.dataclass(frozen=True)
class LayerDropConfig:
    """``n`` modules of ``target`` (``"block"``, ``"attn"``, ``"mlp"`` or ``"joint"``) to drop."""

    n: int
    target: str = "attn"

    def __post_init__(self):
        if self.target not in DROP_TARGETS:
            raise ValueError(f"LayerDropConfig.target must be one of {DROP_TARGETS}, got {self.target!r}")
        if int(self.n) != self.n or self.n < 0:
            raise ValueError(f"LayerDropConfig.n must be a non-negative integer, got {self.n!r}")


def layer_drop(params, model, calib, config: LayerDropConfig) -> tuple[Any, dict]:
    """Block / Attention / MLP / Joint Layer Drop (module docstring): ``(reduced params, report)``.

    The reduced params lack the dropped sub-trees; run them with ``sublayer_apply(model, report["keep"])`` (or,
    for ``"block"``, ``remove_blocks(model, params, report["blocks"])``). ``report``: ``method``, ``config``,
    ``scores`` (:class:`RedundancyScores`, NumPy), ``keep``, ``dropped`` (``[("attn" | "mlp", layer), ...]`` in
    layer order) and ``blocks`` (the fully removed blocks). The input is not modified.

    >>> q, rep = layer_drop(params, model, calib, LayerDropConfig(1, "attn"))
    >>> logits = sublayer_apply(model, rep["keep"])(q, ids)
    """
    sub = decoder_sublayers(model)
    _check(sub.num_layers, config.n, config.target)
    scores = redundancy_scores(params, model, calib)
    keep = select_drops(scores, config.n, config.target)
    dropped = [(k, i) for i in range(sub.num_layers) for k, kept in (("attn", keep.attn[i]), ("mlp", keep.mlp[i]))
               if not kept]
    blocks = [i for i in range(sub.num_layers) if not keep.attn[i] and not keep.mlp[i]]
    report = {"method": "layer_drop", "config": config, "keep": keep, "dropped": dropped, "blocks": blocks,
              "scores": RedundancyScores(*(np.asarray(x) for x in scores))}
    return drop_sublayer_params(params, model, keep), report
