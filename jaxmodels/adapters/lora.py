"""LoRA / rsLoRA / DoRA adapters as a pytree of their own, and exact merge / unmerge into the base params.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), in linen's kernel layout
(``Dense`` kernel ``W [in, out]``, ``Conv`` kernel ``[kh, kw, in, out]``, ``Embed`` table ``E [vocab, d]``)::

    W_eff = W + s · A B,    A = lora_A [in, r] (conv: [kh, kw, in, r]; embed: [vocab, r]),  B = lora_B [r, out]
    s = alpha / r           (rsLoRA, Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning
                             with LoRA": s = alpha / sqrt(r))

``A B`` contracts A's last axis with B's first, so conv deltas are ``ΔW[h, w, i, o] = sum_k A[h, w, i, k] B[k, o]``
(PEFT's ``lora_B(lora_A(x))`` with ``lora_A`` a conv of the base's geometry and ``lora_B`` a 1x1 conv). Stacked
(scanned) Dense kernels ``[L, in, out]`` get ``A [L, in, r]``, ``B [L, r, out]`` (``LoraConfig.stacked``).

Initialisation as PEFT's ``init_lora_weights=True``: ``A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch's
``kaiming_uniform_(a=sqrt(5))``), ``B = 0``, so ``W_eff = W`` at step 0; for embeddings PEFT's ``A = 0``,
``B ~ N(0, 1)``. ``init="gaussian"``: ``A ~ N(0, 1/r)``, ``B = 0``.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), as PEFT computes it::

    W_eff = m ⊙ (W + s A B) / ||W + s A B||_c     (||.||_c: L2 norm of each output column, over all other axes)
    m = lora_magnitude [out],  initialised to ||W||_c;  the norm is treated as a constant (stop_gradient),
    as the paper's Sec. 4.3 and PEFT do.

The same formula on every kind, as PEFT 0.21 has it: Dense ``||.||_c`` over ``in`` (PEFT's ``DoraLinearLayer``,
``Conv1D`` included), Conv over ``(kh, kw, in)`` (``_DoraConvNdLayer``: PEFT stores the magnitude as
``[1, out, 1, 1]``, here ``[out]``), Embed over the vocabulary axis, one magnitude per embedding dimension
(``DoraEmbeddingLayer``: ``E_eff[v, d] = m[d] (E + s A B)[v, d] / ||(E + s A B)[:, d]||``).

The adapter pytree mirrors the params' module structure with leaves ``lora_A``, ``lora_B`` (and ``lora_magnitude``
for DoRA) where the targeted module's params are: for ``params["layer_0"]["attention"]["query"]["kernel"]`` the
adapter is ``adapters["layer_0"]["attention"]["query"]["lora_A"]``. It is the only thing ``optax`` sees.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.tree import flatten, unflatten

PyTree = Any

__all__ = [
    "LoraConfig", "init_lora", "inject", "split_adapters", "scaling", "lora_delta", "merge", "unmerge",
    "dora_norms", "adapter_modules", "module_kind", "exact_target", "ADAPTER_LEAVES",
]

ADAPTER_LEAVES = ("lora_A", "lora_B", "lora_magnitude")
INITS = ("default", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (PEFT's ``LoraConfig`` under weightlab's names: ``rank`` = PEFT ``r``, ``alpha`` =
    ``lora_alpha``, ``dropout`` = ``lora_dropout``, ``use_rslora``, ``use_dora``, ``rank_pattern``, ``alpha_pattern``).

    ``target``: regex ``re.search``-ed against each module path (the params path without its leaf name, e.g.
    ``"layer_0/attention/query"``); every matching ``Dense``/``Conv`` (leaf ``kernel``) and ``Embed`` (leaf
    ``embedding``) gets an adapter. ``exclude``: regex of module paths to skip. ``rank_pattern`` /
    ``alpha_pattern``: ``{regex: value}`` overriding ``rank`` / ``alpha`` for the module paths they ``re.search``
    (first match wins). ``stacked``: regex of module paths whose kernels carry leading stacked-layer axes (scanned
    layers, e.g. ``r"^layers/"`` for ``GPT(scan_layers=True)``); such a kernel is a Dense with ``ndim - 2`` leading
    axes rather than a Conv. ``dropout`` applies to the adapter input of Dense / Conv only (PEFT does not drop
    embedding ids) and only when an rng is given to :func:`jaxmodels.adapters.apply`.
    """

    rank: int = 8
    alpha: float = 8.0
    target: str = r"(query|value)$"
    exclude: str | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    stacked: str | None = None

    def __post_init__(self):
        for name, r in [("rank", self.rank), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
                raise ValueError(f"LoraConfig.{name} must be a positive int, got {r!r}")
        for name, a in [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if not isinstance(a, (int, float, np.number)) or not math.isfinite(float(a)) or float(a) == 0.0:
                raise ValueError(f"LoraConfig.{name} must be a finite non-zero number, got {a!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        for name in ("target", "exclude", "stacked"):
            pat = getattr(self, name)
            if pat is not None:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ValueError(f"LoraConfig.{name}={pat!r} is not a valid regex: {e}") from None
        for k in (*self.rank_pattern, *self.alpha_pattern):
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(f"LoraConfig pattern key {k!r} is not a valid regex: {e}") from None

    def rank_for(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.rank))

    def alpha_for(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.alpha))

    def selects(self, module: str) -> bool:
        return bool(re.search(self.target, module)) and not (self.exclude and re.search(self.exclude, module))


def exact_target(modules) -> str:
    """A regex selecting exactly these module paths (``^(?:a|b)$``)."""
    return "^(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


def _pattern_value(pattern: Mapping[str, Any], module: str, default):
    for k, v in pattern.items():
        if re.search(k, module):
            return v
    return default


def scaling(config: LoraConfig, module: str, rank: int) -> float:
    """``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``) for ``module``; ``r`` is the adapter's actual
    rank (``lora_A.shape[-1]``), as PEFT uses the rank from ``rank_pattern``."""
    a = config.alpha_for(module)
    return a / math.sqrt(rank) if config.use_rslora else a / rank


# ------------------------------------------------------------------------------------------------- structure

def module_kind(module: str, base_leaves: Mapping[str, Any], config: LoraConfig | None = None) -> tuple[str, int]:
    """``(kind, n_stacked)`` of a module from its params: ``"embed"`` (leaf ``embedding``), ``"dense"`` (2-D
    ``kernel``, or ``kernel`` of a ``stacked`` module with ``ndim - 2`` leading axes) or ``"conv"``."""
    if "embedding" in base_leaves:
        return "embed", 0
    w = base_leaves.get("kernel")
    if w is None:
        raise ValueError(f"module {module!r} has neither a 'kernel' nor an 'embedding' to adapt")
    nd = len(_shape(w))
    if nd == 2:
        return "dense", 0
    if config is not None and config.stacked and re.search(config.stacked, module):
        return "dense", nd - 2
    if nd < 3:
        raise ValueError(f"module {module!r}: kernel of shape {_shape(w)} is not a Dense/Conv kernel")
    return "conv", 0


def _shape(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def _modules(params: PyTree) -> dict[str, dict[str, Any]]:
    """``{module path: {leaf name: leaf}}`` of a params tree (leaves may be QuantizedArray-like pytrees: they are
    kept whole, found by their parent's key ``kernel``/``embedding``)."""
    out: dict[str, dict[str, Any]] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            leaves = {}
            for k, v in node.items():
                if isinstance(v, Mapping):
                    walk(v, f"{prefix}/{k}" if prefix else str(k))
                else:
                    leaves[str(k)] = v
            if leaves:
                out[prefix] = leaves
        else:
            raise TypeError(f"params must be nested dicts of arrays, found {type(node).__name__} at {prefix!r}")

    walk(params, "")
    return out


def adapter_modules(adapters: PyTree) -> dict[str, dict[str, jax.Array]]:
    """``{module path: {"lora_A": .., "lora_B": .., ["lora_magnitude": ..]}}`` of an adapter pytree."""
    mods = _modules(adapters)
    for m, leaves in mods.items():
        extra = set(leaves) - set(ADAPTER_LEAVES)
        if extra or "lora_A" not in leaves or "lora_B" not in leaves:
            raise ValueError(f"adapter module {m!r} has leaves {sorted(leaves)}; expected lora_A, lora_B "
                             "[, lora_magnitude]")
    return mods


def base_weight(leaves: Mapping[str, Any], materialize: Callable | None = None) -> Any:
    """The frozen base weight of a module (``kernel`` or ``embedding``); non-array leaves (e.g. a quantized
    ``QuantizedArray``) go through ``materialize`` (the QLoRA hook, :mod:`quant.qlora`)."""
    w = leaves["embedding"] if "embedding" in leaves else leaves["kernel"]
    if isinstance(w, (jax.Array, np.ndarray)):
        return w
    if materialize is None:
        raise TypeError(f"base weight is a {type(w).__name__}, not an array: pass materialize= (e.g. "
                        "quant.qlora.dequantize_base) to read a frozen quantized base")
    return materialize(w)


def _check_finite(name: str, x) -> None:
    if isinstance(x, jax.core.Tracer):
        return
    if not bool(np.all(np.isfinite(np.asarray(x).astype(np.float32)))):  # on the host: no XLA op to compile
        raise ValueError(f"{name} contains NaN or Inf")


# ------------------------------------------------------------------------------------------------- init

def init_lora(key: jax.Array, params: PyTree, config: LoraConfig, *, dtype: Any = jnp.float32,
              materialize: Callable | None = None) -> PyTree:
    """Fresh adapters for every module of ``params`` that ``config`` selects (see the module docstring for the
    initialisation). Raises ``ValueError`` if nothing is selected. DoRA magnitudes start at ``||W||_c``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    mods = {m: lv for m, lv in _modules(params).items()
            if ("kernel" in lv or "embedding" in lv) and config.selects(m)}
    if not mods:
        raise ValueError(f"LoraConfig.target={config.target!r} selects no Dense/Conv/Embed module of the params")
    plan, dora = [], {}
    for m, lv in sorted(mods.items()):
        kind, nb = module_kind(m, lv, config)
        shape = _shape(lv["embedding"] if kind == "embed" else lv["kernel"])
        plan.append((m, kind, nb, shape, config.rank_for(m)))
        if config.use_dora:
            dora[m] = jnp.asarray(base_weight(lv, materialize))
    flat = _init_jit(key, dora, tuple(plan), config.init, np.dtype(dtype))
    return unflatten(flat)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _init_jit(key, dora, plan, init, dtype):
    """All adapters of one :func:`init_lora` call in one compiled program (eager, every op would compile)."""
    flat = {}
    for i, (m, kind, nb, shape, r) in enumerate(plan):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        lead, fan_shape, out = shape[:nb], shape[nb:-1], shape[-1]
        a_shape, b_shape = lead + fan_shape + (r,), lead + (r, out)
        fan_in = int(np.prod(fan_shape))
        if kind == "embed":
            a = jnp.zeros(a_shape, dtype)
            b = jax.random.normal(kb, b_shape, jnp.float32).astype(dtype)
        elif init == "gaussian":
            a = (jax.random.normal(ka, a_shape, jnp.float32) / r).astype(dtype)
            b = jnp.zeros(b_shape, dtype)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(ka, a_shape, jnp.float32, -bound, bound).astype(dtype)
            b = jnp.zeros(b_shape, dtype)
        flat[f"{m}/lora_A"], flat[f"{m}/lora_B"] = a, b
        if m in dora:
            flat[f"{m}/lora_magnitude"] = column_norm(dora[m], nb).astype(dtype)
    return flat


def column_norm(w: jax.Array, n_stacked: int = 0) -> jax.Array:
    """``||W||_c``: the L2 norm of each output column (last axis) over the non-stacked axes, in float32."""
    w = jnp.asarray(w, jnp.float32)
    axes = tuple(range(n_stacked, w.ndim - 1))
    return jnp.sqrt(jnp.sum(w * w, axis=axes))


# ------------------------------------------------------------------------------------------------- trees

def inject(params: PyTree, adapters: PyTree) -> PyTree:
    """``params`` with each adapter module's ``lora_*`` leaves added next to its kernel (new dicts; inputs are not
    modified). This is what :func:`jaxmodels.adapters.apply` hands to ``model.apply``; gradients flow to the
    adapters through it."""
    mods = adapter_modules(adapters)
    base = _modules(params)

    def copy(node):
        return {k: copy(v) if isinstance(v, Mapping) else v for k, v in node.items()}

    out = copy(params)
    for m, leaves in mods.items():
        if m not in base or not ("kernel" in base[m] or "embedding" in base[m]):
            raise ValueError(f"adapter module {m!r} has no kernel/embedding in the params")
        node = out
        for k in m.split("/"):
            node = node[k]
        clash = set(leaves) & set(node)
        if clash:
            raise ValueError(f"params at {m!r} already hold {sorted(clash)} (adapters injected twice?)")
        node.update(leaves)
    return out


def split_adapters(params: PyTree) -> tuple[PyTree, PyTree]:
    """Inverse of :func:`inject`: ``(params without lora_* leaves, adapters)``."""
    flat = flatten(params)
    ad = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] in ADAPTER_LEAVES}
    rest = {k: v for k, v in flat.items() if k not in ad}
    return unflatten(rest), unflatten(ad)


# ------------------------------------------------------------------------------------------------- merge

def lora_delta(a: jax.Array, b: jax.Array, n_stacked: int = 0) -> jax.Array:
    """``A B`` (float32): A's last axis contracted with B's first non-stacked axis, vmapped over stacked axes."""
    f = lambda x, y: jnp.tensordot(x, y, axes=1, precision=jax.lax.Precision.HIGHEST)
    for _ in range(n_stacked):
        f = jax.vmap(f)
    return f(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))


def _merge_plan(params, adapters, config):
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    base, mods = _modules(params), adapter_modules(adapters)
    plan = []
    for m, ad in mods.items():
        if m not in base:
            raise ValueError(f"adapter module {m!r} is not in the params")
        lv = base[m]
        kind, _ = module_kind(m, lv, config)
        wname = "embedding" if kind == "embed" else "kernel"
        w = lv[wname]
        a, b = ad["lora_A"], ad["lora_B"]
        nb = b.ndim - 2
        ws = _shape(w)
        if a.shape[:nb] != ws[:nb] or a.shape[nb:-1] != ws[nb:-1] or b.shape[nb + 1:] != ws[-1:] \
                or a.shape[-1] != b.shape[nb] or b.shape[:nb] != ws[:nb]:
            raise ValueError(f"adapter {m!r}: lora_A {a.shape} / lora_B {b.shape} do not fit {wname} {ws}")
        if "lora_magnitude" in ad and ad["lora_magnitude"].shape != ws[:nb] + ws[-1:]:
            raise ValueError(f"adapter {m!r}: lora_magnitude {ad['lora_magnitude'].shape} does not fit {wname} {ws}")
        for n, x in ad.items():
            _check_finite(f"adapter {m}/{n}", x)
        plan.append((m, wname, w, ad, nb, scaling(config, m, int(a.shape[-1]))))
    return plan


def dora_norms(params: PyTree, adapters: PyTree, config: LoraConfig) -> dict[str, jax.Array]:
    """``{module: ||W + s A B||_c}`` for the DoRA modules: what :func:`unmerge` needs to undo a DoRA merge
    (the merged kernel's own column norms are the magnitudes, so the base norm cannot be recovered from it)."""
    out = {}
    for m, wname, w, ad, nb, s in _merge_plan(params, adapters, config):
        if "lora_magnitude" in ad:
            out[m] = column_norm(jnp.asarray(w, jnp.float32) + s * lora_delta(ad["lora_A"], ad["lora_B"], nb), nb)
    return out


def _set(params, updates: dict[str, Any]):
    flat = flatten(params)
    flat.update(updates)
    return unflatten(flat, like=params)


def merge(params: PyTree, adapters: PyTree, config: LoraConfig) -> PyTree:
    """``W <- W + s A B`` (DoRA: ``W <- m ⊙ (W + s A B) / ||W + s A B||_c``) for every adapter module, computed in
    float32 and cast back to ``W``'s dtype. Returns new params (inputs untouched); jit-able, keeps shardings."""
    _check_base_finite(params, adapters)
    updates = {}
    for m, wname, w, ad, nb, s in _merge_plan(params, adapters, config):
        v = jnp.asarray(w, jnp.float32) + s * lora_delta(ad["lora_A"], ad["lora_B"], nb)
        if "lora_magnitude" in ad:
            mag = jnp.asarray(ad["lora_magnitude"], jnp.float32)
            v = v * _expand_col(mag / column_norm(v, nb), v.ndim, nb)
        updates[f"{m}/{wname}"] = v.astype(w.dtype)
    return _set(params, updates)


def unmerge(params: PyTree, adapters: PyTree, config: LoraConfig, norms: Mapping[str, jax.Array] | None = None
            ) -> PyTree:
    """Inverse of :func:`merge`: ``W <- W' - s A B`` (DoRA: ``W <- W' ⊙ n / m - s A B`` with ``n`` from
    :func:`dora_norms` of the unmerged params, required for DoRA modules). Float arithmetic makes
    ``unmerge(merge(W)) == W`` up to one rounding of ``W + s A B`` (see the tests)."""
    updates = {}
    for m, wname, w, ad, nb, s in _merge_plan(params, adapters, config):
        v = jnp.asarray(w, jnp.float32)
        if "lora_magnitude" in ad:
            if norms is None or m not in norms:
                raise ValueError(f"unmerge: DoRA module {m!r} needs its norms (dora_norms of the unmerged params)")
            mag = jnp.asarray(ad["lora_magnitude"], jnp.float32)
            v = v * _expand_col(jnp.asarray(norms[m], jnp.float32) / mag, v.ndim, nb)
        updates[f"{m}/{wname}"] = (v - s * lora_delta(ad["lora_A"], ad["lora_B"], nb)).astype(w.dtype)
    return _set(params, updates)


def _expand_col(c: jax.Array, ndim: int, nb: int) -> jax.Array:
    """A ``[*stacked, out]`` per-column factor broadcast against a ``[*stacked, ..., out]`` weight."""
    return c.reshape(c.shape[:nb] + (1,) * (ndim - nb - 1) + c.shape[-1:])


def _check_base_finite(params, adapters):
    base = _modules(params)
    for m in adapter_modules(adapters):
        lv = base.get(m, {})
        for n in ("kernel", "embedding"):
            if n in lv and isinstance(lv[n], (jax.Array, np.ndarray)):
                _check_finite(f"params {m}/{n}", lv[n])
