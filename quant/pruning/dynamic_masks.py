"""Fire Together Wire Together (FTWT): dynamic channel pruning with self-supervised mask prediction (Elkerdawy,
Elhoushi, Zhang & Ray, CVPR 2022, arXiv 2110.08232; reference code selkerdawy/FTWT ``utils/layers.py``,
``utils/utils.py``).

Each gated layer ``ℓ`` has an input ``x`` (the previous layer's activation) and an output ``o = f(layer(x))``
(``[B, C]`` for a Dense, ``[B, H, W, C]`` NHWC for a conv). A small head predicts from ``x`` which of the ``C``
output channels to compute for this input; it is trained to predict the channels that fire most on the full layer::

    heat_bc  = max_{h,w} |o_{b,h,w,c}|                      (global max pool; ``|o_bc|`` for a Dense)
    p_bc     = heat_bc / Σ_c' heat_bc'
    target   t_bc = 1 iff Σ_{c': p_bc' >= p_bc} p_bc' <= r + δ    (``"mass"``: the top channels whose cumulative heat
                                                                  mass stays within r; r = 1 drops only p <= δ)
           | t_bc = 0 for the ⌊ρ C⌋ smallest heats and every heat <= δ, else 1        (``"uniform"``, ratio ρ)
    logits   z_b = Dense(softmax_c(mean_{h,w} x_b))             (MaskPredictorNN with embedding -1, do_softmax=1)
    mask     m_bc = 1[σ(z_bc) > 0.5] = 1[z_bc > 0]              (no gradient: BinarizerSTEStatic under no_grad)
    output   o ⊙ m
    loss     L = L_task + λ Σ_ℓ Σ_c mean_b BCEWithLogits(z_bc, t_bc)       (λ = 1, 0 after the cool-down step)

with δ = 1e-5. ``mode="decoupled"`` (the reference default) feeds the head ``stop_gradient(x)``: the task loss trains
the backbone (through the kept channels) and the mask loss trains only the heads; ``"joint"`` lets the mask loss
reach the backbone. The sort in the mass rule is stable (ties: the lower channel index ranks first). The target's
mass ``r`` sets the expected FLOPs before training (the paper's point: no sparsity regularizer to tune). An
all-zero output keeps every channel (the reference's ``0/0`` comparisons prune nothing).

Here: :func:`heat`, :func:`mass_target`, :func:`uniform_target`, :func:`mask_loss`; the linen layers
:class:`GatingHead`, :class:`GatedDense`, :class:`GatedConv` (``gating="dynamic"``: FTWT; ``"static"``: a fixed
channel mask from the ``"static"`` variable collection, the static-pruning baseline; ``"off"``: dense), which sow
``logits`` / ``target`` / ``mask`` into the ``"ftwt"`` collection; :func:`ftwt_loss`, :func:`mask_density`,
:func:`static_masks` (the top channels by mean heat, at given densities) and :func:`train_ftwt` (a compiled Adam
loop: task loss + mask loss, predictor-only warm-up, mask-loss cool-down, as the reference's ``--warmup`` /
``--cooldown``). The reference's optional head initialization to "all ones" is replaced by ``bias_init``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.tree import is_concrete

__all__ = ["TARGETS", "GATINGS", "MODES", "DELTA", "heat", "mass_target", "uniform_target", "mask_loss",
           "GatingHead", "GatedDense", "GatedConv", "ftwt_loss", "mask_density", "static_masks", "FTWTConfig",
           "FTWTHistory", "train_ftwt"]

PyTree = Any
TARGETS = ("mass", "uniform")
GATINGS = ("dynamic", "static", "off")
MODES = ("decoupled", "joint")
DELTA = 1e-5  # the reference's delta


def _check_out(o, where):
    if np.ndim(o) not in (2, 4):
        raise ValueError(f"{where}: the layer output must be [B, C] or [B, H, W, C], got shape {np.shape(o)}")
    if is_concrete(o) and not bool(jnp.all(jnp.isfinite(jnp.asarray(o)))):
        raise ValueError(f"{where}: the layer output has NaN or Inf values")


def heat(o: jax.Array) -> jax.Array:
    """Per-channel firing ``heat_bc = max_{h,w} |o_bhwc|`` (``|o_bc|`` for ``[B, C]``), float32 ``[B, C]``.

    >>> heat(jnp.ones((2, 4, 4, 8))).shape   # (2, 8)
    """
    _check_out(o, "heat")
    a = jnp.abs(jnp.asarray(o, jnp.float32))
    return a if a.ndim == 2 else jnp.max(a, axis=(1, 2))


def _mass_target(h, r):
    total = jnp.sum(h, axis=-1, keepdims=True)
    p = h / jnp.maximum(total, 1e-30)
    dead = total <= 0  # an all-zero output: the reference's 0/0 = NaN comparisons prune nothing
    if r >= 1.0:  # the reference's special case: only the (near-)zero channels are dropped
        return ((p > DELTA) | dead).astype(jnp.float32)
    # the kept channels are a prefix of the descending order: one sort of the values gives its length k and the
    # k-th value tau; channels above tau are kept, and of those equal to tau the lowest indices (a stable order)
    desc = -jnp.sort(-p, axis=-1)
    k = jnp.sum(jnp.cumsum(desc, axis=-1) - r <= DELTA, axis=-1, keepdims=True)
    tau = jnp.take_along_axis(desc, jnp.maximum(k - 1, 0), axis=-1)
    above = p > tau
    tie = p == tau
    room = k - jnp.sum(above, axis=-1, keepdims=True)
    keep = above | (tie & (jnp.cumsum(tie, axis=-1) <= room))
    return ((keep & (k > 0)) | dead).astype(jnp.float32)


def mass_target(o: jax.Array, r: float) -> jax.Array:
    """FTWT's ``"mass"`` target ``[B, C]`` (1 = should fire) of the layer output ``o``: per input, the channels of
    largest heat whose cumulative normalized heat stays within ``r`` (module docstring), ``0 < r <= 1``.

    >>> t = mass_target(o, 0.9)     # o [B, C] or [B, H, W, C]
    """
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
        raise ValueError(f"mass_target: r must be in (0, 1], got {r!r}")
    return _mass_target(heat(o), float(r))


def uniform_target(o: jax.Array, ratio: float) -> jax.Array:
    """FTWT's ``"uniform"`` target ``[B, C]``: the ``⌊ratio·C⌋`` smallest heats (stable order) and every heat <= δ
    set to 0, the rest 1; ``0 <= ratio < 1``.

    >>> t = uniform_target(o, 0.5)
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"uniform_target: ratio must be in [0, 1), got {ratio!r}")
    h = heat(o)
    n = int(float(ratio) * h.shape[-1])
    rank = jnp.argsort(jnp.argsort(h, axis=-1, stable=True), axis=-1)  # 0 = smallest
    return ((rank >= n) & (h > DELTA)).astype(jnp.float32)


def mask_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
    """``Σ_c mean_b BCEWithLogits(z_bc, t_bc)`` of one layer (the reference's ``reduction='none'``, ``.mean(0)
    .sum()``), float32 scalar.

    >>> mask_loss(z, mass_target(o, 0.9))
    """
    if np.shape(logits) != np.shape(target) or np.ndim(logits) != 2:
        raise ValueError(f"mask_loss: logits {np.shape(logits)} and target {np.shape(target)} must be equal [B, C]")
    z, t = jnp.asarray(logits, jnp.float32), jnp.asarray(target, jnp.float32)
    return jnp.sum(jnp.mean(optax.sigmoid_binary_cross_entropy(z, t), axis=0))


# ------------------------------------------------------------------------------------------------ layers

class GatingHead(nn.Module):
    """FTWT's mask predictor: ``z = Dense(softmax(mean_{h,w} x))`` logits ``[B, features]`` from the layer input
    ``x`` ``[B, in]`` or ``[B, H, W, in]`` (``softmax=False``: no softmax; ``bias_init``: initial logit offset,
    > 0 starts with every channel on).

    >>> z = GatingHead(64).apply(variables, x)
    """

    features: int
    softmax: bool = True
    bias_init: float = 0.0

    @nn.compact
    def __call__(self, x):
        z = jnp.asarray(x, jnp.float32)
        if z.ndim == 4:
            z = jnp.mean(z, axis=(1, 2))
        elif z.ndim != 2:
            raise ValueError(f"GatingHead: input must be [B, C] or [B, H, W, C], got shape {z.shape}")
        if self.softmax:
            z = jax.nn.softmax(z, axis=-1)
        return nn.Dense(self.features, bias_init=nn.initializers.constant(self.bias_init), name="gate")(z)


class _Gated(nn.Module):
    """Shared gating of :class:`GatedDense` / :class:`GatedConv` (attributes documented there)."""

    def _check(self):
        if self.gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {self.gating!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.target == "mass" and not 0.0 < self.r <= 1.0:
            raise ValueError(f"r (heat mass kept) must be in (0, 1], got {self.r}")
        if self.target == "uniform" and not 0.0 <= self.r < 1.0:
            raise ValueError(f"r (pruning ratio of the uniform target) must be in [0, 1), got {self.r}")

    def _gate(self, x, o):
        head_in = jax.lax.stop_gradient(x) if self.mode == "decoupled" else x
        z = GatingHead(self.features, self.softmax, self.bias_init, name="gate_head")(head_in)  # built in every gating
        if self.gating == "off":
            return o
        if self.gating == "static":
            m = self.variable("static", "mask", lambda: jnp.ones((self.features,), bool)).value
            m = jnp.broadcast_to(jnp.asarray(m, jnp.float32), (o.shape[0], self.features))
        else:
            og = jax.lax.stop_gradient(o)
            t = (_mass_target(heat(og), float(self.r)) if self.target == "mass"
                 else uniform_target(og, float(self.r)))
            m = jax.lax.stop_gradient((z > 0).astype(jnp.float32))
            self.sow("ftwt", "logits", z)
            self.sow("ftwt", "target", t)
        self.sow("ftwt", "mask", m)
        shape = (m.shape[0],) + (1,) * (o.ndim - 2) + (m.shape[1],)
        return o * m.reshape(shape).astype(o.dtype)


class GatedDense(_Gated):
    """``o = activation(Dense(features)(x))`` with FTWT's predicted channel mask (``gating="dynamic"``), a fixed
    mask (``"static"``: variable ``("static", "mask")`` bool ``[features]``) or none (``"off"``); ``target``:
    ``"mass"`` (``r`` = heat mass kept) or ``"uniform"`` (``r`` = pruning ratio); ``mode``: ``"decoupled"`` |
    ``"joint"``. The head's params exist in every gating, so one params tree serves all three.

    >>> y, st = GatedDense(128, r=0.9).apply(variables, x, mutable=["ftwt"])   # st["ftwt"]: logits/target/mask
    """

    features: int
    r: float = 0.9
    target: str = "mass"
    gating: str = "dynamic"
    mode: str = "decoupled"
    activation: Callable = nn.relu
    softmax: bool = True
    bias_init: float = 0.0

    @nn.compact
    def __call__(self, x):
        self._check()
        o = self.activation(nn.Dense(self.features, name="dense")(x))
        return self._gate(x, o)


class GatedConv(_Gated):
    """``o = activation(Conv(features, kernel_size, strides, padding)(x))`` (NHWC) with the channel mask of
    :class:`GatedDense` (same gating attributes); the head pools ``x`` over space.

    >>> y, st = GatedConv(16).apply(variables, images, mutable=["ftwt"])
    """

    features: int
    kernel_size: tuple = (3, 3)
    strides: tuple = (1, 1)
    padding: str = "SAME"
    r: float = 0.9
    target: str = "mass"
    gating: str = "dynamic"
    mode: str = "decoupled"
    activation: Callable = nn.relu
    softmax: bool = True
    bias_init: float = 0.0

    @nn.compact
    def __call__(self, x):
        self._check()
        if jnp.ndim(x) != 4:
            raise ValueError(f"GatedConv: input must be NHWC [B, H, W, C], got shape {jnp.shape(x)}")
        o = self.activation(nn.Conv(self.features, self.kernel_size, self.strides, self.padding, name="conv")(x))
        return self._gate(x, o)


# ------------------------------------------------------------------------------------------------ losses, stats

def _layers(ftwt: PyTree, key: str) -> dict[str, jax.Array]:
    """``{layer path: sown value}`` of one key (``logits`` / ``target`` / ``mask``; the last call of each layer)."""
    out = {}

    def rec(node, prefix):
        if not isinstance(node, Mapping):
            return
        for k, v in node.items():
            if k == key and isinstance(v, tuple) and v:
                out[prefix] = v[-1]
            elif isinstance(v, Mapping):
                rec(v, f"{prefix}/{k}" if prefix else k)

    rec(ftwt, "")
    return out


def ftwt_loss(ftwt: PyTree) -> jax.Array:
    """``Σ_ℓ mask_loss(z_ℓ, t_ℓ)`` over every dynamic gated layer in the sown ``"ftwt"`` collection.

    >>> logits, st = model.apply(variables, x, mutable=["ftwt"]); ftwt_loss(st["ftwt"])
    """
    z, t = _layers(ftwt, "logits"), _layers(ftwt, "target")
    if not z:
        raise ValueError("ftwt_loss: no dynamic gated layer sowed logits (gating='dynamic', mutable=['ftwt'])")
    return sum(mask_loss(z[k], t[k]) for k in sorted(z))


def mask_density(ftwt: PyTree) -> dict[str, jax.Array]:
    """``{layer path: mean fraction of active channels}`` of the sown masks (float32 scalars).

    >>> mask_density(st["ftwt"])    # {"gated_0": 0.41, ...}
    """
    m = _layers(ftwt, "mask")
    if not m:
        raise ValueError("mask_density: no gated layer sowed a mask (mutable=['ftwt'])")
    return {k: jnp.mean(v) for k, v in m.items()}


def static_masks(heats: dict[str, jax.Array], densities: dict[str, float]) -> dict[str, jax.Array]:
    """The static-pruning baseline's masks: for each layer the ``round(d·C)`` (at least 1) channels of largest mean
    heat over the data (``heats[layer]`` ``[N, C]``, e.g. :func:`heat` of the dense model's outputs). Returns
    ``{layer: bool [C]}`` (ties: lower index first).

    >>> masks = static_masks({"gated_0": heat(o)}, {"gated_0": 0.4})
    """
    if set(heats) != set(densities):
        raise ValueError(f"static_masks: heats layers {sorted(heats)} != densities layers {sorted(densities)}")
    out = {}
    for k, h in heats.items():
        d = float(densities[k])
        if not 0.0 < d <= 1.0 or np.ndim(h) != 2:
            raise ValueError(f"static_masks: layer {k}: need a density in (0, 1] and heats [N, C], got {d}, "
                             f"shape {np.shape(h)}")
        mean = np.asarray(jnp.mean(jnp.asarray(h, jnp.float32), axis=0))
        k_keep = max(1, int(round(d * mean.shape[0])))
        keep = np.zeros(mean.shape[0], bool)
        keep[np.argsort(-mean, kind="stable")[:k_keep]] = True
        out[k] = jnp.asarray(keep)
    return out


# ------------------------------------------------------------------------------------------------ training

@dataclasses.dataclass(frozen=True)
class FTWTConfig:
    """:func:`train_ftwt`: ``steps`` Adam steps on mini-batches of ``batch_size`` (``lr`` backbone, ``mask_lr``
    heads); ``warmup`` first steps train only the heads; from step ``cooldown`` on the mask loss weighs 0 (``None``:
    never); ``mask_weight`` λ; ``mask_loss=False``: task loss only (dense / static baselines)."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    mask_lr: float = 1e-2
    warmup: int = 0
    cooldown: int | None = None
    mask_weight: float = 1.0
    mask_loss: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be an integer in [0, steps), got {self.warmup!r}")
        if self.cooldown is not None and (not isinstance(self.cooldown, int) or self.cooldown < 0):
            raise ValueError(f"cooldown must be None or a non-negative integer, got {self.cooldown!r}")
        for name in ("lr", "mask_lr", "mask_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


class FTWTHistory(NamedTuple):
    """Per-step ``task_loss`` and ``mask_loss`` (0 without dynamic layers) ``[steps]``."""

    task_loss: jax.Array
    mask_loss: jax.Array


def _is_head(path) -> bool:
    return any(getattr(k, "key", None) == "gate_head" for k in path)


def train_ftwt(model: nn.Module, params: PyTree, x, y, config: FTWTConfig = FTWTConfig(), *,
               variables: dict | None = None) -> tuple[PyTree, FTWTHistory]:
    """Train ``model`` (a classifier whose ``apply({"params": p, **variables}, x)`` returns logits; its gated layers
    sow into ``"ftwt"``) with ``L = CE + λ·ftwt_loss`` on ``(x, y)`` (int labels) by Adam, in one compiled
    ``lax.scan``. The gated layers' head params (paths through a ``gate_head`` module) use ``mask_lr``, the
    backbone ``lr`` (0 during ``warmup``). ``variables``: other collections, e.g. ``{"static": masks}``. Returns
    ``(params, history)``.

    >>> params, hist = train_ftwt(MLP(), params, x_train, y_train, FTWTConfig(steps=300))
    """
    if not isinstance(config, FTWTConfig):
        raise ValueError(f"config must be an FTWTConfig, got {type(config).__name__}")
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape[0] != y.shape[0] or y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"train_ftwt: x {x.shape} and integer labels y {y.shape} must have one length")
    if is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("train_ftwt: x has NaN or Inf values")
    labels = jax.tree_util.tree_map_with_path(lambda p, _: "head" if _is_head(p) else "backbone", params)
    cfg = config
    bb_lr = optax.join_schedules([optax.constant_schedule(0.0), optax.constant_schedule(cfg.lr)], [cfg.warmup])
    tx = optax.multi_transform({"head": optax.adam(cfg.mask_lr), "backbone": optax.adam(bb_lr)}, labels)
    return _train(model, cfg, tx, params, dict(variables or {}), x, y)


def _train(model, cfg, tx, params, variables, x, y):
    n = x.shape[0]
    bs = min(cfg.batch_size, n)

    def loss_fn(p, xb, yb, lam):
        logits, st = model.apply({"params": p, **variables}, xb, mutable=["ftwt"])
        task = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yb))
        has_dyn = bool(_layers(st.get("ftwt", {}), "logits"))
        ml = ftwt_loss(st["ftwt"]) if (cfg.mask_loss and has_dyn) else jnp.zeros((), jnp.float32)
        return task + lam * ml, (task, ml)

    def step(carry, i):
        p, opt = carry
        idx = jax.random.choice(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), i), n, (bs,), replace=False)
        lam = cfg.mask_weight if cfg.cooldown is None else jnp.where(i < cfg.cooldown, cfg.mask_weight, 0.0)
        (_, (task, ml)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x[idx], y[idx], lam)
        u, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, u), opt), (task, ml)

    @jax.jit
    def run(p):
        (p, _), (task, ml) = jax.lax.scan(step, (p, tx.init(p)), jnp.arange(cfg.steps))
        return p, FTWTHistory(task, ml)

    return run(params)
