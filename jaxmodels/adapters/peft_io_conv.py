"""PEFT files for convolutional models: LoRA / DoRA on ``Conv`` layers (ResNet convs, the ViT patch embedding).

PEFT 0.21's ``lora.Conv2d`` holds ``lora_A = nn.Conv2d(in, r, kernel_size, stride, padding, bias=False)`` and
``lora_B = nn.Conv2d(r, out, (1, 1), (1, 1), bias=False)``, so its tensors are (torch layout ``[out, in, kh, kw]``)::

    base_model.model.<hf>.lora_A.weight          [r, in, kh, kw]   = lora_A.transpose(3, 2, 0, 1)
    base_model.model.<hf>.lora_B.weight          [out, r, 1, 1]    = lora_Bᵀ[:, :, None, None]
    base_model.model.<hf>.lora_magnitude_vector  [1, out, 1, 1]    = lora_magnitude[None, :, None, None]  (DoRA,
                                                  _DoraConvNdLayer: ||W||_c over (in, kh, kw), keepdim, transposed)

with weightlab's ``lora_A [kh, kw, in, r]``, ``lora_B [r, out]``, ``lora_magnitude [out]``
(:mod:`jaxmodels.adapters.lora`). The delta is the same in both libraries::

    ΔW_torch[o, i, h, w] = s Σ_k B_t[o, k] A_t[k, i, h, w] = s Σ_k A[h, w, i, k] B[k, o] = ΔW_linen[h, w, i, o]

(PEFT's ``get_delta_weight`` for a 1x1 ``lora_B``). Linear / Embedding modules keep :mod:`peft_io`'s layouts.

Importing this module registers two families into :data:`jaxmodels.adapters.peft_io.NAME_MAPS`:

* ``"vit"``: :class:`jaxmodels.models.ViT` <-> Hugging Face ``ViTForImageClassification``
  (``patch_embed`` <-> ``vit.embeddings.patch_embeddings.projection``, ``block_i/attn/{query,key,value}`` <->
  ``vit.encoder.layer.i.attention.attention.{query,key,value}``, ``attn/out`` <-> ``attention.output.dense``,
  ``mlp/fc1`` <-> ``intermediate.dense``, ``mlp/fc2`` <-> ``output.dense``, ``head`` <-> ``classifier``;
  the ``vit.`` prefix is optional on load, as ``ViTModel`` has none);
* ``"resnet"``: :class:`jaxmodels.models.ResNet` <-> a PyTorch port that keeps the linen module names
  (``stem_conv``, ``block_k.conv1``, ``block_k.conv2``, ``block_k.shortcut_conv``, ``head``).

:func:`jaxmodels.adapters.save_adapter` / :func:`jaxmodels.adapters.load_adapter` write and read conv adapters
(4-D ``lora_A``) in these layouts (:func:`jaxmodels.adapters.peft_io.conv_to_peft` / ``conv_from_peft``), for any
family; this module adds the two families' names.
"""

from __future__ import annotations

from typing import Any

from jaxmodels.adapters.peft_io import NAME_MAPS

__all__ = ["CONV_FAMILIES"]

CONV_FAMILIES: dict[str, dict[str, Any]] = {
    "vit": dict(
        to_hf=[(r"^patch_embed$", "vit.embeddings.patch_embeddings.projection"),
               (r"^block_(\d+)/attn/(query|key|value)$", r"vit.encoder.layer.\1.attention.attention.\2"),
               (r"^block_(\d+)/attn/out$", r"vit.encoder.layer.\1.attention.output.dense"),
               (r"^block_(\d+)/mlp/fc1$", r"vit.encoder.layer.\1.intermediate.dense"),
               (r"^block_(\d+)/mlp/fc2$", r"vit.encoder.layer.\1.output.dense"),
               (r"^head$", "classifier")],
        to_linen=[(r"^(?:vit\.)?embeddings\.patch_embeddings\.projection$", "patch_embed"),
                  (r"^(?:vit\.)?encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)$", r"block_\1/attn/\2"),
                  (r"^(?:vit\.)?encoder\.layer\.(\d+)\.attention\.output\.dense$", r"block_\1/attn/out"),
                  (r"^(?:vit\.)?encoder\.layer\.(\d+)\.intermediate\.dense$", r"block_\1/mlp/fc1"),
                  (r"^(?:vit\.)?encoder\.layer\.(\d+)\.output\.dense$", r"block_\1/mlp/fc2"),
                  (r"^classifier$", "head")],
        embed=r"(?!)"),  # no Embed modules (a regex that never matches)
    "resnet": dict(
        to_hf=[(r"^(stem_conv|head)$", r"\1"), (r"^block_(\d+)/(conv1|conv2|shortcut_conv)$", r"block_\1.\2")],
        to_linen=[(r"^(stem_conv|head)$", r"\1"), (r"^block_(\d+)\.(conv1|conv2|shortcut_conv)$", r"block_\1/\2")],
        embed=r"(?!)"),
}
for _name, _fam in CONV_FAMILIES.items():
    NAME_MAPS.setdefault(_name, _fam)
