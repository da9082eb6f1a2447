"""BANG (Lin, Tan, Hao, Wong, Dong, Zhang, Yang & Zhang, "Spurious Feature Diversification Improves
Out-of-distribution Generalization", ICLR 2024): BAlaNced averaGing. WiSE-FT (:mod:`merging.wise_ft`) interpolates
the pre-trained and the fine-tuned weights::

    θ(α) = (1 - α) θ_0 + α θ_ft

and the paper finds that an *overconfident* fine-tuned model dominates that average out of distribution (its
confident mistakes outweigh the pre-trained model's correct predictions). BANG curbs the fine-tuned model's
confidence while fine-tuning, with MixUp and/or label smoothing, and then averages as WiSE-FT does. The
confidence-reducing losses computed here (per example, averaged over a batch by :func:`fine_tune`):

* label smoothing (Szegedy et al. 2016), K classes, smoothing ε::

      q = (1 - ε) onehot(y) + ε / K,        ℓ_LS(z, y) = - Σ_k q_k log softmax(z)_k

* MixUp (Zhang et al. 2018; one λ per batch and a random pairing π of the batch, as the authors' reference code
  ``mixup_data`` / ``mixup_criterion``)::

      λ ~ Beta(a, a),   x̃_b = λ x_b + (1 - λ) x_π(b),   ℓ_mix = λ ℓ(z̃_b, y_b) + (1 - λ) ℓ(z̃_b, y_π(b))

  with ℓ the (label-smoothed, when ε > 0) cross-entropy of the logits z̃ of the mixed input; a = 0 is no MixUp.

BANG's code is not public (the paper's text: "We impose Mixup or Label Smoothing during fine-tuning the pre-trained
CLIP on ImageNet"); its hyper-parameters were not sourced here: the defaults (a = 0.2, ε = 0.1) are the common ones
of the two regularizers' papers. The paper's diagnosis is measured by :func:`overconfidence`, the calibration gap
``mean_b max_k softmax(z_b)_k - accuracy``. :func:`wise_ft_curve` evaluates the interpolation path (one
:func:`merging.wise_ft.wise_ft` per α).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.tree import is_concrete
from merging import _common as C
from merging.wise_ft import wise_ft

PyTree = Any

__all__ = ["MixupBatch", "FineTuneResult", "WiseFTCurve", "smooth_targets", "label_smoothed_cross_entropy",
           "mixup_batch", "mixup_cross_entropy", "make_bang_loss", "fine_tune", "overconfidence", "wise_ft_curve"]


class MixupBatch(NamedTuple):
    """:func:`mixup_batch`'s result: the mixed inputs ``x`` (``λ x + (1-λ) x[perm]``), the labels of both
    ingredients ``y_a`` (= y) and ``y_b`` (= y[perm]), the scalar ``lam`` and the pairing ``perm`` [B]."""
    x: jax.Array
    y_a: jax.Array
    y_b: jax.Array
    lam: jax.Array
    perm: jax.Array


class FineTuneResult(NamedTuple):
    """:func:`fine_tune`'s result: the fine-tuned ``params`` θ_ft and the training loss of every step [steps]
    (before that step's update)."""
    params: PyTree
    losses: jax.Array


class WiseFTCurve(NamedTuple):
    """:func:`wise_ft_curve`'s result: the ``alphas`` [A] and, per metric name of ``eval_fn``, its values along
    the path (``metrics[name]`` [A], NumPy float32)."""
    alphas: np.ndarray
    metrics: dict


def _check_smoothing(smoothing: Any, method: str) -> float:
    try:
        s = float(smoothing)
    except (TypeError, ValueError):
        raise ValueError(f"{method}: `smoothing` must be a number in [0, 1), got {smoothing!r}") from None
    if not (math.isfinite(s) and 0.0 <= s < 1.0):
        raise ValueError(f"{method}: `smoothing` must be in [0, 1), got {smoothing!r}")
    return s


def _check_alpha(alpha: Any, method: str) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{method}: `mixup_alpha` must be a finite number >= 0, got {alpha!r}") from None
    if not (math.isfinite(a) and a >= 0.0):
        raise ValueError(f"{method}: `mixup_alpha` must be a finite number >= 0 (0: no MixUp), got {alpha!r}")
    return a


def _check_logits_labels(logits: Any, labels: Any, method: str) -> None:
    if np.ndim(logits) < 1 or np.shape(labels) != np.shape(logits)[:-1]:
        raise ValueError(f"{method}: logits [..., K] and integer labels [...] disagree: logits "
                         f"{np.shape(logits)}, labels {np.shape(labels)}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"{method}: `labels` must be integer class ids, got dtype {jnp.result_type(labels)}")
    k = np.shape(logits)[-1]
    if is_concrete(labels) and np.size(labels):
        lab = np.asarray(jax.device_get(labels))
        if lab.min() < 0 or lab.max() >= k:
            raise ValueError(f"{method}: labels must be in [0, {k}), got range [{lab.min()}, {lab.max()}]")
    if is_concrete(logits) and not np.all(np.isfinite(np.asarray(jax.device_get(logits), np.float32))):
        raise ValueError(f"{method}: `logits` hold NaN/Inf")


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.1) -> jax.Array:
    """Label smoothing's soft targets ``q = (1 - ε) onehot(y) + ε / K`` (float32 ``[..., K]``).

    >>> smooth_targets(jnp.array([2]), 4, 0.2)   # [[0.05, 0.05, 0.85, 0.05]]
    """
    s = _check_smoothing(smoothing, "smooth_targets")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"smooth_targets: num_classes must be a positive integer, got {num_classes!r}")
    return _targets(jnp.asarray(labels), int(num_classes), s)


def _targets(labels, k, s):
    return (1.0 - s) * jax.nn.one_hot(labels, k, dtype=jnp.float32) + s / k


def _ls_xent(logits, labels, s):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(_targets(labels, logits.shape[-1], s) * logp, axis=-1)


def label_smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, *, smoothing: float = 0.1) -> jax.Array:
    """Per-example ``-Σ_k q_k log softmax(z)_k`` with the smoothed targets of :func:`smooth_targets` (module
    docstring); ``smoothing=0`` is the plain cross-entropy. ``logits [..., K]``, integer ``labels [...]``; float32
    ``[...]`` back. Jittable (the label range / finiteness checks run on concrete inputs).

    >>> label_smoothed_cross_entropy(model.apply(v, x), y, smoothing=0.1).mean()
    """
    s = _check_smoothing(smoothing, "label_smoothed_cross_entropy")
    _check_logits_labels(logits, labels, "label_smoothed_cross_entropy")
    return _ls_xent(jnp.asarray(logits), jnp.asarray(labels), s)


def _mix(key, x, y, a):
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, a, a) if a > 0 else jnp.float32(1.0)
    lam = jnp.asarray(lam, jnp.float32)
    perm = jax.random.permutation(k_perm, x.shape[0])
    xf = x.astype(jnp.float32)
    mixed = (lam * xf + (1.0 - lam) * xf[perm]).astype(x.dtype)
    return MixupBatch(mixed, y, y[perm], lam, perm)


def mixup_batch(key: jax.Array, x: jax.Array, y: jax.Array, *, alpha: float = 0.2) -> MixupBatch:
    """MixUp's batch (module docstring): ``λ ~ Beta(alpha, alpha)`` (one per batch; ``alpha=0``: λ = 1, no mixing),
    a random permutation ``perm`` of the batch, ``x̃ = λ x + (1-λ) x[perm]`` (computed in float32, returned in
    ``x``'s dtype) and both label sets. ``x [B, ...]`` floating, ``y [B]`` integer. Jittable.

    >>> mb = mixup_batch(jax.random.key(0), x, y, alpha=0.2)
    >>> loss = mixup_cross_entropy(apply_fn(params, mb.x), mb).mean()
    """
    a = _check_alpha(alpha, "mixup_batch")
    if np.ndim(x) < 1 or np.shape(y) != np.shape(x)[:1]:
        raise ValueError(f"mixup_batch: x [B, ...] and labels [B] disagree: x {np.shape(x)}, y {np.shape(y)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"mixup_batch: `x` must be floating, got {jnp.result_type(x)}")
    if is_concrete(x) and not np.all(np.isfinite(np.asarray(jax.device_get(x), np.float32))):
        raise ValueError("mixup_batch: `x` holds NaN/Inf")
    return _mix(key, jnp.asarray(x), jnp.asarray(y), a)


def mixup_cross_entropy(logits: jax.Array, batch: MixupBatch, *, smoothing: float = 0.0) -> jax.Array:
    """Per-example MixUp loss ``λ ℓ(z, y_a) + (1 - λ) ℓ(z, y_b)`` of the logits ``z`` of ``batch.x`` (ℓ: the
    label-smoothed cross-entropy, plain at ``smoothing=0``). Float32 ``[B]``.

    >>> mixup_cross_entropy(apply_fn(params, mb.x), mb, smoothing=0.1).mean()
    """
    s = _check_smoothing(smoothing, "mixup_cross_entropy")
    if not isinstance(batch, MixupBatch):
        raise TypeError(f"mixup_cross_entropy: `batch` must be a MixupBatch (mixup_batch), got {type(batch).__name__}")
    _check_logits_labels(logits, batch.y_a, "mixup_cross_entropy")
    logits = jnp.asarray(logits)
    return batch.lam * _ls_xent(logits, batch.y_a, s) + (1.0 - batch.lam) * _ls_xent(logits, batch.y_b, s)


def make_bang_loss(*, mixup_alpha: float = 0.2, smoothing: float = 0.1) -> Callable:
    """BANG's fine-tuning objective as a function ``loss(params, apply_fn, x, y, key) -> scalar``: MixUp with
    ``Beta(mixup_alpha, mixup_alpha)`` (0: none) of the batch and the label-smoothed cross-entropy (``smoothing``
    ε; 0: plain), averaged over the batch. ``make_bang_loss(mixup_alpha=0, smoothing=0)`` is the plain
    cross-entropy of ordinary fine-tuning (the baseline). Hashable by its settings: :func:`fine_tune` compiles once
    per setting.

    >>> ft = fine_tune(apply_fn, theta0, x, y, loss_fn=make_bang_loss(mixup_alpha=0.2, smoothing=0.1), ...)
    """
    a = _check_alpha(mixup_alpha, "make_bang_loss")
    s = _check_smoothing(smoothing, "make_bang_loss")
    return _bang_loss(a, s)


@functools.lru_cache(maxsize=64)
def _bang_loss(a: float, s: float) -> Callable:
    def loss(params, apply_fn, x, y, key):
        if a > 0:
            mb = _mix(key, x, y, a)
            z = apply_fn(params, mb.x)
            per = mb.lam * _ls_xent(z, mb.y_a, s) + (1.0 - mb.lam) * _ls_xent(z, mb.y_b, s)
        else:
            per = _ls_xent(apply_fn(params, x), y, s)
        return jnp.mean(per)

    loss.settings = {"mixup_alpha": a, "smoothing": s}
    return loss


@functools.lru_cache(maxsize=32)
def _trainer(apply_fn, loss_fn, tx, steps: int, batch_size: int):
    @jax.jit
    def run(params, x, y, key):
        n = x.shape[0]

        def step(carry, k):
            p, state = carry
            k_idx, k_loss = jax.random.split(k)
            idx = jax.random.randint(k_idx, (batch_size,), 0, n)
            loss, g = jax.value_and_grad(loss_fn)(p, apply_fn, x[idx], y[idx], k_loss)
            u, state = tx.update(g, state, p)
            return (optax.apply_updates(p, u), state), loss

        (p, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
        return p, losses

    return run


def fine_tune(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, x: jax.Array, y: jax.Array, *,
              tx: optax.GradientTransformation, steps: int, batch_size: int, key: jax.Array,
              loss_fn: Callable | None = None) -> FineTuneResult:
    """Fine-tune ``params`` (θ_0) for ``steps`` steps of ``tx`` on minibatches of ``batch_size`` examples drawn
    uniformly with replacement from ``(x, y)``, minimizing ``loss_fn(params, apply_fn, xb, yb, key)`` (default:
    BANG's, :func:`make_bang_loss` with its defaults; plain fine-tuning: ``make_bang_loss(mixup_alpha=0,
    smoothing=0)``). Returns :class:`FineTuneResult` (θ_ft and the per-step losses); interpolate with
    :func:`merging.wise_ft.wise_ft` / :func:`wise_ft_curve`. Every step runs in one jitted ``lax.scan``, compiled
    once per ``(apply_fn, loss_fn, tx, steps, batch_size)`` (pass the same objects to reuse it); ``x`` may be
    sharded over a mesh's data axis (the gathered minibatch then follows XLA's placement). ``params`` is not
    modified.

    >>> ft = fine_tune(apply_fn, theta0, x_id, y_id, tx=optax.adam(1e-2), steps=200, batch_size=64,
    ...                key=jax.random.key(0)).params
    >>> curve = wise_ft_curve(theta0, ft, np.linspace(0, 1, 11), eval_fn)
    """
    method = "fine_tune"
    if not callable(apply_fn):
        raise TypeError(f"{method}: `apply_fn` must be callable, got {type(apply_fn).__name__}")
    loss_fn = make_bang_loss() if loss_fn is None else loss_fn
    if not callable(loss_fn):
        raise TypeError(f"{method}: `loss_fn` must be callable, got {type(loss_fn).__name__}")
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"{method}: `tx` must be an optax GradientTransformation, got {type(tx).__name__}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{method}: `{name}` must be a positive integer, got {v!r}")
    if np.ndim(x) < 1 or np.shape(y) != np.shape(x)[:1] or np.shape(x)[0] < 1:
        raise ValueError(f"{method}: x [N, ...] and labels [N] disagree or are empty: x {np.shape(x)}, "
                         f"y {np.shape(y)}")
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise ValueError(f"{method}: `y` must be integer class ids, got dtype {jnp.result_type(y)}")
    if is_concrete(x) and not np.all(np.isfinite(np.asarray(jax.device_get(x), np.float32))):
        raise ValueError(f"{method}: `x` holds NaN/Inf")
    C.validate_trees(params, [], method)
    C.check_leaf_dtypes(params, [], method)
    args = (apply_fn, loss_fn, tx, int(steps), int(batch_size))
    try:
        run = _trainer(*args)
    except TypeError:  # an unhashable callable / tx: compile for this call only
        run = _trainer.__wrapped__(*args)
    p, losses = run(params, jnp.asarray(x), jnp.asarray(y), key)
    return FineTuneResult(p, losses)


def overconfidence(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The calibration gap ``mean_b max_k softmax(z_b)_k - mean_b 1[argmax_k z_b = y_b]`` (float32 scalar):
    positive = overconfident (the mean confidence exceeds the accuracy), the paper's diagnosis of WiSE-FT's
    failure out of distribution. ``logits [B, K]``, integer ``labels [B]``. Jittable.

    >>> overconfidence(apply_fn(theta_ft, x_ood), y_ood)
    """
    _check_logits_labels(logits, labels, "overconfidence")
    if np.ndim(logits) != 2:
        raise ValueError(f"overconfidence: logits must be [B, K], got {np.shape(logits)}")
    return _gap(jnp.asarray(logits), jnp.asarray(labels))


@jax.jit
def _gap(logits, labels):
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return jnp.mean(jnp.max(p, -1)) - acc


def wise_ft_curve(base: PyTree, fine_tuned: PyTree, alphas: Sequence[float], eval_fn: Callable[[PyTree], Any],
                  *, check_finite: bool = True) -> WiseFTCurve:
    """Evaluate the WiSE-FT path ``θ(α) = (1 - α) base + α fine_tuned`` at every α of ``alphas`` (each in [0, 1];
    :func:`merging.wise_ft.wise_ft`): ``eval_fn(params) -> {name: scalar}`` (or a scalar, recorded as ``eval``).
    With a BANG fine-tune (:func:`fine_tune` with :func:`make_bang_loss`) this is BANG's curve; α = 0 is the
    pre-trained model, α = 1 the fine-tuned one.

    >>> curve = wise_ft_curve(theta0, theta_ft, np.linspace(0, 1, 11), lambda p: {"ood": accuracy(p, x_ood)})
    >>> curve.alphas[np.argmax(curve.metrics["ood"])]
    """
    method = "wise_ft_curve"
    if not callable(eval_fn):
        raise TypeError(f"{method}: `eval_fn` must be callable, got {type(eval_fn).__name__}")
    a = np.asarray(alphas, np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
        raise ValueError(f"{method}: `alphas` must be a non-empty sequence of numbers in [0, 1], got {alphas!r}")
    C.validate_trees(base, [fine_tuned], method, check_finite=check_finite)
    rows = []
    for v in a:
        out = eval_fn(wise_ft(base, [fine_tuned], alpha=float(v), check_finite=False))
        rows.append(out if isinstance(out, dict) else {"eval": out})
    rows = jax.device_get(rows)
    metrics = {k: np.asarray([float(r[k]) for r in rows], np.float32) for k in rows[0]}
    return WiseFTCurve(a.astype(np.float32), metrics)
