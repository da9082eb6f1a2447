"""Normalization and weight-reparameterization layers (Flax linen, pure init/apply), one module per family."""

from jaxmodels.layers.batch_channel_norm import BatchChannelNorm
from jaxmodels.layers.crmsnorm import (
    CRMSNorm,
    PreNormTransformer,
    compress_input,
    compress_output,
    crms_norm,
    fold_norm_affine,
    pre_ln_to_pre_rmsnorm,
    pre_rmsnorm_to_pre_crmsnorm,
    recenter_output,
)
from jaxmodels.layers.evonorm import EvoNormB0, EvoNormS0
from jaxmodels.layers.hopfield import Hopfield, HopfieldLayer, HopfieldPooling, hopfield_update
from jaxmodels.layers.ibn import IBN
from jaxmodels.layers.norms import LayerNorm, RMSNorm, layer_norm, rms_norm
from jaxmodels.layers.powernorm import PowerNorm, apply_grad_stats, power_normalize
from jaxmodels.layers.prepbn import PRepBN, RepBN, fold_repbn, prepbn_gamma
from jaxmodels.layers.reparam import ReparamConv, ReparamDense, reparameterize_tree
from jaxmodels.layers.unified_norm import UnifiedNorm, fold_un_into_dense, un_normalize
from jaxmodels.layers.weight_standardization import (NF_GAINS, RELU_GAIN, ScaledWS, ScaledWSConv, ScaledWSDense,
                                                     WSConv, scaled_weight_standardize, weight_standardize)
from jaxmodels.layers.alpha_bn import alpha_bn_apply, mix_batch_stats

__all__ = [
    "BatchChannelNorm",
    "CRMSNorm", "PreNormTransformer", "compress_input", "compress_output", "crms_norm", "fold_norm_affine",
    "pre_ln_to_pre_rmsnorm", "pre_rmsnorm_to_pre_crmsnorm", "recenter_output",
    "EvoNormB0", "EvoNormS0",
    "Hopfield", "HopfieldLayer", "HopfieldPooling", "hopfield_update",
    "IBN",
    "LayerNorm", "RMSNorm", "layer_norm", "rms_norm",
    "PowerNorm", "apply_grad_stats", "power_normalize",
    "PRepBN", "RepBN", "fold_repbn", "prepbn_gamma",
    "ReparamConv", "ReparamDense", "reparameterize_tree",
    "UnifiedNorm", "fold_un_into_dense", "un_normalize",
    "WSConv", "weight_standardize", "ScaledWS", "ScaledWSConv", "ScaledWSDense", "scaled_weight_standardize",
    "NF_GAINS", "RELU_GAIN", "alpha_bn_apply", "mix_batch_stats",
]
