"""Model merging: one module per method, each a pure function ``(base, models, **hparams) -> merged`` over pytrees,
registered by name in :mod:`merging.registry`. ``python -m merging CONFIG.yaml --out DIR`` runs mergekit-style configs.
"""

from merging.registry import MergeMethod, available, get, register

# data-free methods (one module each)
from merging import (breadcrumbs, dare, della, linear, model_stock, nuslerp, pcb, slerp, tall_masks,
                     task_arithmetic, ties, wise_ft)
from merging import moe_expert_merge, robust_signatures, sparse_soup  # noqa: E402

# data-aware methods
from merging import (adamerging, atlas, fisher, greedy_soup, lmc, permutation, pleas, regmean,  # noqa: E402
                     twin_merging)
