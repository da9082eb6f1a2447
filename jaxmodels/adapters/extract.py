"""LoRA extraction from a full fine-tune, as ``mergekit-extract-lora`` (mergekit 0.1.x,
``mergekit/scripts/extract_lora.py``) does.

Per selected module (Dense kernel or Embed table), in mergekit's torch layout ``M = (W_ft - W_base)ᵀ``
(``[out, in]`` for a Linear; ``[d, vocab]`` for an embedding, which mergekit transposes), float32::

    M = U diag(σ) Vᵀ                                  (thin SVD, σ descending)
    r = min(max_rank, len(σ));  sv_epsilon > 0:  r = min(r, #{σ_i > sv_epsilon})        (mergekit; here at
                                                   least 1, where mergekit would write an empty rank-0 adapter)
    energy e (weightlab's per-layer option):   r = min(r, min{k : Σ_{i<k} σ_i² >= e Σ_i σ_i²})
    distribute_scale (mergekit default):  A_t = diag(√σ_r) V_rᵀ,  B_t = U_r diag(√σ_r)
    else:                                 A_t = diag(σ_r) V_rᵀ,   B_t = U_r

and weightlab's factors are ``lora_A = A_tᵀ [in, r]``, ``lora_B = B_tᵀ [r, out]``. As mergekit, every module
gets ``alpha = r`` (scale 1): the config has ``rank = alpha = max_m r_m`` and ``rank_pattern`` = ``alpha_pattern``
for the modules of other rank, so ``merge(base, lora) = base + truncated delta``. Factors are cast to the
fine-tune's dtype. The rank choice reads σ on the host, so the function is not jit-able as a whole (each SVD is).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.adapters.lora import LoraConfig, _modules, exact_target, module_kind
from jaxmodels.progress import progress_bar
from jaxmodels.tree import check_compatible, unflatten

__all__ = ["extract_lora", "choose_rank"]


@jax.jit
def _svd(base, ft):
    m = (jnp.asarray(ft, jnp.float32) - jnp.asarray(base, jnp.float32)).reshape(-1, ft.shape[-1]).T
    return jnp.linalg.svd(m, full_matrices=False)


def choose_rank(sv: np.ndarray, max_rank: int, sv_epsilon: float = 0.0, energy: float | None = None) -> int:
    """The rank of one module from its singular values (module docstring)."""
    r = min(int(max_rank), int(sv.shape[0]))
    if sv_epsilon > 0:
        r = min(int((sv > sv_epsilon).sum()), r)
    if energy is not None:
        e = np.cumsum(np.asarray(sv, np.float64) ** 2)
        if e[-1] > 0:
            r = min(int(np.searchsorted(e, energy * e[-1] * (1 - 1e-12))) + 1, r)
    return max(r, 1)


def extract_lora(base: Any, finetuned: Any, *, target: str = r".*", exclude: str | None = None,
                 max_rank: int = 128, sv_epsilon: float = 0.0, energy: float | None = None,
                 distribute_scale: bool = True, progress: bool | None = None) -> tuple[Any, LoraConfig]:
    """``(adapters, config)`` approximating ``finetuned - base`` on every 2-D Dense / Embed module whose path
    matches ``target`` (and not ``exclude``); see the module docstring for the SVD and the rank rules."""
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"extract_lora: max_rank must be a positive int, got {max_rank!r}")
    if not (sv_epsilon >= 0 and np.isfinite(sv_epsilon)):
        raise ValueError(f"extract_lora: sv_epsilon must be finite and >= 0, got {sv_epsilon!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"extract_lora: energy must be in (0, 1], got {energy!r}")
    check_compatible(base, finetuned, names=["base", "finetuned"], check_dtype=False)
    mb, mf = _modules(base), _modules(finetuned)
    todo = []
    for m, lv in mb.items():
        if not (("kernel" in lv or "embedding" in lv) and re.search(target, m)) or (exclude and re.search(exclude, m)):
            continue
        kind, _ = module_kind(m, lv)
        name = "embedding" if kind == "embed" else "kernel"
        if kind == "conv" or np.ndim(lv[name]) != 2:
            continue
        todo.append((m, name))
    if not todo:
        raise ValueError(f"extract_lora: target={target!r} selects no 2-D Dense/Embed module")
    for m, name in todo:
        for tree, t in (("base", mb), ("finetuned", mf)):
            if not np.all(np.isfinite(np.asarray(t[m][name]).astype(np.float32))):
                raise ValueError(f"extract_lora: {tree} {m}/{name} contains NaN or Inf")
    flat, ranks = {}, {}
    for m, name in progress_bar(todo, progress, desc="extract_lora"):
        u, sv, vh = _svd(mb[m][name], mf[m][name])
        r = choose_rank(np.asarray(sv), max_rank, sv_epsilon, energy)
        u, sv, vh = u[:, :r], sv[:r], vh[:r]
        if distribute_scale:
            at, bt = jnp.sqrt(sv)[:, None] * vh, u * jnp.sqrt(sv)[None, :]
        else:
            at, bt = sv[:, None] * vh, u
        dtype = mf[m][name].dtype
        flat[f"{m}/lora_A"], flat[f"{m}/lora_B"] = at.T.astype(dtype), bt.T.astype(dtype)
        ranks[m] = r
    top = max(ranks.values())
    pattern = {f"^{re.escape(m)}$": r for m, r in ranks.items() if r != top}
    config = LoraConfig(rank=top, alpha=float(top), target=exact_target(ranks),
                        rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()})
    return unflatten(flat), config
