"""Post-training quantization with calibration: RTN, GPTQ (act-order, static groups), AWQ (scale + clip search),
RSQ (rotate, scale tokens, GPTQ), the block-wise engine, MiniLM evaluation and packed export.

Each method is ``(params, model: BlockModel, calibration batch, config) -> (quantized params, report)``.
"""

from .awq import AWQConfig, awq
from .blocks import AWQGroup, BlockModel, capture_dense
from .evaluate import embedding_metrics, format_table, ptq_table, run_method
from .export import QuantizedLinear, load_quantized, materialize, quantized_tree, save_quantized
from .gptq import GPTQConfig, gptq, gptq_quantize_weight, hessian_from_inputs
from .rsq import RSQConfig, attention_concentration, random_hadamard, rsq
from .rtn import rtn, rtn_format, rtn_quantize_weight

__all__ = [
    "AWQConfig", "awq", "AWQGroup", "BlockModel", "capture_dense", "embedding_metrics", "format_table", "ptq_table",
    "run_method", "QuantizedLinear", "load_quantized", "materialize", "quantized_tree", "save_quantized",
    "GPTQConfig", "gptq", "gptq_quantize_weight", "hessian_from_inputs", "RSQConfig", "attention_concentration",
    "random_hadamard", "rsq", "rtn", "rtn_format", "rtn_quantize_weight",
]
