"""Building a model from a checkpoint: allocate it from its meta-device skeleton, then copy
each checkpoint tensor into place, one at a time.

Loading never holds more than the model plus one tensor in host memory: parameters are
allocated once in the target dtype/device, and each checkpoint tensor is read from its
file on its own and copied (and cast) into place. (Memory-mapping whole shards would keep
every page read so far resident until the shard is closed: up to a second model's worth.)
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from ..models import build_model
from .common import (
    DTYPES,
    CheckpointError,
    available_host_memory,
    read_json,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from .gguf import GGUFCheckpoint, is_gguf
from .safetensors import SafetensorsFile, checkpoint_shards

# Tensors some exporters write that carry no weights of their own.
IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")


def materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                expert_device: torch.device | None = None) -> None:
    """Allocate a meta-built model on ``device`` in ``dtype`` (routing biases stay float32).
    With ``expert_device``, routed expert banks go there instead (host memory for offloading;
    pinned when a GPU is present, so copies to it can be asynchronous)."""
    from ..models.moe import ExpertBank

    model.to(dtype)
    for module in model.modules():
        for name in getattr(module, "float32_buffers", ()):
            setattr(module, name, getattr(module, name).float())
    pin = expert_device is not None and expert_device.type == "cpu" and torch.cuda.is_available()
    for module in model.modules():
        target = expert_device if (expert_device is not None and isinstance(module, ExpertBank)) else device
        for name, p in module.named_parameters(recurse=False):
            fresh = torch.empty(p.shape, dtype=p.dtype, device=target, pin_memory=pin and target == expert_device)
            module._parameters[name] = torch.nn.Parameter(fresh, requires_grad=p.requires_grad)
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=target)
    if getattr(model.args, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight


def load_model(path: str | os.PathLike, device="auto", dtype="auto", progress: bool | None = None,
               expert_device: str | torch.device | None = None, quantization: str | None = None, **overrides):
    """Load a checkpoint directory (or hub id). Returns the model in eval mode, without grads.

    ``overrides`` are config values set on top of config.json (e.g. ``router_bias="owner"``);
    ``expert_device`` places routed expert banks elsewhere (``"cpu"`` for offloading to a GPU;
    ``"meta"`` leaves them in the files, for the storage tier);
    ``quantization`` ("q8_0", "q4_0", "q4_k_m") quantizes the weights while they load, one tensor
    at a time, so host memory peaks near the quantized size (see :mod:`megrez.quant.recipe`)."""
    path = resolve_model_path(path)
    if is_gguf(path):
        return _load_gguf(path, device, dtype, progress, expert_device, quantization, **overrides)
    config = read_json(path / "config.json")
    source = str(path / "config.json")
    device = resolve_device(device)
    auto = dtype in (None, "auto")
    dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = build_model(config, source=source, **overrides)
    if quantization is not None:
        from ..quant.modules import quantize_modules
        from ..quant.recipe import QUANTIZED_SCHEMES, check_scheme, tensor_types

        if expert_device is not None:
            if torch.device(expert_device).type == "meta":
                raise ValueError("--memory-budget reads routed experts as the checkpoint stores them; to run them "
                                 "quantized, write a quantized file first (megrez quantize MODEL OUT.gguf --type "
                                 f"{quantization}) and use --model OUT.gguf --memory-budget (or drop --quantization)")
            raise ValueError("quantized weights cannot be offloaded to a GPU yet (drop --gpu-memory-budget or "
                             "--quantization)")
        scheme = check_scheme(quantization, QUANTIZED_SCHEMES)
        quantize_modules(model, tensor_types(model, scheme), device=device)
        model.quantization = scheme
    elif auto and device.type == "cpu" and dtype == torch.float32:
        dtype = _fit_host_memory(model, config)
    expert_device = torch.device(expert_device) if expert_device is not None else None
    materialize(model, device, dtype, expert_device)
    shards = checkpoint_shards(path)
    in_files = expert_device is not None and expert_device.type == "meta"
    load_weights(model, shards, progress=progress, skip_routed_experts=in_files)
    if in_files:
        # What loading read is not needed again: keep it out of the page cache too.
        for shard in shards:
            drop_page_cache(shard)
    model.hf_config = config
    model.eval().requires_grad_(False)
    return model


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop a file's cached pages (where it supports the advice)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _load_gguf(path: Path, device, dtype, progress, expert_device, quantization, **overrides):
    """A model from a GGUF file, each tensor kept in the file's own type (the module swap is
    driven by the types the file holds)."""
    from ..quant.modules import quantize_modules

    if quantization is not None:
        raise ValueError(f"{path}: a GGUF file keeps its own tensor types; drop --quantization")
    in_file = expert_device is not None and torch.device(expert_device).type == "meta"
    if expert_device is not None and not in_file:
        raise ValueError("routed experts of a GGUF file cannot be offloaded to a GPU yet (drop --gpu-memory-budget, "
                         "or use the safetensors checkpoint)")
    ckpt = GGUFCheckpoint(path)
    device = resolve_device(device)
    dtype = torch.float32 if dtype in (None, "auto") and device.type == "cpu" else resolve_dtype(dtype, {}, device)
    with torch.device("meta"):
        model = build_model(ckpt.config, source=f"{path} (metadata)", **overrides)
    types = ckpt.types()
    if in_file:  # the storage tier reads them from the file, in the file's types
        types = {k: v for k, v in types.items() if ".mlp.experts." not in k}
    quantize_modules(model, types, device=device)
    materialize(model, device, dtype, torch.device("meta") if in_file else None)
    load_weights(model, [ckpt], progress=progress, skip_routed_experts=in_file)
    if in_file:
        drop_page_cache(path)
    model.hf_config = ckpt.config
    model.eval().requires_grad_(False)
    return model


def _fit_host_memory(model, config: dict) -> torch.dtype:
    """float32 on a CPU unless it cannot fit: then the checkpoint's own 16-bit dtype, said aloud."""
    stored = DTYPES.get(config.get("torch_dtype") or config.get("dtype") or "", torch.float32)
    need = sum(p.numel() for p in model.parameters()) * 4
    free = available_host_memory()
    if stored == torch.float32 or free is None or need <= 0.8 * free:
        return torch.float32
    name = {v: k for k, v in DTYPES.items()}[stored]
    print(f"megrez: float32 weights ({need / 2**30:.1f} GiB) would not fit in the available memory "
          f"({free / 2**30:.1f} GiB); using the checkpoint's {name} (--dtype float32 to insist)", file=sys.stderr)
    return stored


def load_weights(model: torch.nn.Module, files: list, progress: bool | None = None,
                 skip_routed_experts: bool = False) -> None:
    """Copy every tensor of the checkpoint ``files`` (paths of safetensors files, or readers with
    ``path``, ``keys()``, ``shape(key)`` and ``read(key)``) into place, quantizing it on the way
    where the model holds that weight quantized. ``skip_routed_experts``: leave the routed
    expert tensors in the files (read later by the storage tier of offloading)."""
    from ..quant.formats import QuantTensor, quantize
    from ..quant.modules import quant_tensors

    names = model.checkpoint_names()
    targets: dict = dict(model.named_parameters())
    targets.update(model.named_buffers())
    targets.update(quant_tensors(model))
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    seen: dict[str, Path] = {}
    readers = [f if hasattr(f, "keys") else SafetensorsFile(f) for f in files]  # headers checked before copying
    total = sum(r.path.stat().st_size for r in readers)
    from tqdm import tqdm

    show = progress if progress is not None else total > (512 << 20)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show) as bar:
        for reader in readers:
            file = reader.path
            for key in reader.keys():
                if key not in names:
                    if IGNORED_TENSORS.match(key) or (tied and key == "lm_head.weight"):
                        continue
                    raise CheckpointError(f"{file}: unexpected tensor {key!r}{_explain_unexpected(model, key)}")
                if key in seen:
                    raise CheckpointError(f"{file}: tensor {key!r} also appears in {seen[key]}")
                ours, index = names[key]
                if skip_routed_experts and index is not None:
                    seen[key] = file  # engine.storage.ExpertStore checks these tensors' shapes and dtypes
                    continue
                target = targets[ours] if index is None else targets[ours][index]
                shape = reader.shape(key)
                if shape != list(target.shape):
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}, "
                                          f"expected {list(target.shape)} from config.json")
                if isinstance(reader, SafetensorsFile) and not isinstance(target, QuantTensor):
                    with torch.no_grad():
                        reader.read_into(key, target)
                    seen[key] = file
                    bar.update(target.numel() * reader.entries[key][0].itemsize)
                    continue
                if isinstance(target, QuantTensor) and hasattr(reader, "read_quant_into") \
                        and reader.read_quant_into(key, target):
                    seen[key] = file  # a GGUF tensor in the model's type: read in place, no copy
                    bar.update(target.nbytes)
                    continue
                tensor = reader.read(key)
                with torch.no_grad():
                    if isinstance(target, QuantTensor):
                        if not (isinstance(tensor, QuantTensor) and tensor.qtype == target.qtype):
                            tensor = quantize(tensor.dequantize() if isinstance(tensor, QuantTensor) else tensor,
                                              target.qtype)
                        target.data.copy_(tensor.data)
                    else:
                        target.copy_(tensor.dequantize() if isinstance(tensor, QuantTensor) else tensor)
                seen[key] = file
                bar.update(tensor.nbytes if isinstance(tensor, QuantTensor) else tensor.numel() * tensor.element_size())
                del tensor
    missing = [k for k in names if k not in seen]
    if missing:
        where = readers[0].path.parent if readers[0].path.suffix == ".safetensors" else readers[0].path
        raise CheckpointError(f"{where}: checkpoint is missing {len(missing)} tensor(s): "
                              + ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else ""))


def _explain_unexpected(model, key: str) -> str:
    m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.", key)
    args = model.args
    if m and hasattr(args, "owner"):
        i = int(m.group(1))
        if i < args.num_hidden_layers and args.is_moe(i) and args.owner(i) != i:
            return (f" (layer {i} shares the routed experts of layer {args.owner(i)}; "
                    f"experts_shared_frequency={args.experts_shared_frequency})")
    return " (not part of the model described by config.json)"


