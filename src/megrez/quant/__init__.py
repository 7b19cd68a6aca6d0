"""Weight quantization in ggml's block formats (the formats of GGUF files): Q8_0, Q4_0,
Q4_K and Q6_K, beside plain F32/F16/BF16.

``formats`` is the lowest layer (block layouts, :class:`QuantTensor`, quantize and dequantize);
the CPU kernels compute with a :class:`QuantTensor` where they would take a weight tensor.
"""
from .formats import BLOCK_SIZES, QType, QuantTensor, row_bytes

__all__ = ["BLOCK_SIZES", "QType", "QuantTensor", "row_bytes"]
