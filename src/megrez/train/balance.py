"""Expert load balancing for Megrez2 training.

Auxiliary-loss-free balancing (the ``noaux_tc`` recipe): the routers select experts with
``score + e_score_correction_bias``; after every optimizer step each layer's bias moves by a
fixed ``rate`` towards balance: up for experts that received fewer tokens than the mean, down
for those that received more. The bias is a buffer, so no gradient ever reaches it, and it only
changes *which* experts are chosen, not their weights.

An optional sequence-wise auxiliary loss (weight ``alpha``, kept small) penalises imbalance
inside each sequence: ``alpha * sum_e f_e * P_e`` with ``f_e`` the fraction of the sequence's
routing slots sent to expert e (times E/k) and ``P_e`` its mean normalised score.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def moe_layers(model) -> list[int]:
    args = model.args
    if not hasattr(args, "is_moe") or not getattr(args, "n_routed_experts", None):
        return []
    return [i for i in range(args.num_hidden_layers) if args.is_moe(i)]


class ExpertLoad:
    """Counts the tokens each expert of each MoE layer receives, through the model's routing
    hooks. Counting is on only while ``active`` (the training forward), so that activation
    checkpointing's recomputation and evaluation passes are not counted; ``token_mask`` (flat
    [B*T], set per batch) leaves padding out."""

    def __init__(self, model, aux_alpha: float = 0.0):
        self.layers = moe_layers(model)
        self.row = {layer: n for n, layer in enumerate(self.layers)}
        self.num_experts = model.args.n_routed_experts if self.layers else 0
        self.top_k = model.args.num_experts_per_tok if self.layers else 0
        self.scoring = getattr(model.args, "scoring_func", "sigmoid")
        device = next(model.parameters()).device
        self.step_counts = torch.zeros(len(self.layers), self.num_experts, dtype=torch.float64, device=device)
        self.window_counts = torch.zeros_like(self.step_counts)
        self.active = False
        self.token_mask: torch.Tensor | None = None
        self.batch_shape: tuple[int, int] | None = None
        self.aux_alpha = aux_alpha
        self.aux_terms: list[torch.Tensor] = []
        self._logits: dict[int, torch.Tensor] = {}
        self._handles = []
        if self.layers:
            model.routing_hooks.append(self._on_route)
            if aux_alpha > 0:
                for i in self.layers:
                    self._handles.append(model.layers[i].mlp.gate.register_forward_hook(self._make_router_hook(i)))

    def _on_route(self, layer: int, indices: torch.Tensor, weights: torch.Tensor) -> None:
        if not self.active:
            return
        with torch.no_grad():
            idx = indices if self.token_mask is None else indices[self.token_mask]
            self.step_counts[self.row[layer]] += torch.bincount(idx.reshape(-1), minlength=self.num_experts)
        logits = self._logits.pop(layer, None)
        if logits is not None:
            self.aux_terms.append(sequence_aux_loss(logits, indices, self.batch_shape, self.num_experts,
                                                    self.top_k, self.scoring, self.token_mask))

    def _make_router_hook(self, layer: int):
        # A layer's router runs just before that layer's routing hook: keep its logits (with
        # their graph) for the aux loss computed there.
        def hook(module, inputs, logits):
            if self.active:
                self._logits[layer] = logits
        return hook

    def take_aux_loss(self) -> torch.Tensor | None:
        if not self.aux_terms:
            return None
        loss = torch.stack(self.aux_terms).mean() * self.aux_alpha
        self.aux_terms = []
        return loss

    def reduce(self) -> None:
        """Sum this step's counts over data-parallel ranks, so every rank moves its biases the same."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.step_counts)

    @torch.no_grad()
    def update_biases(self, model, rate: float) -> None:
        """One auxiliary-loss-free step: bias_e += rate * sign(mean load - load_e), per layer."""
        if rate > 0:
            for n, i in enumerate(self.layers):
                load = self.step_counts[n]
                if load.sum() == 0:
                    continue
                bias = model.layers[i].mlp.gate.e_score_correction_bias
                bias += (rate * torch.sign(load.mean() - load)).to(bias.dtype)
        self.window_counts += self.step_counts
        self.step_counts.zero_()

    def take_window(self) -> torch.Tensor:
        """Counts accumulated since the last call, [layers, experts]."""
        counts = self.window_counts.clone()
        self.window_counts.zero_()
        return counts

    def remove(self, model) -> None:
        if self._on_route in model.routing_hooks:
            model.routing_hooks.remove(self._on_route)
        for h in self._handles:
            h.remove()


def imbalance(counts: torch.Tensor) -> torch.Tensor:
    """Max load over mean load, per layer (1.0 = perfectly balanced)."""
    mean = counts.mean(dim=-1).clamp_min(1e-12)
    return counts.max(dim=-1).values / mean


def sequence_aux_loss(logits: torch.Tensor, indices: torch.Tensor, batch_shape: tuple[int, int],
                      num_experts: int, top_k: int, scoring: str = "sigmoid",
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (without alpha). logits [B*T, E] (float32, with
    grad), indices [B*T, k]."""
    b, t = batch_shape
    scores = logits.float().sigmoid() if scoring == "sigmoid" else logits.float().softmax(-1)
    probs = (scores / scores.sum(-1, keepdim=True)).view(b, t, num_experts)          # [B, T, E]
    chosen = torch.zeros(b * t, num_experts, device=logits.device).scatter_(1, indices, 1.0).view(b, t, num_experts)
    m = torch.ones(b, t, 1, device=logits.device) if token_mask is None else token_mask.view(b, t, 1).float()
    n_tok = m.sum(1).clamp_min(1.0)                                                       # [B, 1]
    f = (chosen * m).sum(1) * num_experts / (top_k * n_tok)                              # [B, E]
    p = (probs * m).sum(1) / n_tok                                                        # [B, E]
    return (f * p).sum(-1).mean()
