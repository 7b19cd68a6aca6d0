"""Training cost accounting: FLOPs per token and model FLOP utilisation (MFU).

FLOPs per token follow the usual convention (Chinchilla / nanochat): 6 x the parameters a token
uses in matrix multiplies (active parameters without the input embedding, which is a lookup)
plus 12 x layers x heads x head_dim x sequence length for attention scores and values.
"""
from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def flops_per_token(model, seq_len: int) -> float:
    a = model.args
    active = model.parameter_counts()["active"] - a.vocab_size * a.hidden_size
    return 6.0 * active + 12.0 * a.num_hidden_layers * a.num_attention_heads * a.head_dim * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None
