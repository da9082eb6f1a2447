"""jaxmodels.analysis: measurements of trained weights and representations, as pure (jit-able) functions.

Convention: every function takes arrays or params trees (linen ``params`` dicts or any pytree) and returns
NamedTuples of jnp scalars; the per-layer variants return ``{path: NamedTuple}`` dicts keyed by the leaf paths of
:func:`jaxmodels.tree.flatten` (``"Dense_0/kernel"``), in tree order. Kernels are in Flax layout (Dense
``[in, out]``, Conv ``[kh, kw, in, out]``). Inputs are validated (shape, dtype, NaN/Inf when concrete) before any
work and never modified; everything computes in float32.

- :mod:`~jaxmodels.analysis.spectral`: heavy-tailed self-regularization metrics as weightwatcher computes them
  (ESD, power-law α with KS-chosen ``xmin``, Hill estimator, α̂, stable rank, spectral / log-spectral norm).
- :mod:`~jaxmodels.analysis.farms`: FARMS's fixed-aspect-ratio subsampled ESD and α per layer, and α turned into
  per-layer learning-rate scales (TempBalance's maps, TB_Sigmoid; an optax transform) or pruning ratios.
- :mod:`~jaxmodels.analysis.neural_collapse`: NC1-NC4 (Papyan, Han & Donoho 2020).
- :mod:`~jaxmodels.analysis.data_diet`: EL2N / GraNd example scores and pruning the data by score.
"""

from jaxmodels.analysis import data_diet, farms, neural_collapse, spectral
from jaxmodels.analysis.data_diet import el2n_scores, grand_scores, prune_by_score
from jaxmodels.analysis.farms import (
    FarmsResult,
    farms_esd,
    farms_metrics,
    layer_farms,
    layer_scale_tree,
    lr_scales_from_alpha,
    pruning_ratios_from_alpha,
    scale_by_layer,
    window_starts,
)
from jaxmodels.analysis.neural_collapse import NeuralCollapse, neural_collapse_metrics
from jaxmodels.analysis.spectral import (
    EVALS_THRESH,
    PowerLawFit,
    SpectralMetrics,
    esd,
    esd_metrics,
    fit_power_law,
    hill_alpha,
    layer_metrics,
    matrix_metrics,
)

__all__ = [
    "data_diet", "farms", "neural_collapse", "spectral",
    "el2n_scores", "grand_scores", "prune_by_score",
    "FarmsResult", "farms_esd", "farms_metrics", "layer_farms", "layer_scale_tree", "lr_scales_from_alpha",
    "pruning_ratios_from_alpha", "scale_by_layer", "window_starts",
    "NeuralCollapse", "neural_collapse_metrics",
    "EVALS_THRESH", "PowerLawFit", "SpectralMetrics", "esd", "esd_metrics", "fit_power_law", "hill_alpha",
    "layer_metrics", "matrix_metrics",
]
