"""Language-model losses as (sum, count) pairs, so that gradient accumulation and data
parallelism can divide by the count of the whole global batch and get exactly the loss of one
big batch.

* ``per_token``: every learned token weighs the same (sum of token losses / number of tokens).
* ``turn``: the Megrez2 report's turn-level loss. Each assistant turn's loss is the mean over
  that turn's tokens, and the batch loss is the mean over turns, so a short answer counts as
  much as a long one (sum of turn means / number of turns).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_MODES = ("per_token", "turn")


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> cross-entropy [B, T] in float32."""
    b, t, v = logits.shape
    return F.cross_entropy(logits.float().view(b * t, v), targets.reshape(-1), reduction="none").view(b, t)


def per_token_sum(losses: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    return (losses * mask).sum(), int(mask.sum())


def turn_sum(losses: torch.Tensor, turn_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over turns of each turn's mean token loss, and the number of turns. ``turn_ids``
    [B, T] is unique within a row and -1 where there is no loss; rows are told apart here."""
    valid = turn_ids >= 0
    if not bool(valid.any()):
        return losses.sum() * 0.0, 0
    row = torch.arange(turn_ids.shape[0], device=turn_ids.device)[:, None].expand_as(turn_ids)
    keys = row[valid] * (int(turn_ids.max()) + 1) + turn_ids[valid]
    _, inverse = torch.unique(keys, return_inverse=True)
    n = int(inverse.max()) + 1
    sums = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, inverse, losses[valid])
    counts = torch.bincount(inverse, minlength=n).to(losses.dtype)
    return (sums / counts).sum(), n


def loss_count(batch, mode: str) -> int:
    """The denominator a batch contributes, known from the data alone (before any forward)."""
    if mode == "turn":
        valid = batch.turn_ids >= 0
        row = torch.arange(valid.shape[0])[:, None].expand_as(valid)
        return len({(r, t) for r, t in zip(row[valid].tolist(), batch.turn_ids[valid].tolist())})
    return int(batch.loss_mask.sum())


def loss_sum(logits: torch.Tensor, batch, mode: str) -> tuple[torch.Tensor, int]:
    if mode not in LOSS_MODES:
        raise ValueError(f"loss must be one of {', '.join(LOSS_MODES)}, got {mode!r}")
    losses = token_losses(logits, batch.targets)
    if mode == "turn":
        return turn_sum(losses, batch.turn_ids)
    return per_token_sum(losses, batch.loss_mask)
