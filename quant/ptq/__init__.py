"""Post-training quantization with calibration: RTN, GPTQ (act-order, static groups, format-generic quantizer),
AWQ (scale + clip search), RSQ (rotate, scale tokens, GPTQ), FlexRound (learnable element-wise division rounding,
block-wise reconstruction), ZeroQuant-FP (FP4 weights by GPTQ, FP8 activations, power-of-two scales) with LoRC
(low-rank compensation on top of any method), layer-wise mixed precision under an average-bit budget (LIM / ZD /
HAWQ-V2 Hessian trace), codebook / vector quantization (Hessian-weighted k-means per group with GPTVQ error feedback,
AQLM-style codebook + code fine-tuning, bit-packed codes + fp16 codebooks), the block-wise engine, MiniLM evaluation and packed export; and ZeroQ (data-free calibration
from BatchNorm statistics) for BatchNorm models such as the ResNet.

Engine. Every calibrated method is one walk of :mod:`quant.ptq.engine` (:func:`walk_blocks`: embed -> per block:
statistics -> quantize -> set kernels -> next block, fed by the quantized or the float stream) and most are a
per-layer quantizer ``(w, stats, config) -> record`` under :func:`quantize_layers` (``LAYER_QUANTIZERS``: rtn, gptq,
zeroquant_fp, codebook, flexround, any :mod:`quant.formats` format) with block-level transforms around it (RSQ's
rotation, LoRC, a per-layer config for mixed precision; AWQ's search is its own block step). ``model`` comes from
:func:`block_model` (BERT / MiniLM, the project's GPT, Llama / Mistral / Qwen2, GPT-2); ``calib_batch`` is one
batch or a list of batches (Hessians and errors are accumulated batch by batch; AWQ, FlexRound and the codebook
block fine-tuning concatenate them), padding tokens weigh 0.

Calling convention. Every transformer method is ``method(params, model: BlockModel, calib_batch, config) ->
(quantized params, report)`` — :func:`rtn` (:class:`RTNConfig`; ``model``/``calib_batch`` optional), :func:`gptq`,
:func:`awq`, :func:`rsq`, :func:`flexround`, :func:`zeroquant_fp`, :func:`mixed_precision`, :func:`codebook_quantize`
— and its one-layer form is ``*_quantize_weight(w, H_or_stats, config) -> record`` (``H``: the layer Hessian
2XᵀX/n; FlexRound takes the calibration inputs X itself, it samples mini-batches of them; RTN ignores it). Symmetry
is ``sym`` everywhere. Two steps are not methods of that shape: :func:`lorc` is post-processing
``(params_float, params_quant, rank, *, report) -> (params, report)`` on top of any method's result, and ZeroQ is a
data-generation pipeline for BatchNorm linen models (``distill_data`` -> ``calibrate_ranges`` ->
``quantized_apply``). :func:`rtn_format` rounds to any :mod:`quant.formats` format, ``(params, fmt) -> (params,
report)``.

Report schema. ``report = {"method", "config", "layers": {kernel_path: record}, ...}``; every record has ``weight``
(the dequantized kernel ``[in, out]`` the returned params hold), ``format`` (``"int"``, an FP name such as
``"e2m1"``, ``"codebook"``, or a :mod:`quant.formats` format object for :func:`rtn_format`), ``bits``, ``group_size``
(input features per scale, ``-1``: all) and, for integer/FP codes, ``sym``, ``codes`` ``[in, out]`` (original input
order), ``scale``/``zero`` ``[out, G]`` (``zero=None`` for FP codes; ignored for ``sym``), ``g_idx``, ``perm``;
optional ``stored`` (what the codes dequantize to when ``weight`` applies a run-time transform), ``in_scale``
(AWQ), ``rotation_seed`` (RSQ), ``packed`` (codebook / :func:`rtn_format`), ``lorc`` (LoRC factors), ``error``
(relative output error on the calibration tokens). :func:`quantized_tree` needs nothing else, so every result
exports.
"""

from . import zeroq
from .awq import AWQConfig, awq
from .block_models import block_model
from .blocks import AWQGroup, BlockModel, capture_dense
from .codebook import (
    CodebookConfig, CodebookWeight, codebook_quantize, codebook_quantize_weight, codebook_tree, materialize_codebooks,
)
from .engine import (
    LAYER_QUANTIZERS, BlockView, LayerStats, LayerTransform, LoRCTransform, RotationTransform, quantize_layers,
    walk_blocks,
)
from .evaluate import embed_quantized, embedding_metrics, format_table, ptq_table, real_bits_per_weight, run_method
from .export import QuantizedLinear, load_quantized, materialize, quantized_tree, save_quantized
from .flexround import FlexRoundConfig, flexround, flexround_quantize_weight
from .gptq import GPTQConfig, MinMaxQuantizer, gptq, gptq_quantize_weight, hessian_from_inputs
from .lorc import lorc, lorc_bits_per_weight, lorc_factors, lorc_weight
from .mixed_precision import (
    MixedPrecisionConfig, allocate_knapsack, allocate_ranked, hessian_traces, hutchinson_trace, importance_scores,
    lim_scores, mixed_precision, zd_scores,
)
from .rsq import RSQConfig, attention_concentration, random_hadamard, rsq
from .rtn import RTNConfig, rtn, rtn_format, rtn_quantize_weight
from .zeroq import DistillConfig, calibrate_ranges, distill_data, quantized_apply
from .zeroquant_fp import (
    FPQuantizer, ZeroQuantFPConfig, embed_a8, forward_a8, fp_act_quant, pow2_scales, zeroquant_fp,
    zeroquant_fp_weight,
)

__all__ = [
    "AWQConfig", "awq", "AWQGroup", "BlockModel", "capture_dense", "embed_quantized", "embedding_metrics",
    "format_table", "ptq_table", "real_bits_per_weight", "run_method", "RTNConfig", "QuantizedLinear", "load_quantized", "materialize", "quantized_tree",
    "save_quantized", "FlexRoundConfig", "flexround", "flexround_quantize_weight", "GPTQConfig", "MinMaxQuantizer",
    "gptq", "gptq_quantize_weight", "hessian_from_inputs", "lorc", "lorc_bits_per_weight", "lorc_factors",
    "lorc_weight", "MixedPrecisionConfig", "allocate_knapsack", "allocate_ranked", "hessian_traces",
    "hutchinson_trace", "importance_scores", "lim_scores", "mixed_precision", "zd_scores", "RSQConfig",
    "attention_concentration", "random_hadamard", "rsq", "rtn", "rtn_format", "rtn_quantize_weight", "zeroq",
    "DistillConfig", "calibrate_ranges", "distill_data", "quantized_apply", "FPQuantizer", "ZeroQuantFPConfig",
    "embed_a8", "forward_a8", "fp_act_quant", "pow2_scales", "zeroquant_fp", "zeroquant_fp_weight",
    "CodebookConfig", "CodebookWeight", "codebook_quantize", "codebook_quantize_weight", "codebook_tree",
    "materialize_codebooks", "LAYER_QUANTIZERS", "BlockView", "LayerStats", "LayerTransform", "LoRCTransform",
    "RotationTransform", "quantize_layers", "walk_blocks", "block_model",
]
