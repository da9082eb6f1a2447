"""Post-training pruning on the calibration engine of :mod:`quant.ptq`: magnitude, Wanda and SparseGPT, unstructured
(per layer / per output row / global) and N:M (2:4, 4:8); mask pytrees and an optax wrapper that keeps them
through training; layer-adaptive sparsity allocation.

Calling convention (the one of :mod:`quant.ptq`). Every method is ``method(params, model: BlockModel, calib,
config) -> (pruned params, report)``:

* :func:`prune_magnitude` (:class:`MagnitudeConfig`; ``model`` / ``calib`` optional: data-free, they only add the
  per-layer output errors),
* :func:`wanda` (:class:`WandaConfig`: per-output-row comparison group by default, as the paper),
* :func:`sparsegpt` (:class:`SparseGPTConfig`: ``block_size=128``, ``percdamp=0.01`` as the reference),

with ``model`` from :func:`quant.ptq.block_model` (BERT / MiniLM, the project's GPT, Llama / Mistral / Qwen2,
GPT-2) and ``calib`` one batch or a list of batches (padding tokens weigh 0). They run on the one block walk of
:mod:`quant.ptq.engine`: each block's linears are scored on the inputs of the unpruned block and the next block is
fed the pruned block's outputs (the references' sequential loop). The one-layer forms are ``*_prune_weight(w,
stats, config) -> record`` with ``w`` a Flax kernel ``[in, out]``: :func:`magnitude_prune_weight` (``stats``
unused), :func:`wanda_prune_weight` (the squared input norms ``E[x_j²]``, or a Hessian / LayerStats),
:func:`sparsegpt_prune_weight` (the Hessian ``2 E[x xᵀ]``); they are registered as the engine's layer functions
``"magnitude"``, ``"wanda"`` and ``"sparsegpt"`` (:func:`quant.ptq.quantize_layers`, e.g. with a transform).

Config. ``sparsity`` in [0, 1) (⌊n·s⌋ pruned per comparison group, exactly); ``nm="2:4"`` (or ``(2, 4)``): ``n``
of every ``m`` consecutive input weights of each output row pruned (the references' ``prune_n:prune_m``, ``1 <= n <
m``). Bad configs and layer shapes (``in`` not a multiple of ``m``) are rejected before any work.

Report. ``{"method", "config", "layers": {kernel_path: record}, "masks": mask pytree, "sparsity": overall}``; each
record has ``weight`` (the pruned kernel the returned params hold), ``mask`` (bool ``[in, out]``, True = kept),
``sparsity`` (that layer's pruned fraction), ``pattern`` (``"unstructured"`` or ``"n:m"``), ``error`` (relative
output error ``‖XW − XŴ‖² / ‖XW‖²`` on the calibration tokens, when there is data) and, for SparseGPT, ``loss`` and
``percdamp``. The mask pytree has the params' structure (bool arrays at the pruned kernels, ``None`` elsewhere):
:func:`apply_masks`, :func:`mask_sparsity`, :func:`masked` (optax: pruned weights stay 0 through training).

Layer-adaptive sparsity (:mod:`quant.pruning.allocation`): per-layer output-distortion curves over candidate
sparsities, allocated under a global budget by the exact multiple-choice knapsack of
:func:`quant.ptq.allocate_knapsack`.

Depth pruning of decoders (the convention's ``(params, model, calib, config)`` with ``model`` the Llama-family /
GPT-2 linen model itself, run sublayer by sublayer through :mod:`jaxmodels.analysis.sublayers`):
:mod:`quant.pruning.redundancy` (What Matters in Transformers: ``S = 1 − cos(X_in, X_out)`` per block / attention /
MLP, and Block / Attention / MLP / Joint Layer Drop by :func:`layer_drop`) and :mod:`quant.pruning.block_fusion`
(FuseGPT's learnable fusion of a removed block into its neighbours, FoldGPT's gated removal and block weight
sharing), each returning the smaller model that still runs.

Activation sparsity (:mod:`quant.pruning.activation_sparsity`): TEAL (keep the largest ``|x_j|``) and WINA (keep
the largest ``|x_j|·‖W_{j,:}‖₂``, optionally after its orthogonalizing rotation) per token, with per-layer thresholds
calibrated on the engine's block walk (:func:`calibrate_activation_sparsity`) and a masked decoder forward
(:class:`SparseForward`). Dynamic channel masks (:mod:`quant.pruning.dynamic_masks`): Fire Together Wire Together's
per-input gating heads, trained to predict each layer's most active channels (:func:`train_ftwt`).

Structured pruning: :mod:`quant.pruning.structured` (channel groups of a conv / Dense + BatchNorm + the next layer,
filter-norm importance, masking = removal, FLOPs; PAGCP's performance-aware sequential global channel pruning),
:mod:`quant.pruning.k_level` (WGSEF's k-level group sparsity by the sparse envelope function and its prox) and
:mod:`quant.pruning.inheritance` (TinyCLIP's weight inheritance: a smaller ViT / BERT sliced from a teacher's
layers, heads and channels, and the affinity-mimicking distillation loss).
"""

from quant.ptq.engine import register_layer_quantizer

from .allocation import (
    AllocationConfig, allocate_sparsity, distortion_curves, joint_distortion, layer_adaptive_prune,
    prune_with_sparsities,
)
from .activation_sparsity import (
    ActivationSparsityConfig, Orthogonalized, SparseForward, activation_mask, activation_scores,
    calibrate_activation_sparsity, calibrate_threshold, output_error, row_norms, sparse_dense, sparse_forward,
    threshold_mask, topk_mask, wina_orthogonalize,
)
from .block_fusion import (
    FoldGPTConfig, FuseGPTConfig, Reduced, block_gates, foldgpt, fuse_group, fusegpt, macro_influence, share_groups,
    unique_param_count,
)
from .dynamic_masks import (
    FTWTConfig, FTWTHistory, GatedConv, GatedDense, GatingHead, ftwt_loss, heat, mask_density, mask_loss, mass_target,
    static_masks, train_ftwt, uniform_target,
)
from .inheritance import (
    ARCHS, BERT_SPEC, VIT_SPEC, ArchSpec, InheritancePlan, affinity_logits, affinity_loss, affinity_mimicking_loss,
    head_importance, inherit, neuron_importance, plan_inheritance, select_layers, select_top, width_importance,
)
from .k_level import (
    PENALTIES, GSEFState, group_norms, gsef_prox, gsef_proximal, gsef_value, k_level_project, sef_prox, sef_value,
)
from .magnitude import MagnitudeConfig, block_kernel_shapes, magnitude_prune_weight, prune_magnitude
from .masks import (
    MaskedState, apply_masks, check_sparsity, mask_sparsity, masked, masks_from_layers, num_pruned, parse_nm,
    prune_mask, pruning_report,
)
from .redundancy import (
    DROP_TARGETS, LayerDropConfig, RedundancyScores, layer_drop, random_drops, redundancy_from_stream,
    redundancy_scores, select_drops,
)
from .sparsegpt import SparseGPTConfig, sparsegpt, sparsegpt_prune_weight
from .structured import (
    ChannelGroup, PAGCPConfig, PAGCPResult, count_flops, filter_norms, keep_mask, mask_channels, mask_groups, pagcp,
    pagcp_decay, remove_channels, resnet_channel_groups, sequential_channel_groups, uniform_prune,
)
from .wanda import WandaConfig, input_sq_norms, wanda, wanda_prune_weight

register_layer_quantizer("magnitude", magnitude_prune_weight, None)
register_layer_quantizer("wanda", wanda_prune_weight, "hessian")
register_layer_quantizer("sparsegpt", sparsegpt_prune_weight, "hessian")

__all__ = [
    "MagnitudeConfig", "magnitude_prune_weight", "prune_magnitude", "block_kernel_shapes",
    "WandaConfig", "wanda_prune_weight", "wanda", "input_sq_norms",
    "SparseGPTConfig", "sparsegpt_prune_weight", "sparsegpt",
    "MaskedState", "masked", "apply_masks", "mask_sparsity", "masks_from_layers", "prune_mask", "pruning_report",
    "parse_nm", "check_sparsity", "num_pruned",
    "AllocationConfig", "distortion_curves", "allocate_sparsity", "prune_with_sparsities", "layer_adaptive_prune",
    "joint_distortion",
    "RedundancyScores", "LayerDropConfig", "DROP_TARGETS", "redundancy_from_stream", "redundancy_scores",
    "select_drops", "random_drops", "layer_drop",
    "FuseGPTConfig", "FoldGPTConfig", "Reduced", "macro_influence", "fuse_group", "fusegpt", "block_gates",
    "share_groups", "foldgpt", "unique_param_count",
    "ActivationSparsityConfig", "Orthogonalized", "row_norms", "activation_scores", "topk_mask", "calibrate_threshold",
    "threshold_mask", "activation_mask", "sparse_dense", "output_error", "wina_orthogonalize",
    "calibrate_activation_sparsity", "SparseForward", "sparse_forward",
    "GatingHead", "GatedDense", "GatedConv", "heat", "mass_target", "uniform_target", "mask_loss", "ftwt_loss",
    "mask_density", "static_masks", "FTWTConfig", "FTWTHistory", "train_ftwt",
    "ArchSpec", "VIT_SPEC", "BERT_SPEC", "ARCHS", "InheritancePlan", "select_layers", "select_top", "head_importance",
    "neuron_importance", "width_importance", "plan_inheritance", "inherit", "affinity_logits",
    "affinity_mimicking_loss", "affinity_loss",
    "ChannelGroup", "filter_norms", "keep_mask", "mask_channels", "mask_groups", "remove_channels", "count_flops",
    "resnet_channel_groups", "sequential_channel_groups", "uniform_prune", "PAGCPConfig", "PAGCPResult", "pagcp",
    "pagcp_decay",
    "sef_value", "sef_prox", "PENALTIES", "group_norms", "gsef_value", "gsef_prox", "k_level_project",
    "gsef_proximal", "GSEFState",
]
