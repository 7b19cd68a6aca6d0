"""Data-parallel training over several processes or machines with PyTorch FSDP2.

Launch with ``torchrun --nproc-per-node N -m megrez.train.cli ...`` (or ``megrez train ...``
under torchrun): the process group is NCCL on CUDA and gloo on CPU. Each MoE expert bank,
router, attention block, MLP and shared-expert MLP is its own FSDP unit; the rest (embeddings,
norms, LM head) belong to the root unit. Units are sharded where the model *calls* modules:
decoder layers are never called as a whole, and a shared expert bank is called by every
layer of its group, which FSDP2 supports (each call gathers it, gradients add up).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) for this process; starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank(), world_size(), dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t)
    return t


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model, mp_dtype: torch.dtype | None = None):
    """Apply FSDP2 ``fully_shard`` to the units the model calls, then to the root.
    ``mp_dtype`` (bfloat16 on GPU) is the compute dtype; gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer.self_attn, mp_policy=mp)
        mlp = layer.mlp
        if hasattr(mlp, "gate") and hasattr(mlp, "shared_experts"):  # MoE block
            # Routers are tiny and decide by small margins: keep their weights in float32.
            fully_shard(mlp.gate, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
            if mlp.experts is not None:
                fully_shard(mlp.experts, mp_policy=mp)
            if mlp.shared_experts is not None:
                fully_shard(mlp.shared_experts, mp_policy=mp)
        else:
            fully_shard(mlp, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
