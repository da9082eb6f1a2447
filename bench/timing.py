"""Timing shared by the bench scripts."""

from __future__ import annotations

import time

import jax


def time_round_robin(fns: dict, repeats: int) -> dict:
    """Min wall time per function over ``repeats`` interleaved calls. ``fns``: ``{name: (fn, args)}``; each is
    called once first (compile + warm up). Round-robin so that load from other processes hits all alike (min, not
    median: contention only ever adds time)."""
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[k] = min(best[k], time.perf_counter() - t0)
    return best
