"""jaxmodels.optim: optimizers that treat layers differently, as Optax transforms.

Every optimizer is an ``optax.GradientTransformation`` built from small ``scale_by_*`` transforms with
``optax.chain``; state is NamedTuples; all jit and accept sharded params (state inherits their sharding).

| alias | paper | module |
| --- | --- | --- |
| ``lamb`` | You et al. 2020, LAMB | ``lamb`` |
| ``lars`` | You et al. 2017, LARS | ``lars`` |
| ``adamp`` / ``sgdp`` | Heo et al. 2021, AdamP | ``adamp`` |
| ``lisa`` | Pan et al. 2024, LISA | ``lisa`` |
| ``scale_by_tract`` | Petersen et al. 2024, TrAct | ``tract`` |
| ``error_feedback`` / ``sgd_ef21`` | EF21 (Richtárik et al. 2021, 2024); L-GreCo (Alimohammadi et al.) | |
| ``gradnorm_lorp`` | Huang et al. 2025, GradNormLoRP | ``gradnorm_lorp`` |
| ``cotta`` | Wang et al. 2022, CoTTA (continual test-time adaptation) | ``cotta`` |
| ``per_layer_clip`` | McMahan et al. 2018 (PerLayerClip, DP-FedAvg); Pelikan et al. 2023, DP-FL for ASR | ``dp_clip`` |
"""

from jaxmodels.optim.adamp import (
    adamp,
    project_radial,
    radial_projection,
    scale_by_adam_nesterov,
    scale_by_radial_projection,
    sgdp,
)
from jaxmodels.optim.lamb import lamb, scale_by_layerwise_trust_ratio
from jaxmodels.optim.error_feedback import (
    ErrorFeedbackState,
    error_feedback,
    lgreco_allocate,
    sgd_ef21,
    top_k,
)
from jaxmodels.optim.lars import lars, scale_by_lars
from jaxmodels.optim.lisa import LisaState, lisa, lisa_layers, scale_by_lisa
from jaxmodels.optim.tract import scale_by_tract, tract_patches, tract_precondition
from jaxmodels.optim.gradnorm_lorp import (
    GradNormLoRPState,
    gradnorm_lorp,
    scale_by_adam_hf,
    scale_by_gradnorm_lorp,
)
from jaxmodels.optim.dp_clip import PerLayerClipState, clip_layers, layer_clip_norms, per_layer_clip
from jaxmodels.optim.cotta import (CoTTA, CoTTAState, cotta, cotta_augment, ema_update, restore_masks,
                                   soft_cross_entropy, stochastic_restore)

__all__ = [
    "lamb", "scale_by_layerwise_trust_ratio",
    "lars", "scale_by_lars",
    "adamp", "sgdp", "scale_by_radial_projection", "project_radial", "radial_projection", "scale_by_adam_nesterov",
    "lisa", "scale_by_lisa", "LisaState", "lisa_layers",
    "scale_by_tract", "tract_patches", "tract_precondition",
    "error_feedback", "sgd_ef21", "top_k", "lgreco_allocate", "ErrorFeedbackState",
    "gradnorm_lorp", "scale_by_gradnorm_lorp", "scale_by_adam_hf", "GradNormLoRPState",
    "per_layer_clip", "clip_layers", "layer_clip_norms", "PerLayerClipState",
    "cotta", "CoTTA", "CoTTAState", "cotta_augment", "ema_update", "restore_masks", "soft_cross_entropy",
    "stochastic_restore",
]
