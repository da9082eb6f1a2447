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
- :mod:`~jaxmodels.analysis.bn_only`: "Training BatchNorm and Only BatchNorm" (Frankle et al.): masks of the BN
  affine leaves (or n random weights, the control), an optax wrapper that trains only a mask, and the share of
  disabled features (|γ| ≈ 0).
- :mod:`~jaxmodels.analysis.normgrad`: NormGrad saliency (Rebuffi et al.): ``‖g_u‖·‖y_u‖`` per location at a layer
  (virtual identity, conv and selective variants), combined over layers.
- :mod:`~jaxmodels.analysis.filters`: CNN Filter DB (Gavrikov & Keuper) 3×3 filter quality (sparsity, variance
  entropy, orthogonality) and the PCA-histogram distribution shift between filter sets.
- :mod:`~jaxmodels.analysis.orthogonality`: Orthogonal CNNs (Wang et al.): ``‖Conv(K, K) − I_r0‖²`` with the
  stride, as a loss term for any train step, and the conditioning of a conv operator.
- :mod:`~jaxmodels.analysis.interaction_basis`: the local interaction basis (Bushnaq et al.) of an MLP's layers and
  the sparsity of the interactions between adjacent layers' directions, against the PCA and neuron bases.
- :mod:`~jaxmodels.analysis.projection_head`: layer-wise feature weighting of a linear chain (Xue et al., ICLR 2024:
  why a projection head helps), from weights or from representations; HaoChen et al.'s spectral contrastive loss.
- :mod:`~jaxmodels.analysis.sublayers`: a Llama-family / GPT-2 decoder run block by block from its params, with
  attention and MLP sublayers kept, dropped or gated (one compiled program for every drop pattern), the residual
  stream, and the smaller renumbered model after block removal.
- :mod:`~jaxmodels.analysis.depth`: "Do language models use their depth efficiently?" (Csordás et al.): per-layer
  contribution norms and cosines of the residual updates, and the effect of skipping a layer on later layers and
  on the output distribution.
- :mod:`~jaxmodels.analysis.rift`: RiFT's module robust criticality, fine-tuning of the least critical module and
  the interpolation back to the original weights.
"""

from jaxmodels.analysis import (bn_only, data_diet, depth, farms, filters, interaction_basis, neural_collapse, normgrad,
                                orthogonality, projection_head, rift, spectral, sublayers)
from jaxmodels.analysis.bn_only import (
    BN_PATTERN,
    BN_SCALE_PATTERN,
    DisabledFeatures,
    bn_mask,
    count_trainable,
    disabled_features,
    random_mask,
    train_only,
)
from jaxmodels.analysis.data_diet import el2n_scores, grand_scores, prune_by_score
from jaxmodels.analysis.depth import (
    DepthContributions,
    SkipEffects,
    contributions_from_stream,
    layer_contributions,
    skip_effects,
)
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
from jaxmodels.analysis.filters import (
    FilterPCA,
    FilterQuality,
    FilterShift,
    coefficient_histograms,
    entropy_max_threshold,
    filter_distribution_shift,
    filter_orthogonality,
    filter_pca,
    filter_quality,
    filter_sparsity,
    kernel_filters,
    layer_filter_quality,
    scale_filters,
    symmetric_kl,
    variance_entropy,
)
from jaxmodels.analysis.interaction_basis import (
    EdgeSparsity,
    InteractionBasis,
    dense_layer_fns,
    edge_sparsity,
    interaction_edges,
    local_interaction_basis,
    neuron_basis,
    node_activations,
    pca_basis,
)
from jaxmodels.analysis.neural_collapse import NeuralCollapse, neural_collapse_metrics
from jaxmodels.analysis.normgrad import (
    layer_output_shape,
    normgrad_combined,
    normgrad_map,
    normgrad_saliency,
    resize_saliency,
)
from jaxmodels.analysis.orthogonality import (
    ConvConditioning,
    conv_conditioning,
    conv_orthogonality_loss,
    conv_singular_values,
    default_padding,
    matrix_orthogonality_loss,
    orthogonality_penalty,
)
from jaxmodels.analysis.projection_head import (
    FeatureWeighting,
    feature_weights,
    representation_feature_weights,
    spectral_contrastive_loss,
)
from jaxmodels.analysis.rift import (
    FinetuneResult,
    InterpolationChoice,
    ModuleCriticality,
    finetune_module,
    interpolate,
    least_critical_module,
    module_robust_criticality,
    select_interpolation,
)
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
from jaxmodels.analysis.sublayers import (
    DecoderSublayers,
    KeptSublayers,
    ResidualStream,
    decoder_sublayers,
    drop_sublayer_params,
    gated_apply,
    remove_blocks,
    residual_stream,
    sublayer_apply,
    sublayer_forward,
)

__all__ = [
    "data_diet", "depth", "farms", "interaction_basis", "neural_collapse", "projection_head", "rift", "spectral",
    "sublayers", "bn_only", "filters", "normgrad", "orthogonality",
    "BN_PATTERN", "BN_SCALE_PATTERN", "DisabledFeatures", "bn_mask", "count_trainable", "random_mask", "train_only",
    "disabled_features",
    "normgrad_saliency", "normgrad_map", "normgrad_combined", "resize_saliency", "layer_output_shape",
    "FilterQuality", "FilterPCA", "FilterShift", "kernel_filters", "entropy_max_threshold", "filter_sparsity",
    "variance_entropy", "filter_orthogonality", "filter_quality", "layer_filter_quality", "scale_filters", "filter_pca",
    "coefficient_histograms", "symmetric_kl", "filter_distribution_shift",
    "ConvConditioning", "conv_orthogonality_loss", "matrix_orthogonality_loss", "orthogonality_penalty",
    "conv_singular_values", "conv_conditioning", "default_padding",
    "DecoderSublayers", "KeptSublayers", "ResidualStream", "decoder_sublayers", "residual_stream", "sublayer_forward",
    "sublayer_apply", "gated_apply", "drop_sublayer_params", "remove_blocks",
    "DepthContributions", "SkipEffects", "layer_contributions", "contributions_from_stream", "skip_effects",
    "InteractionBasis", "EdgeSparsity", "dense_layer_fns", "node_activations", "local_interaction_basis", "pca_basis",
    "neuron_basis", "interaction_edges", "edge_sparsity",
    "FeatureWeighting", "feature_weights", "representation_feature_weights", "spectral_contrastive_loss",
    "ModuleCriticality", "FinetuneResult", "InterpolationChoice", "module_robust_criticality", "least_critical_module",
    "finetune_module", "interpolate", "select_interpolation",
    "el2n_scores", "grand_scores", "prune_by_score",
    "FarmsResult", "farms_esd", "farms_metrics", "layer_farms", "layer_scale_tree", "lr_scales_from_alpha",
    "pruning_ratios_from_alpha", "scale_by_layer", "window_starts",
    "NeuralCollapse", "neural_collapse_metrics",
    "EVALS_THRESH", "PowerLawFit", "SpectralMetrics", "esd", "esd_metrics", "fit_power_law", "hill_alpha",
    "layer_metrics", "matrix_metrics",
]
