"""Robust Weight Signatures (Cai et al. 2023, "Robust Weight Signatures: Gaining Robustness as Easy as Patching
Weights?").

A robust model (e.g. trained against one corruption) differs from the clean model it started from mostly in its
shallow layers. The *signature* of that robustness is the difference restricted to the layers ``S`` the user selects
(a regex on leaf paths), optionally uniformly quantized per tensor to ``bits`` bits::

    σ[l] = Q_b(θ_robust[l] - θ_clean[l])        for l ∈ S          (absent for l ∉ S)
    Q_b(δ) = s · clip(round(δ / s), -q, q),      q = 2^(b-1) - 1,   s = max|δ| / q     (symmetric, per tensor)

Patching a model with several signatures and coefficients ``c_i``, and unpatching it::

    patch(θ)[l]   = θ[l] + Σ_i c_i σ_i[l]       (l in any signature; every other leaf is returned unchanged)
    unpatch(θ')[l] = θ'[l] - Σ_i c_i σ_i[l]

Float addition is not exactly invertible (``(θ + Δ) - Δ`` may differ from ``θ`` in the last bit), so
``patch(..., return_undo=True)`` also returns a :class:`PatchUndo` holding the original values of the patched leaves
(only the selected shallow layers); ``unpatch(θ', signatures, coefficients, undo=undo)`` checks that ``θ'`` is still
exactly what that patch produced and restores the originals bit for bit. Computation is in float32; each leaf keeps its
dtype.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxmodels.tree import check_compatible, filter_paths, flatten, unflatten
from merging import _common as C

__all__ = ["extract_signature", "patch", "unpatch", "PatchUndo", "quantize_uniform"]


class PatchUndo(NamedTuple):
    """What :func:`patch` overwrote: ``{path: original leaf}`` for every patched leaf."""
    original: dict


def _check_bits(bits: int | None) -> None:
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 16):
        raise ValueError(f"extract_signature: `bits` must be an int in [2, 16] or None, got {bits!r}")


def quantize_uniform(delta: jax.Array, bits: int) -> jax.Array:
    """Symmetric per-tensor uniform quantization, returned de-quantized: ``s·clip(round(δ/s), -q, q)``,
    ``q = 2^(bits-1) - 1``, ``s = max|δ|/q`` (an all-zero tensor stays zero)."""
    return _quantize(delta.astype(jnp.float32), float(2 ** (bits - 1) - 1))


@jax.jit
def _quantize(d, q):
    amax = jnp.max(jnp.abs(d))
    s = jnp.where(amax > 0, amax / q, 1.0)
    return jnp.clip(jnp.round(d / s), -q, q) * s


@jax.jit
def _diff(robust, clean):
    return robust.astype(jnp.float32) - clean.astype(jnp.float32)


def extract_signature(clean: Any, robust: Any, include: str | Iterable[str], *, exclude: str | Iterable[str] | None = None,
                      bits: int | None = None) -> dict[str, jax.Array]:
    """The robust weight signature ``{path: Q_b(θ_robust - θ_clean)}`` (float32) over the leaves whose path matches
    ``include`` (regex, ``re.search``) and no ``exclude`` regex; ``bits=None`` keeps float32."""
    try:
        check_compatible(clean, robust, names=["clean", "robust"])
    except ValueError as e:
        raise ValueError(f"extract_signature: {e}") from None
    C.check_leaf_dtypes(None, [clean, robust], "extract_signature")
    _check_bits(bits)
    if include is None:
        raise ValueError("extract_signature: `include` must select the shallow layers (a regex on leaf paths)")
    sel_clean = filter_paths(clean, include, exclude)
    if not sel_clean:
        raise ValueError(f"extract_signature: `include`={include!r} selects no leaf; paths are e.g. "
                         f"{list(flatten(clean))[:4]}")
    flat_robust = flatten(robust)
    sig = {}
    for p, c in sel_clean.items():
        d = _diff(flat_robust[p], c)
        sig[p] = d if bits is None else _quantize(d, float(2 ** (bits - 1) - 1))
    return sig


def _as_signatures(signatures: Any, coefficients: Any, flat_model: dict, method: str):
    if isinstance(signatures, dict):
        signatures = [signatures]
    if not isinstance(signatures, (list, tuple)) or not signatures:
        raise TypeError(f"{method}: `signatures` must be a signature dict or a non-empty list of them")
    coefs = C.per_model(coefficients, len(signatures), "coefficients", method)
    for c in coefs:
        C.check_finite_param(c, "coefficients", method)
    for i, sig in enumerate(signatures):
        for p, d in sig.items():
            if p not in flat_model:
                raise ValueError(f"{method}: signature {i} has path {p!r} that the model lacks")
            if tuple(d.shape) != tuple(jnp.shape(flat_model[p])):
                raise ValueError(f"{method}: signature {i} at {p!r} has shape {tuple(d.shape)}, the model "
                                 f"{tuple(jnp.shape(flat_model[p]))}")
    paths = [p for p in flat_model if any(p in s for s in signatures)]
    return list(signatures), coefs, paths


def _delta(p: str, signatures: Sequence[dict], coefs: Sequence[float], shape) -> jax.Array:
    terms = [(c, s[p]) for c, s in zip(coefs, signatures) if p in s]
    return _sum_scaled(tuple(t[1] for t in terms), jnp.asarray([t[0] for t in terms], jnp.float32))


@jax.jit
def _sum_scaled(sigs, c):
    acc = c[0] * sigs[0].astype(jnp.float32)
    for i in range(1, len(sigs)):
        acc = acc + c[i] * sigs[i].astype(jnp.float32)
    return acc


@jax.jit
def _add(x, d):
    return (x.astype(jnp.float32) + d).astype(x.dtype)


@jax.jit
def _sub(x, d):
    return (x.astype(jnp.float32) - d).astype(x.dtype)


def patch(model: Any, signatures: dict | Sequence[dict], coefficients: float | Sequence[float] = 1.0, *,
          return_undo: bool = False) -> Any:
    """``θ + Σ_i c_i σ_i`` on the signatures' leaves (others unchanged). ``return_undo=True`` returns
    ``(patched, PatchUndo)`` for an exact :func:`unpatch`."""
    flat = flatten(model)
    sigs, coefs, paths = _as_signatures(signatures, coefficients, flat, "patch")
    C.check_leaf_dtypes(None, [{p: flat[p] for p in paths}], "patch")
    out = dict(flat)
    for p in paths:
        out[p] = _add(flat[p], _delta(p, sigs, coefs, flat[p].shape))
    patched = unflatten(out, like=model)
    if return_undo:
        return patched, PatchUndo({p: flat[p] for p in paths})
    return patched


def unpatch(patched: Any, signatures: dict | Sequence[dict], coefficients: float | Sequence[float] = 1.0, *,
            undo: PatchUndo | None = None) -> Any:
    """Remove ``Σ_i c_i σ_i``: ``θ' - Σ_i c_i σ_i`` (inverse up to float rounding), or, with the ``undo`` that
    :func:`patch` returned, the exact original leaves after checking that ``patched`` is bit for bit what
    ``patch(original, signatures, coefficients)`` gives (a ``ValueError`` otherwise)."""
    flat = flatten(patched)
    sigs, coefs, paths = _as_signatures(signatures, coefficients, flat, "unpatch")
    out = dict(flat)
    if undo is not None:
        if not isinstance(undo, PatchUndo) or set(undo.original) != set(paths):
            raise ValueError("unpatch: `undo` does not belong to a patch with these signatures")
        for p in paths:
            orig = undo.original[p]
            redo = _add(orig, _delta(p, sigs, coefs, orig.shape))
            if redo.dtype != flat[p].dtype or not bool(jnp.array_equal(redo, flat[p])):
                raise ValueError(f"unpatch: leaf {p!r} is not what patch() produced from `undo` (modified since, or "
                                 "different signatures/coefficients); cannot restore exactly")
            out[p] = orig
    else:
        for p in paths:
            out[p] = _sub(flat[p], _delta(p, sigs, coefs, flat[p].shape))
    return unflatten(out, like=patched)
