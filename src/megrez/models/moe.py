"""Mixture-of-experts pieces: routing as a pure function, a stacked expert bank, and the
per-layer MoE block (router + shared experts; routed experts are passed in, because a bank
is owned by one layer and used by every layer of its sharing group)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..quant.formats import QuantTensor
from .base import MLP


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    scoring_func: str = "sigmoid"       # sigmoid | softmax
    topk_method: str = "noaux_tc"       # noaux_tc | greedy | group_limited_greedy
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0


def route(logits: torch.Tensor, bias: torch.Tensor | None, cfg: RoutingConfig):
    """Router logits [N, E] -> (weights [N, k] float32, expert indices [N, k]).

    The correction bias only influences which experts are selected; the weights are the
    unbiased scores of the selected experts."""
    logits = logits.float()
    n, e = logits.shape
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    if cfg.topk_method == "greedy":
        weights, indices = scores.topk(cfg.top_k, dim=-1)
    else:
        choice = scores
        if cfg.topk_method == "noaux_tc" and bias is not None:
            choice = scores + bias.float()
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
            grouped = choice.view(n, cfg.n_group, e // cfg.n_group)
            if cfg.topk_method == "noaux_tc":
                group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
            else:
                group_score = grouped.max(dim=-1).values
            kept = group_score.topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
            choice = choice.masked_fill(~keep.repeat_interleave(e // cfg.n_group, dim=1), float("-inf"))
        indices = choice.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
    if cfg.norm_topk_prob and cfg.top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices


def route_rows(x: torch.Tensor, router: "Router", bias: torch.Tensor | None, cfg: RoutingConfig):
    """:func:`route` of ``router(x)`` for x [N, H]: in one kernel call where it applies (the CPU,
    autograd off, float32 router, no group-limited choice), each row routed in one fixed order,
    so a token's experts do not depend on its batch; with torch otherwise."""
    if cfg.topk_method in ("noaux_tc", "greedy") and not (cfg.n_group > 1 and cfg.topk_group < cfg.n_group):
        out = kernels.routing.route(x, router.weight, bias if cfg.topk_method == "noaux_tc" else None, cfg.top_k,
                                    cfg.scoring_func != "sigmoid", cfg.norm_topk_prob,
                                    float(cfg.routed_scaling_factor))
        if out is not None:
            return out
    return route(router(x), bias, cfg)


class Router(nn.Module):
    # Selection is decided by small bias differences: keep the bias in float32 in any dtype.
    float32_buffers = ("e_score_correction_bias",)

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        # Moved by load balancing, never by gradients: a buffer, saved with the weights.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Router math in float32, also under autocast (which would otherwise run it in bf16).
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


class ExpertBank(nn.Module):
    """E SwiGLU experts stacked along the first dimension: gate/up [E, I, H], down [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, H], weights/indices [N, k] -> [N, H]. Tokens are sorted by expert so every
        selected expert runs once over all tokens that chose it; unselected experts are not read."""
        n, k = indices.shape
        if n == 1 and self.weights_stay_valid:
            return self.one_token(x, weights, indices)[0]
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // k
        xs = x[token_of]                                   # [N*k, H] grouped by expert
        ys = torch.empty_like(xs)
        starts, start = {}, 0
        for expert, count in enumerate(counts):
            if count:
                starts[expert] = (start, start + count)
                start += count
        if self.weights_stay_valid:
            # All experts' products in one go (two kernel calls when decoding on a CPU).
            served = list(self.expert_weights(list(starts)))
            outs = kernels.experts_swiglu([(xs[slice(*starts[e])], *w) for e, w in served])
            for (expert, _), out in zip(served, outs):
                ys[slice(*starts[expert])] = out
        else:
            # Each expert's weights are valid only until the next one is requested (offloading).
            for expert, (gate, up, down) in self.expert_weights(list(starts)):
                a, b = starts[expert]
                ys[a:b] = kernels.linear(kernels.swiglu(xs[a:b], gate, up), down)
        ys = ys.float() * weights.reshape(-1)[order, None]
        out = torch.zeros(n, x.shape[-1], dtype=torch.float32, device=x.device)
        out.index_add_(0, token_of, ys)
        return out.to(x.dtype)

    def one_token(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, extra: list = ()):
        """One token (decoding at batch 1; x [1, H]), without token sorting: (routed output
        [1, H], the outputs of ``extra`` SwiGLU experts (gate, up, down) on x, e.g. the shared
        ones), all products in one kernel call. Experts are summed in ascending id order, as in
        :meth:`forward`, so a token's result does not depend on its batch."""
        order = indices[0].argsort()
        served = list(self.expert_weights(indices[0, order].tolist()))
        outs = kernels.experts_swiglu([(x, *w) for _, w in served] + [(x, *w) for w in extra])
        contrib = torch.cat(outs[:len(served)]).float() * weights[0, order, None]
        out = torch.zeros(1, x.shape[-1], dtype=torch.float32, device=x.device)
        for row in contrib:
            out += row
        return out.to(x.dtype), outs[len(served):]

    def one_token_total(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, extra: list = ()):
        """One token's routed output plus the ``extra`` experts' outputs [1, H]: the sum
        :meth:`one_token`'s results make, in one kernel call for quantized weights held here."""
        if type(self).expert_weights is ExpertBank.expert_weights and isinstance(self.gate_proj, QuantTensor):
            order = indices[0].argsort()
            out = kernels.quantized.moe_token(x, self.gate_proj, self.up_proj, self.down_proj,
                                              indices[0, order].tolist(), weights[0, order], list(extra))
            if out is not None:
                return out.to(x.dtype)
        routed, outs = self.one_token(x, weights, indices, extra)
        for o in outs:
            routed = routed + o
        return routed

    # Whether tensors from expert_weights stay valid after the next expert is requested.
    weights_stay_valid = True

    def expert_weights(self, experts: list[int]):
        """(expert, (gate [I, H], up [I, H], down [H, I])) for each requested expert, in an
        order of the bank's choosing. Offloaded banks override this to serve device copies."""
        for e in experts:
            yield e, (self.gate_proj[e], self.up_proj[e], self.down_proj[e])


class MoeBlock(nn.Module):
    """One MoE layer's own parts: router and shared experts (and, on a group's owner layer,
    the routed expert bank that the whole group uses)."""

    def __init__(self, hidden: int, num_experts: int, expert_intermediate: int, n_shared: int,
                 owns_bank: bool):
        super().__init__()
        self.gate = Router(hidden, num_experts)
        self.shared_experts = MLP(hidden, n_shared * expert_intermediate) if n_shared else None
        self.experts = ExpertBank(num_experts, hidden, expert_intermediate) if owns_bank else None

    def forward(self, y: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, bank: ExpertBank):
        b, t, h = y.shape
        shared = self.shared_experts
        if (b * t == 1 and bank.weights_stay_valid and shared is not None and shared.gate_proj.bias is None
                and type(bank).forward is ExpertBank.forward):
            # One token: the shared experts' products join the routed experts' kernel call
            # (the same products, the same bits as running the MLP on its own).
            out = bank.one_token_total(y.reshape(1, h), weights, indices,
                                       [(shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)])
            return out.view(b, t, h)
        out = bank(y.reshape(b * t, h), weights, indices).view(b, t, h)
        if shared is not None:
            out = out + shared(y)
        return out
