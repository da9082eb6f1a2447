"""Adapter shardings derived from the model's rules: an adapter shards with its base weight.

For a base kernel whose rule gives ``P(*lead, p_in, p_out)`` (``lead``: stacked axes; conv: ``P(h, w, p_in,
p_out)``), ``lora_A`` (``[..., in, r]``) gets ``P(*lead, p_in, None)``, ``lora_B`` (``[*lead, r, out]``)
``P(*lead, None, p_out)`` and DoRA's ``lora_magnitude`` (``[*lead, out]``) ``P(*lead, p_out)``: the low-rank
product ``x A B`` then needs the same collectives as ``x W`` (column-parallel: none; row-parallel: one
all-reduce of the ``[tokens, r]`` activation). Embedding tables ``[vocab, d]`` map the same way.
"""

from __future__ import annotations

import re
from typing import Any

from jax.sharding import Mesh, PartitionSpec as P

from jaxmodels.adapters.lora import adapter_modules, _modules, _shape
from jaxmodels.sharding import spec_for

__all__ = ["adapter_rules"]


def adapter_rules(adapters: Any, params: Any, rules, mesh: Mesh) -> list[tuple[str, P]]:
    """Exact-path rules (``^path$``) for every adapter leaf, from the rule of its module's base weight; prepend
    them to the model rules (``adapter_rules(...) + rules``) for ``shard`` / ``init_train_state``."""
    base = _modules(params)
    out = []
    for m, leaves in adapter_modules(adapters).items():
        if m not in base:
            raise ValueError(f"adapter module {m!r} is not in the params")
        wname = "embedding" if "embedding" in base[m] else "kernel"
        shape = _shape(base[m][wname])
        spec = tuple(spec_for(f"{m}/{wname}", shape, rules, mesh))
        spec = spec + (None,) * (len(shape) - len(spec))
        nb = leaves["lora_B"].ndim - 2
        lead, p_out = spec[:nb], spec[-1]
        a_nd = leaves["lora_A"].ndim
        out.append((f"^{re.escape(m)}/lora_A$", P(*spec[:a_nd - 1], None)))
        out.append((f"^{re.escape(m)}/lora_B$", P(*lead, None, p_out)))
        if "lora_magnitude" in leaves:
            out.append((f"^{re.escape(m)}/lora_magnitude$", P(*lead, p_out)))
    return out
