"""Llama architecture (``LlamaForCausalLM``): Megrez-3B-Instruct and the language model of
Megrez-3B-Omni. Grouped-query attention, rotate-half RoPE, SwiGLU, RMSNorm."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import kernels
from .base import _REQUIRED, MLP, BaseArgs, DecoderLayer, TransformerLM, require, validate_common


@dataclass
class ModelArgs(BaseArgs):
    vocab_size: int = _REQUIRED
    hidden_size: int = _REQUIRED
    intermediate_size: int = _REQUIRED
    num_hidden_layers: int = _REQUIRED
    num_attention_heads: int = _REQUIRED
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pretraining_tp: int = 1

    def validate(self, source: str) -> None:
        validate_common(self, source)
        require(self.pretraining_tp == 1, source, "pretraining_tp", self.pretraining_tp, "1")


class Model(TransformerLM):
    def __init__(self, args: ModelArgs):
        layers = [DecoderLayer(args, i, MLP(args.hidden_size, args.intermediate_size, args.mlp_bias))
                  for i in range(args.num_hidden_layers)]
        super().__init__(args, layers)

    def run_layers(self, h, ctx, cos, sin):
        fused = self.decode_all_layers(h, ctx, cos, sin)
        if fused is not None:
            return fused
        for layer in self.layers:
            if (fused := layer.decode_step(h, ctx, cos, sin, with_mlp=True)) is not None:
                h = fused[0]
                continue
            h, y = layer.attention_block(h, ctx, cos, sin)
            h = h + layer.mlp(y)
        return h

    def _build_decode_plan(self, keep: tuple):
        steps = []
        for layer in self.layers:
            if (att := layer.step_args(with_mlp=True)) is None:
                return None
            steps.append(kernels.moe_step.dense_layer(att, route_next=False))
        a = self.args
        # No MoE layer: the routing arguments (one expert, top-1) are never used.
        return kernels.moe_step.Plan(steps, [], 1, 1, False, False, 1.0, a.num_key_value_heads, a.head_dim, keep)
