"""ggml block formats, byte-identical to GGUF's, so a tensor is used where it lies in a file.

A quantized weight [N, K] is N rows of ``K // block`` blocks each; one row is
``row_bytes(qtype, K)`` bytes. :class:`QuantTensor` holds those bytes as a uint8 tensor
[..., N, row_bytes] (leading dims: stacked experts) together with its type and logical shape.

    Q8_0  32 int8 + fp16 scale                                  34 bytes / 32 weights
    Q4_0  32 4-bit + fp16 scale (x = (q - 8) * d)               18 bytes / 32 weights
    Q4_K  256: fp16 d, dmin, 12 bytes of 6-bit scales/mins,
          128 bytes of 4-bit values                           144 bytes / 256 weights
    Q6_K  256: 128 bytes low 4 bits, 64 bytes high 2 bits,
          16 int8 scales, fp16 d                               210 bytes / 256 weights

This module imports nothing else from megrez: the kernels and the models build on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch


class QType(IntEnum):
    """ggml's type ids (``GGMLQuantizationType``), as stored in GGUF tensor infos."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q8_0 = 8
    Q4_K = 12
    Q6_K = 14
    BF16 = 30


# qtype -> (weights per block, bytes per block)
BLOCK_SIZES: dict[QType, tuple[int, int]] = {
    QType.F32: (1, 4), QType.F16: (1, 2), QType.BF16: (1, 2),
    QType.Q8_0: (32, 34), QType.Q4_0: (32, 18), QType.Q4_K: (256, 144), QType.Q6_K: (256, 210),
}


def row_bytes(qtype: QType, k: int) -> int:
    """Bytes of one row of ``k`` weights; ``k`` must be a multiple of the block size."""
    block, nbytes = BLOCK_SIZES[QType(qtype)]
    if k % block:
        raise ValueError(f"{QType(qtype).name} rows need a multiple of {block} weights, got {k}")
    return k // block * nbytes


@dataclass
class QuantTensor:
    """Quantized weights: ``data`` uint8 [..., N, row_bytes] (contiguous), logical ``shape``
    (..., N, K). Indexing the first dimension gives one stacked matrix (an expert)."""
    data: torch.Tensor
    qtype: QType
    shape: tuple[int, ...]

    def __post_init__(self):
        self.qtype = QType(self.qtype)
        self.shape = tuple(int(s) for s in self.shape)
        want = (*self.shape[:-1], row_bytes(self.qtype, self.shape[-1]))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want:
            raise ValueError(f"{self.qtype.name} data for shape {self.shape} must be uint8 {list(want)}, "
                             f"got {self.data.dtype} {list(self.data.shape)}")

    def __getitem__(self, i: int) -> "QuantTensor":
        return QuantTensor(self.data[i], self.qtype, self.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def is_contiguous(self) -> bool:
        return self.data.is_contiguous()

    def dequantize(self) -> torch.Tensor:
        """float32 weights of ``shape``."""
        return dequantize(self)


def dequantize(qt: QuantTensor) -> torch.Tensor:
    """float32 [*shape], bit for bit what ggml's reference dequantization gives."""
    raise NotImplementedError(f"dequantize {qt.qtype.name}")


def quantize(weight: torch.Tensor, qtype: QType) -> QuantTensor:
    """Quantize float weights [..., N, K] row-wise into ``qtype`` blocks (ggml's reference quantizer)."""
    raise NotImplementedError(f"quantize {QType(qtype).name}")
