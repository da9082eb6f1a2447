"""Parameter-efficient fine-tuning as pure functions over params: LoRA, rsLoRA, DoRA, QLoRA's hook, PEFT files.

Calling convention (works with every model in :mod:`jaxmodels.models`, no model code changed)::

    from jaxmodels import adapters as ad
    cfg = ad.LoraConfig(rank=8, alpha=16, target=r"attention/(query|value)$")   # module-path regex
    lora = ad.init_lora(key, params, cfg)             # the adapter pytree: the only thing optax sees
    y = ad.apply(model, params, lora, cfg, x)         # unmerged forward (rng=key for adapter dropout)
    merged = ad.merge(params, lora, cfg)              # W + s A B, same tree as params
    params = ad.unmerge(merged, lora, cfg)            # W again (DoRA: norms=ad.dora_norms(params, lora, cfg))
    ad.save_adapter(out_dir, lora, cfg, model_type="llama")  # PEFT's adapter_model.safetensors + adapter_config.json
    lora, cfg = ad.load_adapter(out_dir)              # PEFT-trained adapters too
    merged = ad.merge_adapter(params, lora, cfg)
    lora, cfg = ad.extract_lora(base, finetuned, max_rank=16, energy=0.9)   # mergekit-extract-lora

Training: differentiate w.r.t. the adapters only, the base is a constant argument, e.g. with
``jaxmodels.train.make_train_step(..., has_model_state=True)`` and the frozen params as ``model_state`` (see
tests/jaxmodels/adapters/test_lora.py::test_train_step). Adapter leaves live under the targeted module's path
(``.../query/lora_A [in, r]``, ``lora_B [r, out]``, DoRA's ``lora_magnitude [out]``), so :func:`adapter_rules` derives
their sharding from the model's rules. A frozen quantized base (QLoRA, :mod:`quant.qlora`) plugs in through
``materialize=``.

The adapter papers beyond LoRA, each a module of pure functions with its trainable pytree apart from the frozen
base: :mod:`~jaxmodels.adapters.bone`, :mod:`~jaxmodels.adapters.eva`, :mod:`~jaxmodels.adapters.lift`,
:mod:`~jaxmodels.adapters.mos` (Mixture of Shards), :mod:`~jaxmodels.adapters.scalearn`,
:mod:`~jaxmodels.adapters.mhr`, :mod:`~jaxmodels.adapters.levi` (layer-wise ensemble with a small model trained from
scratch), :mod:`~jaxmodels.adapters.mask_tuning` (Regularized Mask Tuning: binary masks on frozen weights),
:mod:`~jaxmodels.adapters.sherl` (anti-redundancy fusion of frozen intermediate outputs + late-layer tuning) and
:mod:`~jaxmodels.adapters.model_surgery` (MOS: adapter merging and self-refined adapter retrieval),
:mod:`~jaxmodels.adapters.das` (skip the least significant layers, replaced by small adapters),
:mod:`~jaxmodels.adapters.polyhistor` (adapter weights from decomposed task × layer hypernetworks with layer-wise
scaling kernels), :mod:`~jaxmodels.adapters.cema` (entropy-filtered uploads, distillation into the norm affine
parameters with replay) and :mod:`~jaxmodels.adapters.memcontrol` (which parameter subset to fine-tune, by quality
and memorization). PEFT files for conv models: :mod:`~jaxmodels.adapters.peft_io_conv` (the ViT and ResNet name
families; conv layouts in :func:`conv_to_peft`).
"""

from jaxmodels.adapters.lora import (
    ADAPTER_LEAVES,
    LoraConfig,
    adapter_modules,
    column_norm,
    dora_norms,
    init_lora,
    inject,
    lora_delta,
    merge,
    scaling,
    split_adapters,
    unmerge,
)
from jaxmodels.adapters.forward import DROPOUT_RNG, apply, lora_interceptor
from jaxmodels.adapters.sharding import adapter_rules
from jaxmodels.adapters.extract import choose_rank, extract_lora
from jaxmodels.adapters.peft_io import (NAME_MAPS, hf_module_name, linen_module_name, load_adapter, merge_adapter,
                                       save_adapter)
# the papers' methods, one module each (Bone, EVA, LIFT, MoS, ScaLearn, Polytropon/MHR)
from jaxmodels.adapters import bone, eva, lift, mhr, mos, scalearn
from jaxmodels.adapters.bone import BoneConfig, bone_init, bone_merge, bone_unmerge
from jaxmodels.adapters.eva import EvaConfig, eva_init
from jaxmodels.adapters.lift import LiftConfig, scale_by_lift
from jaxmodels.adapters.mhr import MhrConfig, add_task, init_mhr, mhr_merge, mhr_mu
from jaxmodels.adapters.mos import MosConfig, init_mos, mos_lora
from jaxmodels.adapters.scalearn import init_scalearn, scalearn_combine, scalearn_merge
from jaxmodels.adapters import levi, mask_tuning, model_surgery, sherl
from jaxmodels.adapters.levi import LeviOutput, init_levi, levi_logits, levi_loss
from jaxmodels.adapters.mask_tuning import (apply_binary_masks, distill_kl, gradient_dropout, init_masks, mask_reg,
                                            masked_fraction, select_important)
from jaxmodels.adapters.model_surgery import (RetrievalResult, class_prototypes, cosine_logits, merge_task_adapters,
                                              mos_ensemble, self_refined_retrieval)
from jaxmodels.adapters.sherl import init_sherl, sherl_fuse
from jaxmodels.adapters import cema, das, memcontrol, peft_io_conv, polyhistor
from jaxmodels.adapters.cema import (CemaState, cema_loss, cema_select, init_cema, norm_affine_mask, norm_only,
                                     replay_add, replay_sample)
from jaxmodels.adapters.das import das_apply, das_savings, init_das, layer_significance, select_skips, skip_interceptor
from jaxmodels.adapters.memcontrol import (SearchResult, label_memorization, memcontrol_search, pareto_front,
                                           subset_mask, train_subset, trainable_fraction)
from jaxmodels.adapters.peft_io import conv_from_peft, conv_to_peft
from jaxmodels.adapters.polyhistor import (PolyhistorConfig, init_polyhistor, polyhistor_merge, polyhistor_num_params,
                                           polyhistor_weights)

__all__ = [
    "ADAPTER_LEAVES", "LoraConfig", "adapter_modules", "column_norm", "dora_norms", "init_lora", "inject",
    "lora_delta", "merge", "scaling", "split_adapters", "unmerge", "DROPOUT_RNG", "apply", "lora_interceptor",
    "adapter_rules", "choose_rank", "extract_lora", "NAME_MAPS", "hf_module_name", "linen_module_name",
    "load_adapter", "merge_adapter", "save_adapter",
    "bone", "eva", "lift", "mhr", "mos", "scalearn", "BoneConfig", "bone_init", "bone_merge", "bone_unmerge",
    "EvaConfig", "eva_init", "LiftConfig", "scale_by_lift", "MhrConfig", "add_task", "init_mhr", "mhr_merge",
    "mhr_mu", "MosConfig", "init_mos", "mos_lora", "init_scalearn", "scalearn_combine", "scalearn_merge",
    "levi", "mask_tuning", "model_surgery", "sherl", "LeviOutput", "init_levi", "levi_logits", "levi_loss",
    "init_masks", "apply_binary_masks", "select_important", "gradient_dropout", "distill_kl", "mask_reg",
    "masked_fraction", "RetrievalResult", "merge_task_adapters", "class_prototypes", "cosine_logits",
    "self_refined_retrieval", "mos_ensemble", "init_sherl", "sherl_fuse",
    "cema", "das", "memcontrol", "peft_io_conv", "polyhistor", "conv_to_peft", "conv_from_peft",
    "init_das", "das_apply", "layer_significance", "select_skips", "das_savings", "skip_interceptor",
    "PolyhistorConfig", "init_polyhistor", "polyhistor_merge", "polyhistor_weights", "polyhistor_num_params",
    "CemaState", "init_cema", "cema_select", "cema_loss", "replay_add", "replay_sample", "norm_affine_mask",
    "norm_only", "SearchResult", "subset_mask", "label_memorization", "pareto_front", "memcontrol_search",
    "trainable_fraction", "train_subset",
]
