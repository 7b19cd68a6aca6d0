"""Training checkpoints that the inference engine loads as they are.

``RUN/checkpoints/step_000123/`` is a Hugging Face checkpoint directory (config.json,
model.safetensors in float32, tokenizer files) plus ``trainer_state.pt`` (optimizer state,
step, data position, RNG states, run configuration). The whole directory is written under a
temporary name and renamed into place, so a run killed at any moment leaves either the
previous checkpoints or a complete new one; resuming picks the newest complete directory.
"""
from __future__ import annotations

import io
import random
import re
import shutil
from pathlib import Path

import torch

from ..loading import materialize, save_model
from ..models import build_model
from . import distributed

STATE_NAME = "trainer_state.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state(model, optimizer) -> tuple[dict | None, dict]:
    """(model state dict or None when the model itself can be saved, optimizer state dict).
    Under FSDP every rank must call this: the full tensors are gathered (to CPU)."""
    if not distributed.is_sharded(model):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, trainer_state: dict,
                    tokenizer_dir: Path | None, keep: int = 2) -> Path | None:
    """Write ``RUN/checkpoints/step_N`` (rank 0 writes; all ranks must call). Returns its path."""
    model_sd, optim_sd = full_state(model, optimizer)
    out = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    if distributed.rank() == 0:
        state = {**trainer_state, "step": step, "optimizer": optim_sd, "rng": rng_state()}
        buf = io.BytesIO()
        torch.save(state, buf)
        to_save = model if model_sd is None else plain_copy(model, model_sd)
        # Training keeps float32 master weights: the checkpoint must hold them exactly to resume.
        save_model(to_save, out, dtype=torch.float32, extra_files={STATE_NAME: buf.getvalue()},
                   copy_from=tokenizer_dir)
        prune(Path(run_dir) / "checkpoints", keep)
    distributed.barrier()
    return out


def export_final(model, optimizer, final: Path, dtype_name: str, tokenizer_dir: Path | None) -> Path:
    """``final``: the trained model alone, in ``dtype_name`` (float32 | bfloat16), for inference.
    Every rank must call it (under FSDP the full weights are gathered); rank 0 writes."""
    model_sd, _ = full_state(model, optimizer) if distributed.is_sharded(model) else (None, None)
    if distributed.rank() == 0:
        plain = model if model_sd is None else plain_copy(model, model_sd)
        save_model(plain, final, dtype=torch.bfloat16 if dtype_name == "bfloat16" else torch.float32,
                   copy_from=tokenizer_dir)
    distributed.barrier()
    return final


def plain_copy(model, state_dict: dict):
    """An unsharded CPU float32 model holding ``state_dict`` (for saving in the HF layout)."""
    with torch.device("meta"):
        plain = build_model(model.hf_config)
    materialize(plain, torch.device("cpu"), torch.float32)
    plain.load_state_dict(state_dict, strict=True)
    plain.hf_config = model.hf_config
    return plain


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first. Half-written ones live under
    hidden temporary names and are never listed."""
    found = []
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / STATE_NAME).is_file() and (p / "config.json").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1][1] if found else None


def prune(ckpt_dir: Path, keep: int) -> None:
    """Drop all but the newest ``keep`` checkpoints, and leftovers of interrupted writes."""
    for p in Path(ckpt_dir).iterdir():
        if p.name.startswith(".step_") and ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
    found = complete_checkpoints(ckpt_dir)
    for _, p in found[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(path: Path) -> dict:
    # Our own file (optimizer tensors, Python RNG tuple): not a weights-only pickle.
    return torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=False)


def restore_optimizer(model, optimizer, state: dict) -> None:
    if not distributed.is_sharded(model):
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
