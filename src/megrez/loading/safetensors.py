"""Hugging Face safetensors checkpoints: find the (sharded) weight files, read them one tensor
at a time, and save a model in the same layout."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .common import DTYPES, TOKENIZER_FILES, CheckpointError, atomic_directory, read_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def checkpoint_shards(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                users = [k for k, v in weight_map.items() if v == name]
                raise CheckpointError(f"{path / name}: shard listed in {INDEX_NAME} is missing "
                                      f"(it holds {len(users)} tensors, e.g. {users[0]!r})")
        return [path / name for name in files]
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {', '.join(other)}: convert it to safetensors)" if other else ""
    raise CheckpointError(f"{path}: no safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME}){hint}")


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """A safetensors file read one tensor at a time (8-byte header length, JSON header, data).
    The header is checked against the file size up front, so truncation is reported before
    anything is loaded, naming the first tensor that lies past the end."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
                if n < 2 or n > size - 8 or n > (100 << 20):
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); is it truncated or corrupt?") from None
        header.pop("__metadata__", None)
        self.data_start, data_size = 8 + n, size - 8 - n
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {info!r}") from None
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(f"{path}: tensor {key!r} header is inconsistent ({nbytes} bytes for shape "
                                      f"{shape}, offsets {begin}..{end}); the file is corrupt")
            if end > data_size:
                raise CheckpointError(f"{path}: tensor {key!r} ends at byte {self.data_start + end} but the file has "
                                      f"{size} bytes; the file is truncated")
            self.entries[key] = (dtype, shape, begin, end)

    def keys(self):
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key][1])

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[key]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.path}: tensor {key!r} could not be read in full; the file is truncated")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def read_into(self, key: str, target: torch.Tensor, chunk_bytes: int = 16 << 20) -> None:
        """Copy (and cast) tensor ``key`` into ``target`` a few rows at a time, so loading holds
        at most ``chunk_bytes`` beyond the model (a whole embedding table would be hundreds of MiB)."""
        dtype, shape, begin, end = self.entries[key]
        if not shape or end - begin <= chunk_bytes:
            target.copy_(self.read(key))
            return
        row = (end - begin) // shape[0]
        rows = max(chunk_bytes // max(row, 1), 1)
        buf = bytearray(rows * row)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            for r in range(0, shape[0], rows):
                n = min(rows, shape[0] - r)
                view = memoryview(buf)[:n * row]
                if f.readinto(view) != len(view):
                    raise CheckpointError(f"{self.path}: tensor {key!r} could not be read in full; the file is "
                                          f"truncated")
                target[r:r + n].copy_(torch.frombuffer(view, dtype=dtype).reshape(n, *shape[1:]))


def model_config(model) -> dict:
    """config.json for a model: the config it was loaded from (unknown keys preserved),
    updated with the model's own arguments."""
    config = dict(getattr(model, "hf_config", {}) or {})
    args = model.args.to_dict()
    args.pop("router_bias", None)  # a runtime choice, not part of the checkpoint
    config.update(args)
    module = type(model).__module__.rsplit(".", 1)[-1]
    arch = getattr(type(model), "hf_architecture", None) or {
        "llama": ("LlamaForCausalLM", "llama"), "megrez_moe": ("MegrezMoeForCausalLM", "megrez_moe")}[module]
    config["architectures"], config["model_type"] = [arch[0]], arch[1]
    return config


def save_model(model, out: str | os.PathLike, dtype: torch.dtype | None = None,
               max_shard_bytes: int = 2 << 30, extra_files: dict[str, str | bytes] | None = None,
               copy_from: str | os.PathLike | None = None) -> Path:
    """Save in the Hugging Face layout: config.json + model.safetensors (or shards + index).

    ``copy_from`` copies tokenizer/generation files from another checkpoint directory;
    ``extra_files`` writes more files (name -> content)."""
    from ..quant.modules import quant_tensors

    if quant_tensors(model):
        raise ValueError("this model holds quantized weights, which safetensors checkpoints do not store; "
                         "save it as GGUF (megrez quantize MODEL OUT.gguf) or save the float model")
    out = Path(out)
    names = model.checkpoint_names()
    sources = dict(model.named_parameters())
    sources.update(model.named_buffers())
    dtype = dtype or next(model.parameters()).dtype
    float32_names = {f"{mn}.{b}" for mn, m in model.named_modules() for b in getattr(m, "float32_buffers", ())}

    def tensor(key):
        ours, index = names[key]
        t = sources[ours] if index is None else sources[ours][index]
        want = torch.float32 if ours in float32_names else dtype
        return t.detach().to("cpu", want).contiguous().clone()

    keys = list(names)
    sizes = {k: _numel(sources[names[k][0]], names[k][1]) * torch.empty((), dtype=dtype).element_size() for k in keys}
    shards, current, current_size = [], [], 0
    for k in keys:
        if current and current_size + sizes[k] > max_shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(k)
        current_size += sizes[k]
    shards.append(current)

    config = model_config(model)
    config["torch_dtype"] = {v: k for k, v in DTYPES.items()}.get(dtype, "float32")
    with atomic_directory(out) as tmp:
        weight_map, total = {}, 0
        for n, shard in enumerate(shards):
            fname = WEIGHTS_NAME if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            data = {k: tensor(k) for k in shard}
            total += sum(t.numel() * t.element_size() for t in data.values())
            save_file(data, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            del data
        if len(shards) > 1:
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if copy_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(copy_from) / name
                if src.is_file():
                    shutil.copy(src, tmp / name)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content, encoding="utf-8")
    return out


def _numel(t: torch.Tensor, index: int | None) -> int:
    return t.numel() if index is None else t[index].numel()


