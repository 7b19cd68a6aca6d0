"""The rollout model: the weights the engine samples with, kept equal to the policy's without a
disk round trip.

In one process the engine runs on the policy module itself: the same parameter tensors, so
every optimizer step is visible to the next rollout with no copy at all (the engine runs
under ``inference_mode``, the trainer under autograd; neither changes the other's tensors).
Under FSDP each rank holds only a shard, so the rollout model is a full, unsharded copy on
the rank's device, refreshed after every update by gathering each parameter
(``DTensor.full_tensor``) and copying it in place, tensor by tensor.
"""
from __future__ import annotations

import torch

from ..loading import materialize
from ..models import build_model
from . import distributed


class RolloutWeights:
    def __init__(self, policy, device: torch.device):
        self.policy = policy
        self.shared = not distributed.is_sharded(policy)
        if self.shared:
            self.model = policy
        else:
            with torch.device("meta"):
                self.model = build_model(policy.hf_config)
            materialize(self.model, device, torch.float32)
            self.model.hf_config = policy.hf_config
            self.model.eval().requires_grad_(False)
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Make the rollout weights equal to the policy's (a no-op when they are the same tensors)."""
        if self.shared:
            return
        from torch.distributed.tensor import DTensor

        mine = dict(self.model.named_parameters())
        mine.update(self.model.named_buffers())
        for name, t in list(self.policy.named_parameters()) + list(self.policy.named_buffers()):
            full = t.full_tensor() if isinstance(t, DTensor) else t
            mine[name].copy_(full.detach())
