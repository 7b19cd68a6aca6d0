"""Products with quantized weights (:class:`megrez.quant.QuantTensor`): the functions in
``megrez.kernels`` route here when a weight is quantized.

Reference path: dequantize to float32, then torch. The SIMD kernels replace it where they apply;
every kernel is tested against this path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.formats import QuantTensor


def linear(x: torch.Tensor, weight: QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = F.linear(x.float(), weight.dequantize(), None if bias is None else bias.float())
    return y.to(x.dtype)


def linear_many(x: torch.Tensor, weights: list[QuantTensor], biases: list | None = None) -> list[torch.Tensor]:
    biases = biases or [None] * len(weights)
    return [linear(x, w, b) for w, b in zip(weights, biases)]


def swiglu(x: torch.Tensor, gate: QuantTensor, up: QuantTensor) -> torch.Tensor:
    xf = x.float()
    return (F.silu(F.linear(xf, gate.dequantize())) * F.linear(xf, up.dequantize())).to(x.dtype)


def experts_swiglu(segments: list[tuple[torch.Tensor, QuantTensor, QuantTensor, QuantTensor]]) -> list[torch.Tensor]:
    return [linear(swiglu(x, g, u), d) for x, g, u, d in segments]
