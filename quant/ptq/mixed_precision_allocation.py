"""Bit allocation of layer-wise mixed precision (:mod:`quant.ptq.mixed_precision`) under an average-bit budget
Σ_i n_i b_i ≤ B̄ Σ_i n_i: the layer-wise paper's ranked allocation (Dumitru et al., 2024: the most important layers
at the higher of two widths) and HAWQ-V2's exact multiple-choice knapsack (Dong et al., 2019: min Σ_i Ω_i(b_i)).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Mapping

import numpy as np

__all__ = ["allocate_ranked", "allocate_knapsack", "default_levels", "reverse_ranks"]


def _capacity(budget, sizes: Mapping[str, int]) -> tuple[int, int]:
    """(g, C): g = gcd of the sizes, C = ⌊budget · Σ n / g⌋ — the budget in units of g weight-bits (exact)."""
    ns = [int(n) for n in sizes.values()]
    if not ns or any(n < 1 for n in ns):
        raise ValueError(f"sizes must be positive integers, got {dict(sizes)}")
    g = math.gcd(*ns)
    return g, math.floor(Fraction(float(budget)) * sum(ns) / g)


def allocate_ranked(importance: Mapping[str, float], sizes: Mapping[str, int], budget: float,
                    levels: tuple[int, int]) -> dict[str, int]:
    """The layer-wise paper's allocation: rank by ``importance`` (descending; ties keep the given order); the longest
    prefix of the ranking that keeps Σ n_i b_i ≤ budget · Σ n_i gets ``hi`` bits, the rest ``lo`` (so a more important
    layer never gets fewer bits). ``budget`` must be in [lo, hi]."""
    lo, hi = levels
    if set(importance) != set(sizes):
        raise ValueError("importance and sizes must have the same keys")
    if not lo <= budget <= hi:
        raise ValueError(f"need lo <= budget <= hi, got levels {levels}, budget {budget}")
    g, cap = _capacity(budget, sizes)
    names = list(importance)
    order = sorted(range(len(names)), key=lambda i: -float(importance[names[i]]))
    used = sum(int(sizes[n]) // g * lo for n in names)
    bits = {n: lo for n in names}
    for i in order:
        n = names[i]
        extra = int(sizes[n]) // g * (hi - lo)
        if used + extra > cap:
            break
        used += extra
        bits[n] = hi
    return bits


def allocate_knapsack(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
                      budget: float) -> dict[str, int]:
    """HAWQ-V2's allocation: min Σ_i c_i(b_i) subject to Σ_i n_i b_i ≤ budget · Σ_i n_i, b_i among the keys of
    ``costs[i]`` — solved exactly (multiple-choice knapsack) by dynamic programming over the Pareto frontier of
    (weight-bits used, total cost), item by item; backtracking gives the choice. Raises if no choice fits."""
    if set(costs) != set(sizes):
        raise ValueError("costs and sizes must have the same keys")
    g, cap = _capacity(budget, sizes)
    names = list(costs)
    size = np.zeros(1, np.int64)
    cost = np.zeros(1, np.float64)
    back = []  # per item: (parent index, bit choice) of every frontier state
    for n in names:
        opts = sorted(costs[n].items())
        w = int(sizes[n]) // g
        s = np.concatenate([size + w * b for b, _ in opts])
        c = np.concatenate([cost + float(v) for _, v in opts])
        parent = np.tile(np.arange(size.size), len(opts))
        choice = np.repeat([b for b, _ in opts], size.size)
        ok = s <= cap
        s, c, parent, choice = s[ok], c[ok], parent[ok], choice[ok]
        if s.size == 0:
            raise ValueError(f"no allocation fits the budget {budget} (even the smallest bits exceed it)")
        idx = np.lexsort((c, s))  # by size, then cost
        s, c, parent, choice = s[idx], c[idx], parent[idx], choice[idx]
        # Pareto frontier: keep a state only if its cost is strictly below every smaller-or-equal-size state's
        best = np.minimum.accumulate(c)
        keep = np.ones(s.size, bool)
        keep[1:] = c[1:] < best[:-1]
        size, cost = s[keep], c[keep]
        back.append((parent[keep], choice[keep]))
    i = int(np.argmin(cost))  # the frontier's last state is the cheapest; argmin is the same, explicitly
    bits = {}
    for n, (parent, choice) in zip(reversed(names), reversed(back)):
        bits[n] = int(choice[i])
        i = int(parent[i])
    return {n: bits[n] for n in names}


def default_levels(candidates, budget) -> tuple[int, int]:
    """The two widths of the ranked allocation when none are given: ``(lo, hi)`` = the largest candidate ``<= budget``
    and the smallest candidate ``>= budget`` (equal when the budget is a candidate), e.g. ``default_levels((2, 3, 4,
    8), 3.5) == (3, 4)``."""
    c = sorted(candidates)
    lo = max(b for b in c if b <= budget)
    hi = min(b for b in c if b >= budget)
    return lo, hi


def reverse_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """The same multiset of values with the ranking reversed (largest ↔ smallest)."""
    names = list(values)
    order = sorted(names, key=lambda n: values[n])
    sorted_vals = sorted(values.values(), reverse=True)
    return {n: v for n, v in zip(order, sorted_vals)}
