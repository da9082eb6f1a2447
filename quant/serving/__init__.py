"""Serving formats: PTQ results as Hugging Face folders that transformers / vLLM / GPTQModel / AutoAWQ load.

* GPTQ checkpoints (:mod:`quant.serving.gptq_format`: packed int32 ``qweight``/``qzeros``, float16 ``scales``,
  ``g_idx``; v1 ``z − 1`` zero points by default, ``gptq_v2`` on request; 2/3/4/8 bits, sym/asym, act-order);
* the AutoAWQ GEMM layout (:mod:`quant.serving.awq_format`: 4-bit, output-packed in AWQ's [0,2,4,6,1,3,5,7] order);
* FP8 E4M3 in the compressed-tensors layout (:mod:`quant.serving.fp8_format`: per-channel / per-tensor scales);

:func:`export_hf` writes a folder (atomically, every layer checked first), :func:`load_hf_quantized` reads it back.
The packing is checked against the reference unpacking code of AutoGPTQ, GPTQModel, AutoAWQ and compressed-tensors
(``scripts/make_serving_reference.py``, ``tests/quant/test_serving.py``).
"""

from .awq_format import pack_awq, unpack_awq
from .fp8_format import pack_fp8, unpack_fp8
from .gptq_format import pack_gptq, pack_le, unpack_gptq, unpack_le
from .hf import FORMATS, export_hf, hf_module_names, load_hf_quantized, quantization_config, to_quantized_linear
from .records import FPCodes, IntCodes, fp_codes, int_codes

__all__ = ["FORMATS", "export_hf", "load_hf_quantized", "hf_module_names", "quantization_config",
           "to_quantized_linear", "IntCodes", "FPCodes", "int_codes", "fp_codes", "pack_gptq", "unpack_gptq",
           "pack_awq", "unpack_awq", "pack_fp8", "unpack_fp8", "pack_le", "unpack_le"]
