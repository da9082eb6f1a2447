"""TinyCLIP weight inheritance and affinity mimicking (Wu et al., ICCV 2023, "TinyCLIP: CLIP Distillation via Affinity
Mimicking and Weight Inheritance"; reference microsoft/Cream ``TinyCLIP/src/open_clip/weight_inherit.py`` and
``clip_soft_loss.py``).

Weight inheritance slices a trained teacher transformer into a smaller student by index selection:

* layers: student layer ``i`` takes teacher layer ``idx_i``; TinyCLIP's manual rule ``"interval"`` (its
  ``interval_front``): ``step = ⌊L_T / L_S⌋``, ``idx = (0, step, 2·step, ...)``; or ``"first"``, or given indices;
* heads, MLP hidden channels and the residual width: the first ones (TinyCLIP's manual ``prune_param``: the front
  slice) or the most important by weight norm (``method="importance"``) or by caller scores, e.g. learned masks::

      head h:    s_h = ‖[W_q[:, H_h], W_k[:, H_h], W_v[:, H_h], W_oᵀ[:, H_h]]‖_F      (H_h its d_head columns)
      neuron j:  s_j = ‖[W_fc1[:, j]; b_fc1[j]; W_fc2[j, :]]‖₂
      width c:   s_c = ‖all residual-stream weights reading or writing dimension c‖₂

  With the project's attention (inner width = model width, ``d_head = d / heads``), the student keeps ``d_head``:
  its width is ``heads_S · d_head``, so query/key/value kernels keep rows ``width`` and columns of the kept heads,
  the output projection the transpose, norms and embeddings the kept width. Keeping everything reproduces the
  teacher exactly. TinyCLIP's automatic inheritance learns the masks with an L0 (hard-concrete) penalty; that
  training is not implemented here: pass any scores (``importance=``) instead.

Architectures (:data:`ARCHS`): ``"vit"`` (:class:`jaxmodels.models.ViT`) and ``"bert"`` (:class:`BertEncoder`,
MiniLM); an :class:`ArchSpec` describes another.

Affinity mimicking. For two views ``a`` (images) and ``b`` (texts; here any second view: class embeddings, another
augmentation, the batch itself) the affinity logits are ``A = τ · â b̂ᵀ`` (rows L2-normalized). The student
mimics the teacher's affinities in both directions (the reference's soft-target cross entropy)::

    L = ½ [ CE(A_S, softmax(A_T)) + CE(A_Sᵀ, softmax(A_Tᵀ)) ],   CE(x, p) = −mean_rows Σ_j p_j log softmax(x)_j

``kl=True`` (default) subtracts the teacher's entropy (the same gradients; 0 iff the affinities match).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import check_compatible, flatten, is_concrete, unflatten

__all__ = ["ArchSpec", "VIT_SPEC", "BERT_SPEC", "ARCHS", "InheritancePlan", "select_layers", "select_top",
           "head_importance", "neuron_importance", "width_importance", "plan_inheritance", "inherit",
           "affinity_logits", "affinity_mimicking_loss", "affinity_loss"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Where a transformer keeps its pieces: ``layer`` (format of the layer key), the attention module, its q/k/v
    and output Dense names, the MLP's two Dense paths inside a layer, and ``width_leaves`` ((regex, axis) of the
    leaves outside the layers whose ``axis`` is the residual width; everything else there is copied)."""

    layer: str
    attention: str
    out: str
    fc_in: str
    fc_out: str
    width_leaves: tuple[tuple[str, int], ...]
    qkv: tuple[str, ...] = ("query", "key", "value")


VIT_SPEC = ArchSpec("block_{}", "attn", "out", "mlp/fc1", "mlp/fc2",
                    ((r"^patch_embed/(kernel|bias)$", -1), (r"^(cls|pos_embed)$", -1), (r"^norm/(scale|bias)$", -1),
                     (r"^head/kernel$", 0)))
BERT_SPEC = ArchSpec("layer_{}", "attention", "attention_output", "intermediate", "output",
                     ((r"^embeddings/\w+_embeddings/embedding$", -1), (r"^embeddings/norm/(scale|bias)$", -1)))
ARCHS = {"vit": VIT_SPEC, "bert": BERT_SPEC}


class InheritancePlan(NamedTuple):
    """Teacher indices kept: ``layers`` (one per student layer, increasing), ``heads`` and ``neurons`` (one tuple
    per student layer), ``width`` (residual dimensions), and the (kept) ``head_dim``."""

    layers: tuple[int, ...]
    heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]
    width: tuple[int, ...]
    head_dim: int

    @property
    def sizes(self) -> dict:
        """The student's ``depth``, ``num_heads``, ``width`` and ``mlp_dim``."""
        return dict(depth=len(self.layers), num_heads=len(self.heads[0]), width=len(self.width),
                    mlp_dim=len(self.neurons[0]))


def _spec(arch) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return arch
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)} or an ArchSpec, got {arch!r}")
    return ARCHS[arch]


def _layer_re(spec: ArchSpec) -> re.Pattern:
    return re.compile("^" + re.escape(spec.layer).replace(r"\{\}", r"(\d+)") + "/(.+)$")


def _layers(flat: dict, spec: ArchSpec) -> int:
    rx = _layer_re(spec)
    ids = {int(m.group(1)) for p in flat for m in [rx.match(p)] if m}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(f"no layers {spec.layer.format('k')} numbered 0..L-1 in the params")
    return len(ids)


def _get(flat: dict, path: str):
    if path not in flat:
        raise ValueError(f"the params have no leaf {path!r}")
    return jnp.asarray(flat[path], jnp.float32)


def select_layers(n_teacher: int, n_student: int, method="interval") -> tuple[int, ...]:
    """Teacher layer per student layer: ``"interval"`` (TinyCLIP: ``range(0, S·⌊T/S⌋, ⌊T/S⌋)``), ``"first"``, or
    explicit increasing indices.

    >>> select_layers(12, 3)          # (0, 4, 8)
    """
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"select_layers: need 1 <= student depth <= teacher depth, got {n_student}, {n_teacher}")
    if isinstance(method, str):
        if method == "interval":
            step = n_teacher // n_student
            return tuple(range(0, n_student * step, step))
        if method == "first":
            return tuple(range(n_student))
        raise ValueError(f"select_layers: method must be 'interval', 'first' or indices, got {method!r}")
    idx = tuple(int(i) for i in method)
    if len(idx) != n_student or list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n_teacher:
        raise ValueError(f"select_layers: {n_student} increasing indices in [0, {n_teacher}) needed, got {method!r}")
    return idx


def select_top(scores, n: int, method: str = "importance") -> tuple[int, ...]:
    """``n`` indices (ascending): the first ``n`` or the ``n`` largest ``scores`` (ties: the lower index).

    >>> select_top(np.array([0.1, 3., 2.]), 2)      # (1, 2)
    """
    scores = np.asarray(jax.device_get(scores), np.float32)
    if scores.ndim != 1 or not 1 <= n <= scores.shape[0]:
        raise ValueError(f"select_top: need 1 <= n <= {scores.shape[0] if scores.ndim == 1 else '?'}, got {n}")
    if method == "first":
        return tuple(range(n))
    if method != "importance":
        raise ValueError(f"select_top: method must be 'importance' or 'first', got {method!r}")
    if not np.isfinite(scores).all():
        raise ValueError("select_top: scores contain NaN or Inf")
    return tuple(sorted(int(i) for i in np.argsort(-scores, kind="stable")[:n]))


def _lp(spec, i, name):
    return f"{spec.layer.format(i)}/{name}"


def head_importance(params: PyTree, arch, layer: int, num_heads: int) -> jax.Array:
    """``[heads]`` Frobenius norms of each head's q/k/v columns and output-projection rows (see the docstring)."""
    spec, flat = _spec(arch), flatten(params)
    att = _lp(spec, layer, spec.attention)
    sq = sum((_get(flat, f"{att}/{q}/kernel") ** 2).sum(0) for q in spec.qkv)
    sq = sq + (_get(flat, f"{att}/{spec.out}/kernel") ** 2).sum(1)
    if sq.shape[0] % num_heads:
        raise ValueError(f"head_importance: width {sq.shape[0]} not divisible by num_heads={num_heads}")
    return jnp.sqrt(sq.reshape(num_heads, -1).sum(1))


def neuron_importance(params: PyTree, arch, layer: int) -> jax.Array:
    """``[mlp_dim]`` norms of each hidden unit's input column, bias and output row."""
    spec, flat = _spec(arch), flatten(params)
    fi, fo = _lp(spec, layer, spec.fc_in), _lp(spec, layer, spec.fc_out)
    sq = (_get(flat, f"{fi}/kernel") ** 2).sum(0) + (_get(flat, f"{fo}/kernel") ** 2).sum(1)
    if f"{fi}/bias" in flat:
        sq = sq + _get(flat, f"{fi}/bias") ** 2
    return jnp.sqrt(sq)


def width_importance(params: PyTree, arch) -> jax.Array:
    """``[d]`` norms of every residual-stream weight reading (kernel rows) or writing (output columns, biases)
    each model dimension, over all layers."""
    spec, flat = _spec(arch), flatten(params)
    sq = 0.0
    for i in range(_layers(flat, spec)):
        att = _lp(spec, i, spec.attention)
        for q in spec.qkv:
            sq = sq + (_get(flat, f"{att}/{q}/kernel") ** 2).sum(1)
        sq = sq + (_get(flat, f"{_lp(spec, i, spec.fc_in)}/kernel") ** 2).sum(1)
        for o in (f"{att}/{spec.out}", _lp(spec, i, spec.fc_out)):
            sq = sq + (_get(flat, f"{o}/kernel") ** 2).sum(0)
            if f"{o}/bias" in flat:
                sq = sq + _get(flat, f"{o}/bias") ** 2
    return jnp.sqrt(sq)


def plan_inheritance(params: PyTree, arch, *, teacher_heads: int, depth: int, num_heads: int, mlp_dim: int,
                     layers="interval", method: str = "importance", importance: dict | None = None) -> InheritancePlan:
    """Choose what the student keeps. ``method``: ``"importance"`` (weight norms, or the caller's ``importance``
    dict with any of ``"heads"`` ``[L_T, H_T]``, ``"neurons"`` ``[L_T, mlp_T]``, ``"width"`` ``[d_T]``) or
    ``"first"`` (TinyCLIP's manual front slices); ``layers``: see :func:`select_layers`. The width is
    ``num_heads · d_head``.

    >>> plan = plan_inheritance(params, "vit", teacher_heads=4, depth=1, num_heads=2, mlp_dim=64)
    >>> student = inherit(params, plan, "vit")       # ViT(width=plan.sizes["width"], depth=1, num_heads=2, ...)
    """
    spec, flat = _spec(arch), flatten(params)
    n_layers = _layers(flat, spec)
    d = _get(flat, f"{_lp(spec, 0, spec.attention)}/{spec.qkv[0]}/kernel").shape[0]
    if teacher_heads < 1 or d % teacher_heads:
        raise ValueError(f"plan_inheritance: width {d} is not divisible by teacher_heads={teacher_heads}")
    if not 1 <= num_heads <= teacher_heads:
        raise ValueError(f"plan_inheritance: num_heads must be in [1, {teacher_heads}], got {num_heads}")
    if method not in ("importance", "first"):
        raise ValueError(f"plan_inheritance: method must be 'importance' or 'first', got {method!r}")
    importance = dict(importance or {})
    unknown = set(importance) - {"heads", "neurons", "width"}
    if unknown:
        raise ValueError(f"plan_inheritance: unknown importance keys {sorted(unknown)}")
    dh = d // teacher_heads
    idx = select_layers(n_layers, depth, layers)
    m_t = _get(flat, f"{_lp(spec, 0, spec.fc_in)}/kernel").shape[1]
    if not 1 <= mlp_dim <= m_t:
        raise ValueError(f"plan_inheritance: mlp_dim must be in [1, {m_t}], got {mlp_dim}")

    def score(key, fn, shape):
        if key in importance:
            s = np.asarray(jax.device_get(importance[key]), np.float32)
            if s.shape != shape:
                raise ValueError(f"plan_inheritance: importance[{key!r}] has shape {s.shape}, expected {shape}")
            return s
        if method == "first":
            return None
        return np.stack([np.asarray(fn(i)) for i in range(shape[0])]) if len(shape) == 2 else np.asarray(fn(0))

    def pick(s, n, total):
        return select_top(np.zeros(total) if s is None else s, n, "first" if s is None else "importance")

    all_scores = jax.device_get(jax.jit(lambda p: (  # one program instead of an eager op per layer
        [head_importance(p, spec, i, teacher_heads) for i in range(n_layers)],
        [neuron_importance(p, spec, i) for i in range(n_layers)], width_importance(p, spec)))(params)) \
        if method == "importance" and len(importance) < 3 else None
    hs = score("heads", lambda i: all_scores[0][i], (n_layers, teacher_heads))
    ns = score("neurons", lambda i: all_scores[1][i], (n_layers, m_t))
    ws = score("width", lambda _: all_scores[2], (d,))
    heads = tuple(pick(None if hs is None else hs[i], num_heads, teacher_heads) for i in idx)
    neurons = tuple(pick(None if ns is None else ns[i], mlp_dim, m_t) for i in idx)
    return InheritancePlan(idx, heads, neurons, pick(ws, num_heads * dh, d), dh)


def _check_plan(plan: InheritancePlan, n_layers: int, d: int, m: int) -> None:
    if not isinstance(plan, InheritancePlan) or not plan.layers:
        raise ValueError("inherit: plan must be a non-empty InheritancePlan")
    if len(plan.heads) != len(plan.layers) or len(plan.neurons) != len(plan.layers):
        raise ValueError("inherit: the plan needs one head and one neuron selection per student layer")
    if list(plan.layers) != sorted(set(plan.layers)) or plan.layers[-1] >= n_layers or plan.layers[0] < 0:
        raise ValueError(f"inherit: plan.layers must be increasing indices in [0, {n_layers}), got {plan.layers}")
    n_h = d // plan.head_dim if plan.head_dim > 0 and d % plan.head_dim == 0 else 0
    if not n_h:
        raise ValueError(f"inherit: head_dim={plan.head_dim} does not divide the width {d}")
    for name, sel, total in (("heads", plan.heads, n_h), ("neurons", plan.neurons, m)):
        if len({len(s) for s in sel}) != 1:
            raise ValueError(f"inherit: every student layer must keep the same number of {name}")
        for s in sel:
            if not s or list(s) != sorted(set(s)) or s[0] < 0 or s[-1] >= total:
                raise ValueError(f"inherit: {name} {s} must be increasing indices in [0, {total})")
    w = plan.width
    if not w or list(w) != sorted(set(w)) or w[0] < 0 or w[-1] >= d:
        raise ValueError(f"inherit: width must be increasing indices in [0, {d})")
    if len(w) != len(plan.heads[0]) * plan.head_dim:
        raise ValueError(f"inherit: the width kept ({len(w)}) must be heads·head_dim = "
                         f"{len(plan.heads[0])}·{plan.head_dim} (the attention's inner width is the model width)")


@functools.lru_cache(maxsize=32)
def _slicer(plan: InheritancePlan, spec: ArchSpec, paths: tuple, d: int):
    """One jitted program slicing the flat leaves (``paths`` order) into the student's flat dict."""
    rx, wid = _layer_re(spec), np.asarray(plan.width)
    take = lambda x, idx, ax: jnp.take(x, jnp.asarray(idx, jnp.int32), axis=ax)
    student_of = {t: s for s, t in enumerate(plan.layers)}

    def run(leaves):
        out: dict[str, Any] = {}
        for p, x in zip(paths, leaves):
            mt = rx.match(p)
            if mt is None:
                for pat, ax in spec.width_leaves:
                    if re.search(pat, p):
                        x = take(x, wid, ax)
                        break
                out[p] = x
                continue
            t, rest = int(mt.group(1)), mt.group(2)
            if t not in student_of:
                continue
            s = student_of[t]
            cols = np.concatenate([np.arange(h * plan.head_dim, (h + 1) * plan.head_dim) for h in plan.heads[s]])
            neu = np.asarray(plan.neurons[s])
            att = spec.attention
            roles = {f"{att}/{spec.out}/kernel": ((cols, 0), (wid, 1)), f"{att}/{spec.out}/bias": ((wid, 0),),
                     f"{spec.fc_in}/kernel": ((wid, 0), (neu, 1)), f"{spec.fc_in}/bias": ((neu, 0),),
                     f"{spec.fc_out}/kernel": ((neu, 0), (wid, 1)), f"{spec.fc_out}/bias": ((wid, 0),)}
            for q in spec.qkv:
                roles[f"{att}/{q}/kernel"], roles[f"{att}/{q}/bias"] = ((wid, 0), (cols, 1)), ((cols, 0),)
            if rest in roles:
                for idx, ax in roles[rest]:
                    x = take(x, idx, ax)
            elif x.ndim >= 1 and x.shape[-1] == d:  # norms inside the layer
                x = take(x, wid, -1)
            else:
                raise ValueError(f"inherit: cannot slice {p!r} (shape {x.shape}); describe it in an ArchSpec")
            out[spec.layer.format(s) + "/" + rest] = x
        return out

    return jax.jit(run)


def inherit(params: PyTree, plan: InheritancePlan, arch, like: PyTree | None = None) -> PyTree:
    """The student params: teacher leaves sliced by ``plan`` (jit-able with ``plan`` and ``arch`` static). ``like``
    (e.g. the student model's ``init`` params or ``eval_shape``) is checked against the result and gives its
    structure.

    >>> student = jax.jit(inherit, static_argnums=(1, 2))(params, plan, "vit")
    """
    spec, flat = _spec(arch), flatten(params)
    n_layers = _layers(flat, spec)
    d = _get(flat, f"{_lp(spec, 0, spec.attention)}/{spec.qkv[0]}/kernel").shape[0]
    m = _get(flat, f"{_lp(spec, 0, spec.fc_in)}/kernel").shape[1]
    _check_plan(plan, n_layers, d, m)
    for p, x in flat.items():
        if is_concrete(x) and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) and not np.isfinite(
                np.asarray(jax.device_get(x), np.float32)).all():
            raise ValueError(f"inherit: {p!r} contains NaN or Inf")
    out = _slicer(plan, spec, tuple(flat), d)(tuple(flat.values()))
    if like is None:
        return unflatten(out)
    like_flat = flatten(like)
    check_compatible(like_flat, out, names=["like", "inherited"], check_dtype=False)
    return unflatten(out, like=like)


# ------------------------------------------------------------------------------------------------ affinity mimicking

def _check_finite(where: str, **arrays) -> None:
    for name, x in arrays.items():
        if is_concrete(x):
            ok = jnp.isfinite(x).all()
            if is_concrete(ok) and not bool(ok):
                raise ValueError(f"{where}: {name} contains NaN or Inf")


def affinity_logits(a: jax.Array, b: jax.Array, scale=1.0, normalize: bool = True) -> jax.Array:
    """``scale · â b̂ᵀ`` for views ``a [N, d]``, ``b [M, d]`` (rows L2-normalized when ``normalize``).

    >>> A = affinity_logits(image_features, text_features, scale=100.0)      # [N, M]
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"affinity_logits: need a [N, d] and b [M, d], got {a.shape} and {b.shape}")
    if is_concrete(scale) and not float(scale) > 0:
        raise ValueError(f"affinity_logits: scale must be > 0, got {scale!r}")
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if normalize:
        a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return scale * a @ b.T


def affinity_mimicking_loss(student_logits: jax.Array, teacher_logits: jax.Array, kl: bool = True) -> jax.Array:
    """``½ [CE(S, softmax T) + CE(Sᵀ, softmax Tᵀ)]`` over rows (minus the teacher entropy when ``kl``).

    >>> loss = affinity_mimicking_loss(affinity_logits(s_img, s_txt, 100.), affinity_logits(t_img, t_txt, 100.))
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"affinity_mimicking_loss: need two [N, M] matrices of one shape, got "
                         f"{student_logits.shape} and {teacher_logits.shape}")
    _check_finite("affinity_mimicking_loss", student_logits=student_logits, teacher_logits=teacher_logits)
    s = jnp.asarray(student_logits, jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))

    def one(s, t):
        logp_t = jax.nn.log_softmax(t, -1)
        ce = -(jnp.exp(logp_t) * jax.nn.log_softmax(s, -1)).sum(-1)
        return (ce + (jnp.exp(logp_t) * logp_t).sum(-1) if kl else ce).mean()

    return 0.5 * (one(s, t) + one(s.T, t.T))


def affinity_loss(student_a, student_b, teacher_a, teacher_b, *, student_scale=1.0, teacher_scale=1.0,
                  normalize: bool = True, kl: bool = True) -> jax.Array:
    """Affinity mimicking from the two views' features (student and teacher widths may differ).

    >>> loss = affinity_loss(s_feat, s_feat, t_feat, t_feat, student_scale=10., teacher_scale=10.)   # batch pairs
    """
    _check_finite("affinity_loss", student_a=student_a, student_b=student_b, teacher_a=teacher_a,
                  teacher_b=teacher_b)
    if student_a.shape[0] != teacher_a.shape[0] or student_b.shape[0] != teacher_b.shape[0]:
        raise ValueError(f"affinity_loss: student and teacher views need the same rows, got {student_a.shape}, "
                         f"{teacher_a.shape}, {student_b.shape}, {teacher_b.shape}")
    return affinity_mimicking_loss(affinity_logits(student_a, student_b, student_scale, normalize),
                                   affinity_logits(teacher_a, teacher_b, teacher_scale, normalize), kl)

