"""The speech tower of Megrez-3B-Omni: a Whisper-large-v3 encoder (OpenAI naming:
``audio.audio.blocks.N.attn.query``...), a x2 average pool, ``ln_post`` after the pool, a
projection to the language model's width, and two learned vectors that open and close every
clip (``audio_bos_eos_token``).

Input: log-mel features [n_mels, frames] (see ``megrez.multimodal.audio``) and the clip's
valid mel length. Output per clip: ``[bos, feats[:n_tok], eos]`` = ``n_tok + 2`` vectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ConfigError, require


@dataclass
class AudioArgs:
    n_mels: int = 128
    n_ctx: int = 1500
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 32
    output_dim: int = 2560
    avg_pool: bool = True
    add_audio_bos_eos_token: bool = True

    @classmethod
    def from_dict(cls, cfg: Any, source: str) -> "AudioArgs":
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: 'audio_config' must be an object, got {type(cfg).__name__}")
        names = set(cls.__dataclass_fields__)
        args = cls(**{k: v for k, v in cfg.items() if k in names})
        where = f"{source} audio_config"
        for key in ("n_mels", "n_ctx", "n_state", "n_head", "n_layer", "output_dim"):
            v = getattr(args, key)
            require(isinstance(v, int) and v > 0, where, key, v, "a positive integer")
        require(args.n_state % args.n_head == 0, where, "n_head", args.n_head, f"a divisor of n_state={args.n_state}")
        require(args.avg_pool is True, where, "avg_pool", args.avg_pool, "true")
        require(args.add_audio_bos_eos_token is True, where, "add_audio_bos_eos_token",
                args.add_audio_bos_eos_token, "true")
        return args


def encoder_lengths(mel_len: int) -> tuple[int, int]:
    """(frames after the stride-2 conv, output tokens before bos/eos) for ``mel_len`` mel frames."""
    l_cnn = 1 + (mel_len - 1) // 2
    return l_cnn, (l_cnn - 2) // 2 + 1


class Attention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_head, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        # Whisper scales q and k by head_dim^-0.25 each: the same as SDPA's head_dim^-0.5.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.attn = Attention(d, n_head)
        self.attn_ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.mlp_ln = nn.LayerNorm(d)

    def forward(self, x, mask):
        x = x + self.attn(self.attn_ln(x), mask)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """``audio.audio``."""

    def __init__(self, a: AudioArgs):
        super().__init__()
        self.args = a
        self.conv1 = nn.Conv1d(a.n_mels, a.n_state, 3, padding=1)
        self.conv2 = nn.Conv1d(a.n_state, a.n_state, 3, stride=2, padding=1)
        # Loaded from the checkpoint (the official code once recomputed it, and fixed that).
        self.register_buffer("positional_embedding", torch.empty(a.n_ctx, a.n_state))
        self.blocks = nn.ModuleList(Block(a.n_state, a.n_head) for _ in range(a.n_layer))
        self.ln_post = nn.LayerNorm(a.n_state)
        self.proj = nn.Linear(a.n_state, a.output_dim)
        self.audio_bos_eos_token = nn.Embedding(2, a.output_dim)

    def forward(self, mels: torch.Tensor, mel_lens: list[int]) -> list[torch.Tensor]:
        """mels [B, n_mels, frames] (each padded to the same frame count), valid mel frames per
        clip -> one [n_tok + 2, output_dim] tensor per clip.

        Clips are encoded in groups of equal length. The official code batches all clips of a
        prompt and crops them to the longest one, so a short clip's last frames see the next
        mel frames instead of the convolution's zero padding: its result depends on the other
        clips. Grouping keeps every clip's result its own (and equal to the official one for
        a single clip)."""
        out: list[torch.Tensor | None] = [None] * len(mel_lens)
        for n in sorted(set(mel_lens)):
            idx = [i for i, m in enumerate(mel_lens) if m == n]
            for i, y in zip(idx, self._encode(mels[idx], n)):
                out[i] = y
        return out

    def _encode(self, mels: torch.Tensor, mel_len: int) -> torch.Tensor:
        w = self.conv1.weight
        l_cnn, n_tok = encoder_lengths(mel_len)
        if l_cnn > self.args.n_ctx:
            raise ValueError(f"audio clip of {mel_len} mel frames exceeds the encoder's {self.args.n_ctx} "
                             f"positions (30 s); split it first")
        # Only the first 2 * L_cnn frames are used (one zero frame when the length is odd).
        x = mels[:, :, : 2 * l_cnn].to(w.device, w.dtype)
        if x.shape[2] < 2 * l_cnn:
            x = F.pad(x, (0, 2 * l_cnn - x.shape[2]))
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, L_cnn, D]
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x, None)
        x = F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2)
        x = self.proj(self.ln_post(x))[:, :n_tok]
        bos = self.audio_bos_eos_token.weight[0:1].expand(x.shape[0], 1, -1)
        eos = self.audio_bos_eos_token.weight[1:2].expand(x.shape[0], 1, -1)
        return torch.cat([bos, x, eos], dim=1)


class AudioModule(nn.Module):
    """``audio``: holds the encoder under the official attribute name ``audio``."""

    def __init__(self, a: AudioArgs):
        super().__init__()
        self.audio = AudioEncoder(a)

    def forward(self, mels: torch.Tensor, mel_lens: list[int]) -> list[torch.Tensor]:
        return self.audio(mels, mel_lens)


__all__ = ["AudioArgs", "AudioModule", "AudioEncoder", "encoder_lengths"]
