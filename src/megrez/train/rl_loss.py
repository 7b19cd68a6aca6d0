"""The RLVR objective of the Megrez2 report: GRPO's group-normalised advantages fed to the PPO
clipped objective, with GAE at lambda = gamma = 1, and an optional KL penalty.

Why GRPO and GAE(1, 1) coincide here: a rollout earns one reward R at its last token and none
before. GAE's advantage at token t is sum_l (gamma*lambda)^l delta_{t+l} with
delta_t = r_t + gamma V(s_{t+1}) - V(s_t). With gamma = lambda = 1 the sum telescopes to
R - V(s_t): the return minus the baseline. GRPO has no critic; its baseline is the group's
mean reward, the same for every token of the rollout, and it scales by the group's standard
deviation. So every token of rollout i gets A_i = (R_i - mean(R)) / std(R) -- exactly what
:func:`gae_advantages` returns for a terminal reward of A_i and zero values (tested).
"""
from __future__ import annotations

import torch

STD_EPS = 1e-4  # as TRL's GRPO: keeps a nearly-constant group from exploding


def group_advantages(rewards: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """rewards [G, n] (G prompts, n rollouts each) -> (R - group mean) / (group std + eps).
    A group whose rewards are all equal carries no signal: its advantages are exactly 0."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, rollouts], got shape {list(rewards.shape)}")
    rewards = rewards.double()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    adv = (rewards - mean) / (std + eps)
    return torch.where(std > 0, adv, torch.zeros_like(adv)).float()


def gae_advantages(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   gamma: float = 1.0, lam: float = 1.0) -> torch.Tensor:
    """Generalised advantage estimation over response tokens. token_rewards, values, mask [B, T];
    a value past the last response token is 0 (the episode has ended)."""
    b, t = token_rewards.shape
    adv = torch.zeros(b, t, dtype=torch.float64, device=token_rewards.device)
    running = torch.zeros(b, dtype=torch.float64, device=token_rewards.device)
    r, v, m = token_rewards.double(), values.double() * mask, mask.double()
    for i in reversed(range(t)):
        next_v = v[:, i + 1] if i + 1 < t else torch.zeros_like(running)
        delta = r[:, i] + gamma * next_v - v[:, i]
        running = delta + gamma * lam * running * (m[:, i + 1] if i + 1 < t else 0.0)
        adv[:, i] = running * m[:, i]
    return adv.float()


def terminal_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] rewards placed on each row's last response token of ``mask`` [B, T]."""
    last = mask.shape[1] - 1 - mask.flip(1).float().argmax(dim=1)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[torch.arange(mask.shape[0], device=mask.device), last] = rewards.float()
    return out * mask


def ppo_clip_loss_sum(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_eps: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Sum over response tokens of -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), with
    ratio = exp(logp - old_logp). All [B, T]; the caller divides by the global token count."""
    m = mask.float()
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -(torch.minimum(unclipped, clipped) * m).sum()
    with torch.no_grad():
        was_clipped = ((ratio - 1.0).abs() > clip_eps) & mask
        stats = {"clipped_tokens": float(was_clipped.sum()),
                 "approx_kl_sum": float(((old_logp - logp) * m).sum())}
    return loss, stats


def kl_penalty_sum(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over response tokens of the k3 estimator of KL(policy || reference):
    exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased, low variance)."""
    d = ref_logp - logp
    return ((torch.exp(d) - d - 1.0) * mask.float()).sum()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] predicting tokens [B, T] (already shifted) -> log p [B, T] in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
