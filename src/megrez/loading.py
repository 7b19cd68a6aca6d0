"""Hugging Face checkpoints: resolve a directory or hub id, read config.json, load
(sharded) safetensors straight into a model built on the meta device, and save the same
format back. Every failure is a :class:`CheckpointError` naming the file and tensor at fault.

Loading never holds more than the model plus one tensor in host memory: parameters are
allocated once in the target dtype/device, and each checkpoint tensor is read from its
file on its own and copied (and cast) into place. (Memory-mapping whole shards would keep
every page read so far resident until the shard is closed: up to a second model's worth.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from .models import ConfigError, build_model

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tensors some exporters write that carry no weights of their own.
IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file, key or tensor."""


# ---------------------------------------------------------------------------------------- paths

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a Hugging Face hub id (cached, else downloaded)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory (with config.json), got a file")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json in this directory; is it a Hugging Face checkpoint?")
        return path
    if not HUB_ID.match(str(name)):
        raise CheckpointError(f"{name}: no such directory (and not a hub id of the form 'org/name')")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    try:
        return Path(snapshot_download(str(name), allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(str(name), allow_patterns=patterns))
    except Exception as e:  # network down, no such repo, gated, ...
        raise CheckpointError(
            f"{name}: not a local directory, not in the Hugging Face cache, and the download failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). On a machine without "
            f"internet, download it elsewhere (`huggingface-cli download {name} --local-dir DIR`) "
            f"and pass DIR.") from None


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


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


def resolve_dtype(dtype: str | torch.dtype | None, config: dict, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32  # bf16 matmuls are slow on most CPUs
        name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        return DTYPES.get(name, torch.bfloat16)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available (use --device cpu)")
    return device


# ---------------------------------------------------------------------------------------- load

def materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                expert_device: torch.device | None = None) -> None:
    """Allocate a meta-built model on ``device`` in ``dtype`` (routing biases stay float32).
    With ``expert_device``, routed expert banks go there instead (host memory for offloading;
    pinned when a GPU is present, so copies to it can be asynchronous)."""
    from .models.moe import ExpertBank

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
               expert_device: str | torch.device | None = None, **overrides):
    """Load a checkpoint directory (or hub id). Returns the model in eval mode, without grads.

    ``overrides`` are config values set on top of config.json (e.g. ``router_bias="owner"``);
    ``expert_device`` places routed expert banks elsewhere (``"cpu"`` for offloading)."""
    path = resolve_model_path(path)
    config = read_json(path / "config.json")
    device = resolve_device(device)
    auto = dtype in (None, "auto")
    dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = build_model(config, source=str(path / "config.json"), **overrides)
    if auto and device.type == "cpu" and dtype == torch.float32:
        dtype = _fit_host_memory(model, config)
    materialize(model, device, dtype, torch.device(expert_device) if expert_device is not None else None)
    load_weights(model, checkpoint_shards(path), progress=progress)
    model.hf_config = config
    model.eval().requires_grad_(False)
    return model


def available_host_memory() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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


def load_weights(model: torch.nn.Module, files: list[Path], progress: bool | None = None) -> None:
    names = model.checkpoint_names()
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    seen: dict[str, Path] = {}
    readers = [SafetensorsFile(f) for f in files]  # validates every header before any copying
    total = sum(f.stat().st_size for f in files)
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
                target = targets[ours] if index is None else targets[ours][index]
                shape = reader.shape(key)
                if shape != list(target.shape):
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}, "
                                          f"expected {list(target.shape)} from config.json")
                tensor = reader.read(key)
                with torch.no_grad():
                    target.copy_(tensor)
                seen[key] = file
                bar.update(tensor.numel() * tensor.element_size())
                del tensor
    missing = [k for k in names if k not in seen]
    if missing:
        where = files[0].parent
        raise CheckpointError(f"{where}: checkpoint is missing {len(missing)} tensor(s): "
                              + ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else ""))


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


def _explain_unexpected(model, key: str) -> str:
    m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.", key)
    args = model.args
    if m and hasattr(args, "owner"):
        i = int(m.group(1))
        if i < args.num_hidden_layers and args.is_moe(i) and args.owner(i) != i:
            return (f" (layer {i} shares the routed experts of layer {args.owner(i)}; "
                    f"experts_shared_frequency={args.experts_shared_frequency})")
    return " (not part of the model described by config.json)"


# ---------------------------------------------------------------------------------------- save

@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Write into a temporary sibling directory and move it into place only when complete,
    so an interrupted save never leaves a half-written checkpoint at ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is not
        for p in tmp.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


__all__ = ["CheckpointError", "ConfigError", "load_model", "save_model", "resolve_model_path", "read_json",
           "checkpoint_shards", "resolve_device", "resolve_dtype", "atomic_directory"]
