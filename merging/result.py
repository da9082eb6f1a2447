"""The one result type of the data-aware merges (see the package docstring)."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["MergeResult"]


class MergeResult(NamedTuple):
    """What every data-aware merge returns: ``params``, the merged tree (shaped like the models, every leaf in its
    own input dtype, except where a method documents a new shape: PLeaS' wider layers), and ``info``, a dict of
    method-specific extras that each method's docstring lists (e.g. greedy soup's ``selected``, AdaMerging's
    ``coefficients`` and ``losses``, RegMean's ``rank_deficient`` layers, Twin-Merging's ``router``). ``info`` is
    ``{}`` when a method has nothing to add."""

    params: Any
    info: dict
