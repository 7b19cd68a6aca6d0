"""Which ggml type each weight gets under a quantization scheme: the predicate and settings
of a quantized model, decided from the model's tensor names and shapes alone.

The mixes are llama.cpp's (``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp``),
so a model quantized here holds the same types as one made by ``llama-quantize``:

- every 2-D linear weight and the token embedding: the scheme's type (Q8_0, Q4_0, or Q4_K
  for ``q4_k_m``); routed experts included;
- the output projection (``lm_head``; the embedding when they are tied): Q6_K, except under
  ``q8_0`` (stays Q8_0), or Q8_0 when its rows are not whole 256-weight super-blocks;
- ``q4_k_m`` only: ``attn_v`` and every ``ffn_down`` (dense, shared-expert and routed-expert)
  of the layers ``use_more_bits`` picks get Q6_K: the first and last eighth of the layers and
  every third layer between;
- the router (``ffn_gate_inp``), its correction bias, norms and biases stay float32;
- rows that are not whole blocks fall back as llama.cpp does: Q4_K to Q5_0, Q6_K to Q8_0, and
  anything whose rows are not whole 32-weight blocks to F16.
"""
from __future__ import annotations

import re

import torch

from .formats import BLOCK_SIZES, QType

SCHEMES: dict[str, QType] = {"q8_0": QType.Q8_0, "q4_0": QType.Q4_0, "q4_k_m": QType.Q4_K,
                             "f16": QType.F16, "bf16": QType.BF16, "f32": QType.F32}
QUANTIZED_SCHEMES = ("q8_0", "q4_0", "q4_k_m")  # what --quantization offers (the rest are GGUF outputs)

# Our (Hugging Face) parameter names of the weights a scheme applies to.
LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj\.weight|mlp\.(shared_experts\.)?"
                    r"(gate|up|down)_proj\.weight|mlp\.experts\.(gate|up|down)_proj)$")
EMBEDDING = "model.embed_tokens.weight"
OUTPUT = "lm_head.weight"
FALLBACK = {QType.Q4_K: QType.Q5_0, QType.Q6_K: QType.Q8_0}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the _M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fits(qtype: QType, k: int) -> QType:
    """``qtype``, or llama.cpp's fallback when rows of ``k`` weights are not whole blocks."""
    if k % BLOCK_SIZES[qtype][0] == 0:
        return qtype
    fallback = FALLBACK.get(qtype)
    if fallback is not None and k % BLOCK_SIZES[fallback][0] == 0:
        return fallback
    return QType.F16


def check_scheme(scheme: str, allowed=tuple(SCHEMES)) -> str:
    name = str(scheme).lower()
    if name not in allowed:
        raise ValueError(f"unsupported quantization {scheme!r} (choose {', '.join(allowed)})")
    return name


def tensor_type(name: str, shape: tuple[int, ...], scheme: str, n_layers: int, tied: bool) -> QType | None:
    """The type of weight ``name`` (our parameter name) under ``scheme``; None: left in float."""
    base = SCHEMES[check_scheme(scheme)]
    k = shape[-1]
    if base in (QType.F32, QType.F16, QType.BF16):
        return base if (name in (EMBEDDING, OUTPUT) or LINEAR.match(name)) else None
    if name == OUTPUT or (tied and name == EMBEDDING):
        if k % 256:
            return fits(QType.Q8_0, k)
        return base if base == QType.Q8_0 else QType.Q6_K
    if name == EMBEDDING:
        return fits(base, k)
    m = LINEAR.match(name)
    if m is None:
        return None
    layer = int(m.group(1))
    qtype = base
    if scheme == "q4_k_m" and (".v_proj." in name or "down_proj" in name) and use_more_bits(layer, n_layers):
        qtype = QType.Q6_K
    return fits(qtype, k)


def tensor_types(model, scheme: str) -> dict[str, QType]:
    """Our parameter name -> type for every weight ``scheme`` quantizes in ``model`` (which may be
    on the meta device)."""
    n_layers = model.args.num_hidden_layers
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    # A multimodal model (MegrezO) quantizes its language model, under ``llm.``; the image and
    # speech encoders stay in float.
    prefix = "llm." if isinstance(getattr(model, "llm", None), torch.nn.Module) else ""
    types = {}
    for name, p in model.named_parameters():
        if not name.startswith(prefix):
            continue
        qtype = tensor_type(name[len(prefix):], tuple(p.shape), scheme, n_layers, tied)
        if qtype is not None:
            types[name] = qtype
    return types


def scheme_bytes(model, scheme: str) -> tuple[int, int]:
    """(bytes stored, bytes read per token) of ``model``'s parameters under ``scheme``, with the
    float parameters it leaves alone counted as float32. Works on a meta-device model."""
    from .formats import row_bytes

    types = tensor_types(model, scheme)
    stored = 0
    for name, p in model.named_parameters():
        qtype = types.get(name)
        stored += p.numel() * 4 if qtype is None else p.numel() // p.shape[-1] * row_bytes(qtype, p.shape[-1])
    counts = model.parameter_counts()
    return stored, round(stored * counts["active"] / max(counts["stored"], 1))
