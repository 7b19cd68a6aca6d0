"""Megrez2 (``MegrezMoeForCausalLM``): a DeepSeek-style MoE with two twists.

* Cross-layer expert sharing: the MoE layers form groups of ``experts_shared_frequency``
  consecutive layers; the group's first ("owner") layer holds the routed expert bank and
  every layer of the group computes with it. Routers and shared experts stay per layer.
* Pre-gated routing: layer i's router reads layer i-1's post-attention-norm output, so
  layer i's experts are known before layer i's attention runs.

Routing: sigmoid scores, selection by score + correction bias among the best groups
(``noaux_tc``), weights = unbiased scores, optionally normalised, times
``routed_scaling_factor``. ``router_bias`` picks whose correction bias a layer selects with:
``own`` (default), ``owner`` (the group owner's, as the published SGLang demo does) or ``none``
(as vLLM with the official patch does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import kernels
from ..quant.formats import QuantTensor
from .base import _REQUIRED, MLP, BaseArgs, ConfigError, DecoderLayer, TransformerLM, require, validate_common
from .moe import ExpertBank, MoeBlock, RoutingConfig, route_rows

ROUTER_BIAS_CHOICES = ("own", "owner", "none")


@dataclass
class ModelArgs(BaseArgs):
    vocab_size: int = _REQUIRED
    hidden_size: int = _REQUIRED
    intermediate_size: int = _REQUIRED
    moe_intermediate_size: int = _REQUIRED
    num_hidden_layers: int = _REQUIRED
    num_attention_heads: int = _REQUIRED
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    n_routed_experts: int | None = _REQUIRED
    num_experts_per_tok: int = _REQUIRED
    n_shared_experts: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    experts_shared_frequency: int = 1
    pre_gate: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int | None = 1
    topk_group: int | None = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    ep_size: int = 1
    # Not a Hugging Face key: whose correction bias each layer selects experts with.
    router_bias: str = "own"

    def validate(self, source: str) -> None:
        validate_common(self, source)
        e, k = self.n_routed_experts, self.num_experts_per_tok
        require(isinstance(e, int) and e > 0, source, "n_routed_experts", e, "a positive integer")
        require(isinstance(k, int) and 0 < k <= e, source, "num_experts_per_tok", k,
                f"an integer in 1..n_routed_experts={e}")
        require(isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0, source,
                "moe_intermediate_size", self.moe_intermediate_size, "a positive integer")
        require(self.n_shared_experts is None or (isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0),
                source, "n_shared_experts", self.n_shared_experts, "null or a non-negative integer")
        require(isinstance(self.first_k_dense_replace, int) and self.first_k_dense_replace >= 0, source,
                "first_k_dense_replace", self.first_k_dense_replace, "a non-negative integer")
        # Sharing groups are consecutive MoE layers; interleaved dense layers would make
        # owner(i) point at a dense layer, and no Megrez2 checkpoint does that.
        require(self.moe_layer_freq == 1, source, "moe_layer_freq", self.moe_layer_freq, "1")
        require(isinstance(self.experts_shared_frequency, int) and self.experts_shared_frequency >= 1, source,
                "experts_shared_frequency", self.experts_shared_frequency, "a positive integer")
        require(self.scoring_func in ("sigmoid", "softmax"), source, "scoring_func", self.scoring_func,
                "'sigmoid', 'softmax'")
        require(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), source, "topk_method",
                self.topk_method, "'noaux_tc', 'greedy', 'group_limited_greedy'")
        self.n_group = self.n_group or 1
        self.topk_group = self.topk_group or self.n_group
        require(isinstance(self.n_group, int) and e % self.n_group == 0, source, "n_group", self.n_group,
                f"a divisor of n_routed_experts={e}")
        require(isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group, source, "topk_group",
                self.topk_group, f"an integer in 1..n_group={self.n_group}")
        if self.topk_group < self.n_group:
            require(self.topk_group * (e // self.n_group) >= k, source, "topk_group", self.topk_group,
                    f"a value keeping at least num_experts_per_tok={k} experts")
        require(self.ep_size == 1, source, "ep_size", self.ep_size, "1")
        require(isinstance(self.routed_scaling_factor, (int, float)), source, "routed_scaling_factor",
                self.routed_scaling_factor, "a number")
        require(self.router_bias in ROUTER_BIAS_CHOICES, source, "router_bias", self.router_bias,
                ", ".join(ROUTER_BIAS_CHOICES))

    def is_moe(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def owner(self, i: int) -> int:
        k, f = self.first_k_dense_replace, self.experts_shared_frequency
        return ((i - k) // f) * f + k

    def routing(self) -> RoutingConfig:
        return RoutingConfig(self.num_experts_per_tok, self.scoring_func, self.topk_method, self.n_group,
                             self.topk_group, self.norm_topk_prob, float(self.routed_scaling_factor))


RoutingHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class Model(TransformerLM):
    def __init__(self, args: ModelArgs):
        layers = []
        for i in range(args.num_hidden_layers):
            if args.is_moe(i):
                mlp = MoeBlock(args.hidden_size, args.n_routed_experts, args.moe_intermediate_size,
                               args.n_shared_experts or 0, owns_bank=args.owner(i) == i)
            else:
                mlp = MLP(args.hidden_size, args.intermediate_size)
            layers.append(DecoderLayer(args, i, mlp))
        super().__init__(args, layers)
        self.routing_cfg = args.routing()
        # Called as hook(layer, indices [N, k], weights [N, k]) whenever a layer routes:
        # the place to record routing statistics or start fetching experts.
        self.routing_hooks: list[RoutingHook] = []
        # Optional f(layer, weights, indices) -> (weights, indices) replacing the router's choice
        # (to replay a recorded expert-selection trace); runs before the hooks.
        self.routing_override = None

    def set_router_bias(self, mode: str) -> None:
        if mode not in ROUTER_BIAS_CHOICES:
            raise ConfigError(f"router_bias must be one of {', '.join(ROUTER_BIAS_CHOICES)}, got {mode!r}")
        self.args.router_bias = mode

    def selection_bias(self, i: int) -> torch.Tensor | None:
        mode = self.args.router_bias
        if mode == "none":
            return None
        src = self.args.owner(i) if mode == "owner" else i
        return self.layers[src].mlp.gate.e_score_correction_bias

    def route_layer(self, i: int, route_in: torch.Tensor):
        weights, indices = route_rows(route_in.reshape(-1, route_in.shape[-1]), self.layers[i].mlp.gate,
                                      self.selection_bias(i), self.routing_cfg)
        if self.routing_override is not None:
            weights, indices = self.routing_override(i, weights, indices)
        for hook in self.routing_hooks:
            hook(i, indices, weights)
        return weights, indices

    def run_layers(self, h, ctx, cos, sin):
        fused = self.decode_all_layers(h, ctx, cos, sin)
        if fused is not None:
            return fused
        n, ahead = len(self.layers), None
        for i, layer in enumerate(self.layers):
            moe = self.args.is_moe(i)
            routing, ahead = ahead, None
            # Decoding with quantized weights: the attention half (and a dense layer's MLP) in
            # one kernel call.
            fused = layer.decode_step(h, ctx, cos, sin, with_mlp=not moe)
            h, y = fused if fused is not None else layer.attention_block(h, ctx, cos, sin)
            if moe and routing is None:  # no pre-gating, or an MoE layer with no layer before it
                routing = self.route_layer(i, y)
            if self.args.pre_gate and i + 1 < n and self.args.is_moe(i + 1):
                # Layer i+1's router reads y_i: its experts are known now, before layer i's own
                # MLP and layer i+1's attention run -- the window to fetch them (the routing
                # hooks are called here).
                ahead = self.route_layer(i + 1, y)
            if moe:
                bank = self.layers[self.args.owner(i)].mlp.experts
                h = h + layer.mlp(y, *routing, bank)
            elif fused is None:
                h = h + layer.mlp(y)
        return h

    def _plan_settings(self) -> tuple:
        return self.routing_cfg, self.args.router_bias, self.args.pre_gate, len(self.layers)

    def _build_decode_plan(self, keep: tuple):
        """The layers described for kernels.moe_step (holding ``keep``, the tensors it points
        into), or None where the one-call step does not apply."""
        moe_step = kernels.moe_step
        a, cfg = self.args, self.routing_cfg
        if (cfg.topk_method not in ("noaux_tc", "greedy") or (cfg.n_group > 1 and cfg.topk_group < cfg.n_group)
                or not 1 <= cfg.top_k <= min(moe_step.MAX_EXPERTS_PER_TOKEN, a.n_routed_experts or 0)):
            return None
        n, hidden = len(self.layers), a.hidden_size
        step_layers, moe_layers = [], []
        for i, layer in enumerate(self.layers):
            mlp = layer.mlp
            moe = a.is_moe(i)
            if (att := layer.step_args(with_mlp=not moe)) is None:
                return None
            route_next = bool(a.pre_gate and i + 1 < n and a.is_moe(i + 1))
            if not moe:
                step_layers.append(moe_step.dense_layer(att, route_next))
                continue
            bank = self.layers[a.owner(i)].mlp.experts
            shared = mlp.shared_experts
            if (type(mlp) is not MoeBlock or shared is None or type(shared) is not MLP or not bank.weights_stay_valid
                    or type(bank).forward is not ExpertBank.forward
                    or type(bank).expert_weights is not ExpertBank.expert_weights
                    or any(p.bias is not None for p in (shared.gate_proj, shared.up_proj, shared.down_proj))):
                return None
            shared_w = (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
            if not all(isinstance(w, QuantTensor) for w in (bank.gate_proj, bank.up_proj, bank.down_proj, *shared_w)):
                return None
            bias = self.selection_bias(i) if cfg.topk_method == "noaux_tc" else None
            pre_gated = a.pre_gate and i > 0
            sl = moe_step.moe_layer(att, mlp.gate.weight, bias, (bank.gate_proj, bank.up_proj, bank.down_proj),
                                    shared_w, not pre_gated, route_next, hidden)
            if sl is None:
                return None
            step_layers.append(sl)
            moe_layers.append(i)
        return moe_step.Plan(step_layers, moe_layers, a.n_routed_experts, cfg.top_k, cfg.scoring_func != "sigmoid",
                             cfg.norm_topk_prob, float(cfg.routed_scaling_factor), a.num_key_value_heads, a.head_dim,
                             keep)

    def checkpoint_names(self):
        names = super().checkpoint_names()
        for i, layer in enumerate(self.layers):
            bank = getattr(layer.mlp, "experts", None)
            if bank is None:
                continue
            for proj in ("gate_proj", "up_proj", "down_proj"):
                ours = f"model.layers.{i}.mlp.experts.{proj}"
                del names[ours]
                for j in range(bank.num_experts):
                    names[f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"] = (ours, j)
        return names

    def parameter_counts(self):
        a = self.args
        stored = self.stored_parameters()
        bank = 3 * a.hidden_size * a.moe_intermediate_size
        n_banks = sum(1 for layer in self.layers if getattr(layer.mlp, "experts", None) is not None)
        n_moe = sum(1 for i in range(a.num_hidden_layers) if a.is_moe(i))
        active = stored - n_banks * a.n_routed_experts * bank + n_moe * a.num_experts_per_tok * bank
        return {"stored": stored, "active": active}
