"""AdamW with decoupled weight decay on matrices only, and a warm-up + cosine schedule.

The learning rate is a pure function of the step, so a resumed run needs only the step number.
"""
from __future__ import annotations

import math

import torch


def param_groups(model, weight_decay: float) -> list[dict]:
    """Matrices and expert banks (2-D and up) decay; norms and biases do not. The embedding
    decays too, as in GPT-2/nanoGPT. Expert banks appear once even though several layers use
    them, so a shared pool gets exactly one update per step from the gradients of all its layers."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.AdamW:
    device = next(model.parameters()).device
    kwargs = {"fused": True} if (fused if fused is not None else device.type == "cuda") else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine from ``base_lr`` down to
    ``base_lr * min_lr_ratio`` at ``total_steps``. ``step`` counts from 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
