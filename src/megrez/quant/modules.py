"""Quantized modules, swapped in for the float ones a quantized weight replaces: a linear layer,
the token embedding and a routed expert bank whose weights are :class:`QuantTensor` s. Models
are unchanged: a quantized layer exposes ``.weight`` (a bank ``gate_proj``/``up_proj``/
``down_proj``) as a QuantTensor, and the kernels in :mod:`megrez.kernels` take it where they
take a weight.

:func:`quantize_modules` swaps modules by a table of tensor types (from a quantization recipe,
or from the types found in a GGUF file) on a model built on the meta device, allocating only
the quantized bytes; loading then fills them tensor by tensor. Every quantized module lists its
QuantTensor attributes in ``quant_tensors``, which is how checkpoint naming and loading find them.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..models import structure
from ..models.moe import ExpertBank
from .formats import QType, QuantTensor, dequantize, row_bytes


def empty_quant(qtype: QType, shape: tuple[int, ...], device="cpu") -> QuantTensor:
    shape = tuple(int(s) for s in shape)
    data = torch.empty(*shape[:-1], row_bytes(qtype, shape[-1]), dtype=torch.uint8, device=device)
    return QuantTensor(data, qtype, shape)


class _CountsReplacedWeights:
    """Assigning one of ``quant_tensors`` (plain attributes, which torch's registration hooks do
    not see) counts as a change of the model's structure (models.structure)."""

    quant_tensors: tuple[str, ...] = ()

    def __setattr__(self, name, value):
        if name in self.quant_tensors:
            structure.changed()
        super().__setattr__(name, value)


class QuantLinear(_CountsReplacedWeights, nn.Module):
    """``y = x W^T + b`` with W a QuantTensor [out, in]; the bias stays a float parameter."""

    quant_tensors = ("weight",)

    def __init__(self, weight: QuantTensor, bias: nn.Parameter | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.qtype.name}"


class QuantEmbedding(_CountsReplacedWeights, nn.Module):
    """Token embedding with a quantized table [vocab, hidden]: only the looked-up rows are
    dequantized."""

    quant_tensors = ("weight",)

    def __init__(self, weight: QuantTensor):
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        rows = QuantTensor(self.weight.data[flat], self.weight.qtype, (flat.numel(), self.embedding_dim))
        # The C dequantization gives the same bits as the torch one, without its dozens of
        # operator calls (a decoding step looks up one row).
        lib = kernels.load() if kernels.enabled and rows.data.is_cpu and rows.qtype in kernels.quantized.KERNEL_TYPES else None
        out = kernels.quantized.dequantize(lib, rows) if lib is not None else dequantize(rows)
        return out.view(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.weight.qtype.name}"


class QuantExpertBank(_CountsReplacedWeights, ExpertBank):
    """Routed experts stacked as QuantTensors gate/up [E, I, H], down [E, H, I]; indexing one gives
    the expert's matrices (views, nothing copied)."""

    quant_tensors = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, gate_proj: QuantTensor, up_proj: QuantTensor, down_proj: QuantTensor):
        nn.Module.__init__(self)
        self.num_experts = gate_proj.shape[0]
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


def quantize_modules(model: nn.Module, types: dict[str, QType], device="cpu") -> None:
    """Swap every module with a weight named in ``types`` (our parameter name -> ggml type) for
    its quantized counterpart, with uninitialised quantized data on ``device``. Float types
    (F32/F16/BF16) are left to the float modules."""
    types = {k: QType(v) for k, v in types.items() if QType(v) not in (QType.F32, QType.F16, QType.BF16)}
    params = dict(model.named_parameters())
    tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))
    for name, module in list(model.named_modules()):
        if isinstance(module, ExpertBank) and not isinstance(module, QuantExpertBank):
            names = [f"{name}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
            if any(n in types for n in names):
                missing = [n for n in names if n not in types]
                if missing:
                    raise ValueError(f"quantizing an expert bank needs a type for all three projections: {missing}")
                new = QuantExpertBank(*(empty_quant(types[n], params[n].shape, device) for n in names))
                _replace(model, name, new)
        elif isinstance(module, nn.Linear) and f"{name}.weight" in types:
            key = f"{name}.weight"
            if tied and key == "lm_head.weight":
                continue  # the embedding's table, set below
            _replace(model, name, QuantLinear(empty_quant(types[key], params[key].shape, device), module.bias))
        elif isinstance(module, nn.Embedding) and f"{name}.weight" in types:
            key = f"{name}.weight"
            _replace(model, name, QuantEmbedding(empty_quant(types[key], params[key].shape, device)))
    if tied and "model.embed_tokens.weight" in types:
        model.lm_head = QuantLinear(model.model.embed_tokens.weight)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quant_tensors(model: nn.Module) -> dict[str, QuantTensor]:
    """Our name -> QuantTensor for every quantized weight of ``model``."""
    out = {}
    for name, module in model.named_modules():
        for attr in getattr(module, "quant_tensors", ()):
            out[f"{name}.{attr}" if name else attr] = getattr(module, attr)
    return out


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of weights as stored: quantized data plus float parameters and buffers."""
    seen, total = set(), 0
    for qt in quant_tensors(model).values():
        if qt.data.data_ptr() not in seen:
            seen.add(qt.data.data_ptr())
            total += qt.nbytes
    for p in list(model.parameters()) + list(model.buffers()):
        total += p.numel() * p.element_size()
    return total

