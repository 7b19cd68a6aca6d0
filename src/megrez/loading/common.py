"""What every checkpoint format shares: the error type, resolving a model path or hub id,
reading JSON, choosing the dtype and device, and writing outputs atomically."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file, key or tensor."""


# ---------------------------------------------------------------------------------------- paths

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a Hugging Face hub id (cached, else downloaded)."""
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            return path
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory (with config.json), got a file")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json in this directory; is it a Hugging Face checkpoint?")
        return path
    if not HUB_ID.match(str(name)):
        what = "GGUF file" if path.suffix.lower() == ".gguf" else "directory"
        raise CheckpointError(f"{name}: no such {what} (and not a hub id of the form 'org/name')")
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


def available_host_memory() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None



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


