"""Megrez-3B-Omni (``architectures: ["MegrezO"]``): the Megrez-3B Llama language model plus
an image tower and a speech tower, fused by overwriting placeholder rows of the token
embeddings (no cross-attention inside the language model).

The language model is the project's own Llama model under ``llm`` (tensor names
``llm.model.*`` and ``llm.lm_head.weight``, as in the official checkpoint), so it runs on the
same engine, KV cache, batching and quantization as Megrez-3B. The engine sees an ordinary
text model: ``forward(tokens, cache, input_embeddings=..., logits_at=...)`` and ``embed``.
Images and audio are encoded before a request enters the engine (``encode_images``,
``encode_audio``) and their vectors travel with the request.

``llm_architecture`` (not an official key; default ``LlamaForCausalLM``) lets the same
wrapper host another text model of the registry, e.g. the bundled Megrez2.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..base import ConfigError, require
from .audio import AudioArgs, AudioModule
from .vision import VisionArgs, VisionModule

TEXT_ARCHITECTURES = ("LlamaForCausalLM", "MegrezMoeForCausalLM")


def _text_module(arch: str):
    from .. import llama, megrez_moe

    return {"LlamaForCausalLM": llama, "MegrezMoeForCausalLM": megrez_moe}[arch]


@dataclass
class OmniArgs:
    """Multimodal keys of config.json; the language model's keys are read by its own ModelArgs."""
    vision_config: dict = field(default_factory=dict)
    audio_config: dict = field(default_factory=dict)
    query_num: int = 64
    patch_size: int = 14
    vision_batch_size: int = 8
    drop_vision_last_layer: bool = False
    # Image slicing (MiniCPM-V "slice_config"); the official processor uses 448 / 9.
    scale_resolution: int = 448
    max_slice_nums: int = 9
    llm_architecture: str = "LlamaForCausalLM"


def parse_args(cfg: dict, source: str):
    """(text ModelArgs, OmniArgs, VisionArgs, AudioArgs) from a MegrezO config.json."""
    names = {f.name for f in fields(OmniArgs)}
    omni = OmniArgs(**{k: v for k, v in cfg.items() if k in names})
    require(omni.llm_architecture in TEXT_ARCHITECTURES, source, "llm_architecture", omni.llm_architecture,
            ", ".join(TEXT_ARCHITECTURES))
    for key in ("query_num", "vision_batch_size", "scale_resolution", "max_slice_nums"):
        v = getattr(omni, key)
        require(isinstance(v, int) and v > 0, source, key, v, "a positive integer")
    require(omni.drop_vision_last_layer is False, source, "drop_vision_last_layer", omni.drop_vision_last_layer,
            "false")
    for key in ("vision_config", "audio_config"):
        if key not in cfg:
            raise ConfigError(f"{source}: missing required key {key!r} (a MegrezO checkpoint has both towers)")
    vision = VisionArgs.from_dict(cfg["vision_config"], source)
    require(vision.patch_size == omni.patch_size, source, "patch_size", omni.patch_size,
            f"vision_config.patch_size={vision.patch_size}")
    # ``audio_config: null`` (not in official checkpoints) makes an image-only model.
    audio = AudioArgs.from_dict(cfg["audio_config"], source) if cfg["audio_config"] is not None else None
    text = _text_module(omni.llm_architecture).ModelArgs.from_dict(cfg, source)
    if audio is not None:
        require(audio.output_dim == text.hidden_size, f"{source} audio_config", "output_dim", audio.output_dim,
                f"hidden_size={text.hidden_size}")
    return text, omni, vision, audio


class ModelArgs:
    """The text model's arguments (what the engine reads: vocab_size, max_position_embeddings,
    ...) with the multimodal ones beside them."""

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json"):
        text, omni, vision, audio = parse_args(cfg, source)
        text.omni, text.vision, text.audio = omni, vision, audio
        return text


class Model(nn.Module):
    hf_architecture = ("MegrezO", "megrezo")

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.llm = _text_module(args.omni.llm_architecture).Model(args)
        self.vision = VisionModule(args.vision, args.hidden_size, args.omni.query_num, args.omni.vision_batch_size)
        self.audio = AudioModule(args.audio) if args.audio is not None else None

    # The engine, loader and quantizer address the language model's parts directly.
    @property
    def model(self):
        return self.llm.model

    @property
    def lm_head(self):
        return self.llm.lm_head

    @property
    def layers(self):
        return self.llm.layers

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.llm.embed(tokens)

    def forward(self, tokens, cache=None, input_embeddings=None, logits_at=None):
        return self.llm(tokens, cache, input_embeddings=input_embeddings, logits_at=logits_at)

    def kv_layout(self):
        return self.llm.kv_layout()

    # ------------------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_images(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Raw-pixel crops -> [n_crops, query_num, hidden] in the model's dtype."""
        return self.vision(crops)

    @torch.no_grad()
    def encode_audio(self, mels: torch.Tensor, mel_lens: list[int]) -> list[torch.Tensor]:
        """Log-mel features [B, n_mels, frames] -> one [n_tok + 2, hidden] tensor per clip."""
        if self.audio is None:
            raise ValueError("this model has no audio encoder (its config.json has audio_config: null)")
        return self.audio(mels, mel_lens)

    # ------------------------------------------------------------------------------ checkpoints
    def checkpoint_names(self) -> dict[str, tuple[str, int | None]]:
        names = {f"llm.{k}": (f"llm.{ours}", i) for k, (ours, i) in self.llm.checkpoint_names().items()}
        for prefix, module in (("vision", self.vision), ("audio", self.audio)):
            if module is None:
                continue
            for name, _ in module.named_parameters():
                names[f"{prefix}.{name}"] = (f"{prefix}.{name}", None)
            for name, _ in module.named_buffers():
                names[f"{prefix}.{name}"] = (f"{prefix}.{name}", None)
        return names

    def parameter_counts(self) -> dict[str, int]:
        text = self.llm.parameter_counts()
        vision = sum(p.numel() for p in self.vision.parameters())
        audio = sum(p.numel() for p in self.audio.parameters()) if self.audio is not None else 0
        return {"stored": text["stored"] + vision + audio, "active": text["active"], "vision": vision, "audio": audio}

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        self.llm.init_weights(std, generator)
        for tower in (self.vision, self.audio):
            for module in tower.modules() if tower is not None else ():
                for name, p in module.named_parameters(recurse=False):
                    if isinstance(module, nn.LayerNorm):
                        p.fill_(1.0 if name == "weight" else 0.0)
                    elif name.endswith("bias"):
                        p.zero_()
                    else:
                        p.normal_(0.0, std, generator=generator)
        if self.audio is not None:
            pe = self.audio.audio.positional_embedding
            pe.copy_(whisper_sinusoids(*pe.shape))


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal position table (what the checkpoint's ``positional_embedding`` holds
    when it was not fine-tuned); used only to initialise new checkpoints."""
    inc = torch.log(torch.tensor(max_timescale, dtype=torch.float64)) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float64))
    t = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([t.sin(), t.cos()], dim=1).float()
