"""Block removal that recycles or shares the remaining weights: FuseGPT (Pei et al., 2024, "FuseGPT: Learnable
Layers Fusion of Generative Pre-trained Transformers", arXiv 2411.14507) and FoldGPT (Liu et al., 2024, "FoldGPT:
Simple and Effective Large Language Model Compression Scheme", arXiv 2407.00928), on the Llama family and GPT-2
(:mod:`jaxmodels.analysis.sublayers` runs the blocks from the params; the results are plain smaller models).

FuseGPT (rules from the authors' code, ``fuse_utils.py`` / ``run_fusion.py``). Macro Influence of block i, from
the final hidden states h_L of the model with and without it (the least influential block is removed first)::

    MI_i = 1 − mean_t cos(h_L, h_L^{−i})

The removed block r is fused into the other blocks of its group G (``group_size`` consecutive blocks around r,
r included, the reference's window): every linear W [in, out] (bias b) of a block j ∈ G \\ {r} becomes, with R
(b_R) the same-named linear of block r::

    W' = W + A B + (U V) ⊙ R,    b' = b + c ⊙ b_R       (A [in, k], U [in, k]: kaiming-uniform; B, V, c: zeros)

so training starts from plain removal. W and R are frozen; A, B, U, V, c, the norms and biases are trained with
Adam (cosine decay; ``lr_coef`` for U, V, c, ``lr`` for the rest) so that G \\ {r} applied to G's inputs matches
G's outputs in the current model: KL(softmax(Y) ‖ softmax(Ŷ)) over the hidden features per token (``loss="kl"``;
the reference takes its softmax over the batch axis of a mini-batch) or ``‖Ŷ − Y‖² / ‖Y‖²`` (``loss="mse"``).
Then W', b' are merged and r is removed; with ``iterative=True`` (the reference's ``--iterative``) MI is recomputed
after each removal.

FoldGPT (no reference code is public; the rules below are the closest to the paper's description, §3).
(1) Gated block removal: learnable block gates g ∈ [0, 1]^L scale both residual updates of each block (h_{l+1} =
h_l + g_l a_l + g_l m_l, coupling the blocks since all gates train together) to minimise
KL(p_teacher ‖ p_gated) + λ (t Σ_l g_l − Σ_l |g_l − ḡ|) — the paper's "polarization-friendly" regulariser is
taken as the polarization regulariser of Zhuang et al. (2020), the FLOPs constraint as the uniform L1 term (all
blocks cost the same) — with Adam, projected to [0, 1]; the n lowest gates are removed. (2) Group parameter
sharing: the retained blocks, in order, form groups of ``group_size``; all blocks of a group use the linear
weights of the group's highest-gate block (unsourced choice) and keep their own norms. (3) Light adaptation:
only the norm scales are fine-tuned ("layernorm re-adaptation") on KL(p_teacher ‖ p_student) plus the tail-layer
distillation term β ‖h_L^s − h_L^t‖² / ‖h_L^t‖² (the last hidden state matched to the teacher's).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxmodels.analysis.sublayers import (decoder_inputs, decoder_sublayers, remove_blocks, residual_stream,
                                          sublayer_forward)
from jaxmodels.progress import progress_bar
from jaxmodels.tree import flatten, unflatten

__all__ = ["FuseGPTConfig", "FoldGPTConfig", "Reduced", "macro_influence", "fuse_group", "fusegpt", "block_gates",
           "share_groups", "foldgpt", "unique_param_count"]

PyTree = Any


class Reduced(NamedTuple):
    """A smaller model: ``model`` (the same class, fewer layers), ``params`` (its params tree; shared blocks hold
    the same arrays) and ``report``."""

    model: Any
    params: PyTree
    report: dict


def _batches(calib, vocab):
    batches = list(calib) if isinstance(calib, (list, tuple)) else [calib]
    if not batches:
        raise ValueError("calib: no calibration batch")
    return [decoder_inputs(b, None, vocab) for b in batches]


def _cos(a, b):
    den = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)
    return jnp.sum(a * b, -1) / den


def _wmean(x, w):
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-30)


# ------------------------------------------------------------------------------------------------ FuseGPT


@jax.jit
def _cos_sum(h_full, h, w):
    return jnp.sum(_cos(h_full.astype(jnp.float32), h.astype(jnp.float32)) * w), jnp.sum(w)


def macro_influence(params, model, calib) -> np.ndarray:
    """FuseGPT's Macro Influence ``MI_i = 1 − mean_t cos(h_L, h_L^{−i})`` of every block (module docstring),
    ``[L]`` float32 NumPy, on ``calib`` (a batch or a list of batches; padding weighs 0). One compiled program
    runs the L models without one block each (the removal is a gate: one compiled forward).

    >>> mi = macro_influence(params, model, calib)
    >>> int(np.argmin(mi))      # the block FuseGPT removes first
    """
    n = decoder_sublayers(model).num_layers
    tot, wt = np.zeros(n), 0.0
    for ids, am in _batches(calib, model.config.vocab_size):
        h_full = sublayer_forward(model, params, ids, am)[1]
        w = am.astype(jnp.float32)
        for i in range(n):
            h = sublayer_forward(model, params, ids, am, gates=jnp.ones((n, 2), jnp.float32).at[i].set(0.0))[1]
            s, ws = _cos_sum(h_full, h, w)
            tot[i] += float(s)
        wt += float(ws)
    mi = np.asarray(1.0 - tot / wt, np.float32)
    if not np.all(np.isfinite(mi)):
        raise FloatingPointError("macro_influence: non-finite values (NaN/Inf in the model's activations?)")
    return mi


def fuse_group(index: int, num_layers: int, group_size: int) -> list[int]:
    """The blocks (``index`` included) FuseGPT fuses block ``index`` into: ``group_size`` consecutive blocks,
    ``index − 1 − (g/2 − 1) .. index + g/2 − 1`` shifted inside ``[0, num_layers)`` (the reference's window).

    >>> fuse_group(5, 32, 8)
    [1, 2, 3, 4, 5, 6, 7, 8]
    """
    if not 0 <= index < num_layers:
        raise ValueError(f"fuse_group: index {index} out of range for {num_layers} layers")
    g = min(int(group_size), num_layers)
    if g < 2:
        raise ValueError(f"fuse_group: group_size must be >= 2, got {group_size}")
    if index == 0 or index - 1 - (g / 2 - 1) < 0:
        return list(range(0, g))
    if index + (g / 2 - 1) > num_layers - 1:
        return list(range(num_layers - g, num_layers))
    start = index - 1 - (g // 2 - 1)
    return list(range(start, start + g))


@dataclasses.dataclass(frozen=True)
class FuseGPTConfig:
    """``n_remove`` blocks; ``group_size`` (r included; the reference's default 8, capped at L), ``rank`` of the
    LoRA and of the coefficient factors (capped at min(in, out); reference 128), ``epochs`` over the calibration
    batches (one Adam step per batch; reference 20), ``lr`` (LoRA, norms, biases; reference 9.65e-6), ``lr_coef``
    (reference 1e-3), ``loss`` (``"kl"`` or ``"mse"``), ``iterative`` (recompute MI after each removal),
    ``seed`` (the kaiming-uniform factors)."""

    n_remove: int = 1
    group_size: int = 8
    rank: int = 128
    epochs: int = 20
    lr: float = 9.65e-6
    lr_coef: float = 1e-3
    loss: str = "kl"
    iterative: bool = True
    seed: int = 0

    def __post_init__(self):
        if int(self.n_remove) != self.n_remove or self.n_remove < 0:
            raise ValueError(f"FuseGPTConfig.n_remove must be a non-negative integer, got {self.n_remove!r}")
        for f in ("group_size", "rank", "epochs"):
            v = getattr(self, f)
            if int(v) != v or v < (2 if f == "group_size" else 1):
                raise ValueError(f"FuseGPTConfig.{f} must be an integer >= {2 if f == 'group_size' else 1}, "
                                 f"got {v!r}")
        for f in ("lr", "lr_coef"):
            if not (math.isfinite(getattr(self, f)) and getattr(self, f) >= 0):
                raise ValueError(f"FuseGPTConfig.{f} must be finite and >= 0, got {getattr(self, f)!r}")
        if self.loss not in ("kl", "mse"):
            raise ValueError(f"FuseGPTConfig.loss must be 'kl' or 'mse', got {self.loss!r}")


def _linears(block) -> list[str]:
    return [p[:-len("/kernel")] for p, v in flatten(block).items() if p.endswith("/kernel") and v.ndim == 2]


@functools.partial(jax.jit, static_argnums=2)
def _fusion_init(block, key, rank):
    """Trainable fusion factors of one target block: ``{"lora": {name: (A, B)}, "coef": {name: (U, V)},
    "cb": {name: c}}``."""
    flat = flatten(block)
    out = {"lora": {}, "coef": {}, "cb": {}}
    for i, n in enumerate(_linears(block)):
        w = flat[n + "/kernel"]
        d_in, d_out = w.shape
        k = min(rank, d_in, d_out)
        bound = 1.0 / math.sqrt(d_in)  # torch kaiming_uniform_(a=sqrt(5)) on fan_in = in
        ka, ku = jax.random.split(jax.random.fold_in(key, i))
        out["lora"][n] = (jax.random.uniform(ka, (d_in, k), jnp.float32, -bound, bound), jnp.zeros((k, d_out)))
        out["coef"][n] = (jax.random.uniform(ku, (d_in, k), jnp.float32, -bound, bound), jnp.zeros((k, d_out)))
        if n + "/bias" in flat:
            out["cb"][n] = jnp.zeros((d_out,), jnp.float32)
    return out


def _fused_block(block, free, removed, fac):
    """Block params with W' = W + A B + (U V) ⊙ R and b' = b + c ⊙ b_R; ``free`` holds the trainable non-kernel
    leaves (norm scales, biases) that replace the block's."""
    flat = dict(flatten(block))
    flat.update(free)
    rflat = flatten(removed)
    for n, (a, b) in fac["lora"].items():
        w = flat[n + "/kernel"]
        u, v = fac["coef"][n]
        flat[n + "/kernel"] = (w.astype(jnp.float32) + a @ b + (u @ v) * rflat[n + "/kernel"]).astype(w.dtype)
        if n in fac["cb"]:
            bias = flat[n + "/bias"]
            flat[n + "/bias"] = (bias + fac["cb"][n] * rflat[n + "/bias"]).astype(bias.dtype)
    return unflatten(flat, like=block)


def _free_leaves(block):
    return {p: v for p, v in flatten(block).items() if not p.endswith("/kernel")}


def _apply_blocks(sub, blocks, idx, h, ctx):
    for bp, i in zip(blocks, idx):
        h = h + sub.attn(bp, h, ctx, i)
        h = h + sub.mlp(bp, h)
    return h


def _ctx(sub, params, ids, am):
    return sub.embed(params, ids, am)[1]


def _distill(y_hat, y, w, kind):
    y_hat, y = y_hat.astype(jnp.float32), y.astype(jnp.float32)
    if kind == "kl":
        lp, lq = jax.nn.log_softmax(y, -1), jax.nn.log_softmax(y_hat, -1)
        return _wmean(jnp.sum(jnp.exp(lp) * (lp - lq), -1), w)
    return _wmean(jnp.sum((y_hat - y) ** 2, -1), w) / jnp.maximum(_wmean(jnp.sum(y * y, -1), w), 1e-30)


# One Adam over the flattened trainable vector (one update op for the whole tree: small programs to compile), with
# a per-entry learning rate and cosine decay to 0 over the run.


def _adam_init(theta, lr_tree):
    vec, unravel = ravel_pytree(theta)
    lrs = ravel_pytree(jax.tree_util.tree_map(lambda x, lr: jnp.full(x.shape, lr, jnp.float32), theta, lr_tree))[0]
    z = jnp.zeros_like(vec)
    return vec, unravel, lrs, (z, z, jnp.zeros((), jnp.int32))


def _adam_update(vec, grad, state, lrs, total, b1=0.9, b2=0.95, eps=1e-8):
    m, v, k = state
    k = k + 1
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    kf = k.astype(jnp.float32)
    frac = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(kf - 1.0, total) / jnp.maximum(total, 1.0)))
    upd = (m / (1 - b1 ** kf)) / (jnp.sqrt(v / (1 - b2 ** kf)) + eps)
    return vec - frac * lrs * upd, (m, v, k)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _fuse_step(sub, targets, kind, unravel, vec, state, lrs, total, fz, ids, am, x, y):
    def loss_fn(v):
        th = unravel(v)
        blocks = [_fused_block(b, fr, fz["removed"], fa) for b, fr, fa in zip(fz["blocks"], th["free"], th["fac"])]
        y_hat = _apply_blocks(sub, blocks, targets, x, _ctx(sub, fz["params"], ids, am))
        return _distill(y_hat, y, am.astype(jnp.float32), kind)

    loss, g = jax.value_and_grad(loss_fn)(vec)
    vec, state = _adam_update(vec, g, state, lrs, total)
    return vec, state, loss


class _Unravel:
    """``ravel_pytree``'s inverse, hashed by the tree structure and shapes (a static jit argument that compiles
    once per structure)."""

    def __init__(self, fn, like):
        self.fn = fn
        self.key = (jax.tree_util.tree_structure(like),
                    tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(like)))

    def __call__(self, v):
        return self.fn(v)

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Unravel) and other.key == self.key


@functools.partial(jax.jit, static_argnums=0)
def _merge(unravel, vec, fz):
    th = unravel(vec)
    return [_fused_block(b, fr, fz["removed"], fa) for b, fr, fa in zip(fz["blocks"], th["free"], th["fac"])]


def _fuse_once(model, params, batches, r, cfg, key):
    sub = decoder_sublayers(model)
    group = fuse_group(r, sub.num_layers, cfg.group_size)
    targets = tuple(j for j in group if j != r)
    blocks = {j: params[sub.block_paths[j]] for j in group}
    data = []
    for ids, am in batches:  # inputs of the group and its outputs in the current model
        s = residual_stream(model, params, ids, am)
        data.append((ids, am, s.hidden[group[0]], s.hidden[group[-1] + 1]))
    fac = [_fusion_init(blocks[j], jax.random.fold_in(key, j), cfg.rank) for j in targets]
    theta = {"fac": fac, "free": [_free_leaves(blocks[j]) for j in targets]}
    lr_tree = {"fac": [{"lora": jax.tree_util.tree_map(lambda _: cfg.lr, f["lora"]),
                        "coef": jax.tree_util.tree_map(lambda _: cfg.lr_coef, f["coef"]),
                        "cb": jax.tree_util.tree_map(lambda _: cfg.lr_coef, f["cb"])} for f in fac],
               "free": jax.tree_util.tree_map(lambda _: cfg.lr, theta["free"])}
    vec, unravel, lrs, state = _adam_init(theta, lr_tree)
    unravel = _Unravel(unravel, theta)
    fz = {"blocks": [blocks[j] for j in targets], "removed": blocks[r], "params": params}
    total = jnp.float32(cfg.epochs * len(data))
    losses = []
    for _ in range(cfg.epochs):
        for d in data:
            vec, state, loss = _fuse_step(sub, targets, cfg.loss, unravel, vec, state, lrs, total, fz, *d)
            losses.append(loss)
    losses = np.asarray(losses, np.float32)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError("fusegpt: the fusion loss is not finite")
    new = dict(params)
    for j, b in zip(targets, _merge(unravel, vec, fz)):
        new[sub.block_paths[j]] = b
    small, p2 = remove_blocks(model, new, [r])
    return small, p2, {"removed": r, "group": group, "loss_first": float(losses[0]), "loss_last": float(losses[-1])}


def fusegpt(params, model, calib, config: FuseGPTConfig, *, progress: bool | None = None) -> Reduced:
    """FuseGPT (module docstring): remove ``config.n_remove`` blocks by Macro Influence, each fused into its group
    by trained low-rank coefficients; :class:`Reduced` with a plain ``L − n``-block model. ``report``:
    ``method``, ``config``, ``removed`` (indices in the original numbering, in removal order), ``steps`` (per
    removal: ``removed`` (current numbering), ``group``, ``loss_first`` / ``loss_last`` of the fusion training),
    ``influence`` (the first MI). The input is not modified. ``progress``: a bar over the removals
    (:func:`jaxmodels.progress.progress_bar`; off with ``WEIGHTLAB_NO_PROGRESS=1``).

    >>> small, p2, rep = fusegpt(params, model, calib_batches, FuseGPTConfig(1, epochs=5, lr=1e-3))
    >>> small.apply({"params": p2}, ids)
    """
    sub = decoder_sublayers(model)
    if config.n_remove >= sub.num_layers:
        raise ValueError(f"fusegpt: cannot remove {config.n_remove} of {sub.num_layers} blocks")
    batches = _batches(calib, model.config.vocab_size)
    key = jax.random.PRNGKey(config.seed)
    orig = list(range(sub.num_layers))
    cur_m, cur_p, mi0, order, steps = model, params, None, None, []
    for k in progress_bar(range(config.n_remove), progress, desc="FuseGPT block removals"):
        if config.iterative or order is None:
            mi = macro_influence(cur_p, cur_m, [dict(input_ids=i, attention_mask=a) for i, a in batches])
            mi0 = mi if mi0 is None else mi0
            order = [int(i) for i in np.argsort(mi, kind="stable")]
            r = order[0]
        else:  # one-shot ranking: the next block of the first ranking, in the current numbering
            r = order[k] - sum(1 for x in steps if x["original"] < order[k])
        cur_m, cur_p, info = _fuse_once(cur_m, cur_p, batches, r, config, jax.random.fold_in(key, k))
        info["original"] = orig.pop(r)
        steps.append(info)
    return Reduced(cur_m, cur_p, {"method": "fusegpt", "config": config, "removed": [s["original"] for s in steps],
                                  "steps": steps, "influence": mi0})


# ------------------------------------------------------------------------------------------------ FoldGPT


@dataclasses.dataclass(frozen=True)
class FoldGPTConfig:
    """``n_remove`` blocks; ``group_size`` retained blocks per shared group (1 = no sharing); gate training
    ``gate_steps`` Adam steps at ``gate_lr`` with the polarization weight ``polar`` and its ``t``; adaptation
    ``epochs`` over the calibration batches at ``lr`` with tail-distillation weight ``beta``."""

    n_remove: int = 1
    group_size: int = 2
    gate_steps: int = 50
    gate_lr: float = 0.05
    polar: float = 1e-3
    t: float = 1.2
    epochs: int = 10
    lr: float = 1e-3
    beta: float = 1.0

    def __post_init__(self):
        for f, lo in (("n_remove", 0), ("group_size", 1), ("gate_steps", 0), ("epochs", 0)):
            v = getattr(self, f)
            if int(v) != v or v < lo:
                raise ValueError(f"FoldGPTConfig.{f} must be an integer >= {lo}, got {v!r}")
        for f in ("gate_lr", "polar", "t", "lr", "beta"):
            v = getattr(self, f)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"FoldGPTConfig.{f} must be finite and >= 0, got {v!r}")


def _kl_logits(teacher, student, w):
    lp, lq = jax.nn.log_softmax(teacher, -1), jax.nn.log_softmax(student, -1)
    return _wmean(jnp.sum(jnp.exp(lp) * (lp - lq), -1), w)


@functools.partial(jax.jit, static_argnums=(0,))
def _gate_step(model, g, state, lrs, total, polar, t, params, ids, am, teacher):
    def loss_fn(g):
        z = sublayer_forward(model, params, ids, am, gates=jnp.stack([g, g], 1))[0]
        reg = t * jnp.sum(jnp.abs(g)) - jnp.sum(jnp.abs(g - jnp.mean(g)))
        return _kl_logits(teacher, z, am.astype(jnp.float32)) + polar * reg

    loss, grad = jax.value_and_grad(loss_fn)(g)
    g, state = _adam_update(g, grad, state, lrs, total)
    return jnp.clip(g, 0.0, 1.0), state, loss


def block_gates(params, model, calib, config: FoldGPTConfig = FoldGPTConfig(), *,
                progress: bool | None = None) -> np.ndarray:
    """FoldGPT's learned block gates ``g ∈ [0, 1]^L`` (module docstring, step 1: ``gate_steps`` Adam steps,
    cycling over the calibration batches, cosine-decayed ``gate_lr``), NumPy float32; the blocks with the lowest
    gates are the ones to remove. ``progress``: a bar over the steps.

    >>> g = block_gates(params, model, calib, FoldGPTConfig(gate_steps=40))
    """
    sub = decoder_sublayers(model)
    batches = _batches(calib, model.config.vocab_size)
    teach = [sublayer_forward(model, params, ids, am)[0] for ids, am in batches]
    g, _, lrs, state = _adam_init(jnp.ones((sub.num_layers,), jnp.float32), config.gate_lr)
    total = jnp.float32(config.gate_steps)
    for k in progress_bar(range(config.gate_steps), progress, desc="FoldGPT gates"):
        ids, am = batches[k % len(batches)]
        g, state, _ = _gate_step(model, g, state, lrs, total, jnp.float32(config.polar), jnp.float32(config.t),
                                 params, ids, am, teach[k % len(batches)])
    g = np.asarray(g, np.float32)
    if not np.all(np.isfinite(g)):
        raise FloatingPointError("block_gates: non-finite gates")
    return g


def share_groups(kept: list[int], group_size: int, importance=None) -> list[tuple[list[int], int]]:
    """The retained blocks ``kept`` (in order) cut into consecutive groups of ``group_size``; each group with its
    anchor, the block whose linear weights the group shares (the highest ``importance``, default the first).

    >>> share_groups([0, 2, 3, 5], 2, importance=[1.0, 0.2, 0.9, 0.7, 0.1, 0.8])
    [([0, 2], 0), ([3, 5], 5)]
    """
    if int(group_size) != group_size or group_size < 1:
        raise ValueError(f"share_groups: group_size must be a positive integer, got {group_size!r}")
    out = []
    for s in range(0, len(kept), int(group_size)):
        grp = list(kept[s:s + int(group_size)])
        anchor = grp[0] if importance is None else max(grp, key=lambda i: (float(importance[i]), -i))
        out.append((grp, anchor))
    return out


def unique_param_count(params: PyTree) -> int:
    """Number of parameters counting every distinct array once (shared blocks count once)."""
    seen, n = set(), 0
    for v in jax.tree_util.tree_leaves(params):
        if id(v) not in seen:
            seen.add(id(v))
            n += int(np.prod(v.shape))
    return n


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fold_step(small, unravel, vec, state, lrs, total, beta, frozen, ids, am, tz, th):
    def loss_fn(v):
        z, h = sublayer_forward(small, unflatten({**frozen, **unravel(v)}), ids, am)
        w = am.astype(jnp.float32)
        tail = _wmean(jnp.sum((h - th) ** 2, -1), w) / jnp.maximum(_wmean(jnp.sum(th * th, -1), w), 1e-30)
        return _kl_logits(tz, z, w) + beta * tail

    loss, g = jax.value_and_grad(loss_fn)(vec)
    vec, state = _adam_update(vec, g, state, lrs, total)
    return vec, state, loss


def foldgpt(params, model, calib, config: FoldGPTConfig, gates=None, *, progress: bool | None = None) -> Reduced:
    """FoldGPT (module docstring): gated removal of ``config.n_remove`` blocks, group sharing of the rest, norm
    re-adaptation with tail-layer distillation; :class:`Reduced` with a plain ``L − n``-block model whose shared
    blocks hold the same kernel arrays. ``gates``: precomputed :func:`block_gates` (default: trained here).
    ``report``: ``method``, ``config``, ``gates``, ``removed``, ``groups`` (``[(original blocks, anchor)]``),
    ``unique_params``, ``loss_first`` / ``loss_last`` of the adaptation. The input is not modified. ``progress``:
    bars over the gate steps and the adaptation epochs.

    >>> small, p2, rep = foldgpt(params, model, calib_batches, FoldGPTConfig(1, group_size=2))
    """
    sub = decoder_sublayers(model)
    if config.n_remove >= sub.num_layers:
        raise ValueError(f"foldgpt: cannot remove {config.n_remove} of {sub.num_layers} blocks")
    batches = _batches(calib, model.config.vocab_size)
    if gates is None:
        gates = block_gates(params, model, calib, config, progress=progress)
    gates = np.asarray(gates, np.float32)
    if gates.shape != (sub.num_layers,) or not np.all(np.isfinite(gates)):
        raise ValueError(f"foldgpt: gates must be {sub.num_layers} finite values, got shape {gates.shape}")
    removed = sorted(int(i) for i in np.argsort(gates, kind="stable")[:config.n_remove])
    kept = [i for i in range(sub.num_layers) if i not in removed]
    groups = share_groups(kept, config.group_size, gates)
    shared = dict(params)
    for grp, anchor in groups:
        src = flatten(params[sub.block_paths[anchor]])
        for i in grp:
            own = params[sub.block_paths[i]]
            linear = {p: (src[p] if p.endswith(("/kernel", "/bias")) else v) for p, v in flatten(own).items()}
            shared[sub.block_paths[i]] = unflatten(linear, like=own)
    small, p2 = remove_blocks(model, shared, removed)
    teach = [sublayer_forward(model, params, ids, am) for ids, am in batches]
    fp = flatten(p2)
    norms = {p: v for p, v in fp.items() if p.endswith("/scale")}
    frozen = {p: v for p, v in fp.items() if p not in norms}
    vec, unravel, lrs, state = _adam_init(norms, jax.tree_util.tree_map(lambda _: config.lr, norms))
    unravel = _Unravel(unravel, norms)
    total = jnp.float32(config.epochs * len(batches))
    losses = []
    for _ in progress_bar(range(config.epochs), progress, desc="FoldGPT adaptation"):
        for (ids, am), (tz, th) in zip(batches, teach):
            vec, state, loss = _fold_step(small, unravel, vec, state, lrs, total, jnp.float32(config.beta), frozen,
                                          ids, am, tz, th)
            losses.append(loss)
    losses = np.asarray(losses, np.float32)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError("foldgpt: the adaptation loss is not finite")
    out = unflatten({**frozen, **unravel(vec)}, like=p2)  # the frozen kernels stay the same (shared) arrays
    return Reduced(small, out, {"method": "foldgpt", "config": config, "gates": gates, "removed": removed,
                                "groups": groups, "unique_params": unique_param_count(out),
                                "loss_first": float(losses[0]) if len(losses) else None,
                                "loss_last": float(losses[-1]) if len(losses) else None})
