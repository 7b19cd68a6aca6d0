"""The image tower of Megrez-3B-Omni: a SigLIP "navit" encoder (variable-resolution crops,
position ids bucketed onto the pre-training grid) and the perceiver resampler that turns each
crop into ``query_num`` vectors in the language model's space.

Tensor names follow the official checkpoint (``vision.vpm.*``, ``vision.resampler.*``).
Crops arrive as raw 0-255 pixel values; the model normalises them (``(p - 127.5) / 127.5``),
as the official model does, so callers must not normalise again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ConfigError, require


@dataclass
class VisionArgs:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, cfg: Any, source: str) -> "VisionArgs":
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: 'vision_config' must be an object, got {type(cfg).__name__}")
        names = set(cls.__dataclass_fields__)
        args = cls(**{k: v for k, v in cfg.items() if k in names})
        where = f"{source} vision_config"
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size"):
            v = getattr(args, key)
            require(isinstance(v, int) and v > 0, where, key, v, "a positive integer")
        require(args.num_channels == 3, where, "num_channels", args.num_channels, "3")
        require(args.hidden_size % args.num_attention_heads == 0, where, "num_attention_heads",
                args.num_attention_heads, f"a divisor of hidden_size={args.hidden_size}")
        require(args.hidden_act in ("gelu_pytorch_tanh", "gelu"), where, "hidden_act", args.hidden_act,
                "'gelu_pytorch_tanh', 'gelu'")
        require(args.image_size % args.patch_size == 0, where, "image_size", args.image_size,
                f"a multiple of patch_size={args.patch_size}")
        return args

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def bucket_position_ids(h: int, w: int, side: int, device=None) -> torch.Tensor:
    """Position ids of an h x w patch grid on the ``side`` x ``side`` pre-training grid,
    row-major. Computed in float32 exactly as the reference (MiniCPM-V / Idefics2 navit) code
    does: the step is a float32 ``1/h`` and bucket edges are a float32 ``arange``, so crops
    whose fractions land on an edge get the same bucket as there."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    step_h = 1.0 / torch.tensor(float(h), device=device)
    step_w = 1.0 / torch.tensor(float(w), device=device)
    fh = (torch.arange(h, dtype=torch.float32, device=device) * step_h).clamp(max=1.0 - 1e-6)
    fw = (torch.arange(w, dtype=torch.float32, device=device) * step_w).clamp(max=1.0 - 1e-6)
    bh = torch.bucketize(fh, boundaries, right=True)
    bw = torch.bucketize(fw, boundaries, right=True)
    return (bh[:, None] * side + bw[None, :]).reshape(-1)


class Embeddings(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.patch_size, self.side = a.patch_size, a.patches_per_side
        self.patch_embedding = nn.Conv2d(a.num_channels, a.hidden_size, a.patch_size, a.patch_size)
        self.position_embedding = nn.Embedding(self.side * self.side, a.hidden_size)

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """crops: normalised [3, H, W] tensors (H, W multiples of the patch size) ->
        embeddings [B, Lmax, D] right-padded with zeros, and the valid-patch mask [B, Lmax]."""
        sizes = [(c.shape[1] // self.patch_size, c.shape[2] // self.patch_size) for c in crops]
        longest = max(h * w for h, w in sizes)
        weight = self.patch_embedding.weight
        out = torch.zeros(len(crops), longest, weight.shape[0], dtype=weight.dtype, device=weight.device)
        valid = torch.zeros(len(crops), longest, dtype=torch.bool, device=weight.device)
        for b, (crop, (h, w)) in enumerate(zip(crops, sizes)):
            # A stride-p convolution over the crop is the official layout (patches unfolded into a
            # strip, row-major) computed without the copy.
            patches = self.patch_embedding(crop[None]).flatten(2).transpose(1, 2)[0]  # [h*w, D]
            ids = bucket_position_ids(h, w, self.side, device=weight.device)
            out[b, : h * w] = patches + self.position_embedding(ids)
            valid[b, : h * w] = True
        return out, valid


class SiglipAttention(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        d = a.hidden_size
        self.n_heads = a.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale head_dim^-0.5, as SigLIP
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class SiglipMLP(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.fc1 = nn.Linear(a.hidden_size, a.intermediate_size)
        self.fc2 = nn.Linear(a.intermediate_size, a.hidden_size)
        self.approximate = "tanh" if a.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SiglipLayer(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.self_attn = SiglipAttention(a)
        self.layer_norm2 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.mlp = SiglipMLP(a)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(a) for _ in range(a.num_hidden_layers))


class NavitSiglip(nn.Module):
    """``vision.vpm``: last hidden state after ``post_layernorm``, all layers used."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.embeddings = Embeddings(a)
        self.encoder = Encoder(a)
        self.post_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, valid = self.embeddings(crops)
        mask = None
        if not bool(valid.all()):
            # Padded patches are keys nobody attends to (the official HF path masks them too).
            mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, float("-inf"))
            mask = mask[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x), valid


def sincos_2d(embed_dim: int, h: int, w: int) -> torch.Tensor:
    """[h, w, embed_dim] float32 table: the first half of the channels encodes the column
    index, the second half the row index; each half is [sin(p w_k), cos(p w_k)] with
    w_k = 10000^(-k / (embed_dim/4)) (MiniCPM-V 2.5 layout)."""
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def one_d(pos):  # [n] -> [n, embed_dim/2]
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=-1)

    cols = one_d(torch.arange(w))[None, :, :].expand(h, w, 2 * quarter)
    rows = one_d(torch.arange(h))[:, None, :].expand(h, w, 2 * quarter)
    return torch.cat([cols, rows], dim=-1).float()


class ResamplerAttention(nn.Module):
    """The packed ``nn.MultiheadAttention`` layout (``in_proj_weight``, ``out_proj``)."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d))
        self.out_proj = nn.Linear(d, d)

    def forward(self, q, k, v, key_padding: torch.Tensor | None):
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, n, d = k.shape
        q = F.linear(q, wq, bq).view(q.shape[0], -1, self.n_heads, d // self.n_heads).transpose(1, 2)
        k = F.linear(k, wk, bk).view(b, n, self.n_heads, -1).transpose(1, 2)
        v = F.linear(v, wv, bv).view(b, n, self.n_heads, -1).transpose(1, 2)
        mask = None
        if key_padding is not None:
            mask = torch.zeros(key_padding.shape, dtype=q.dtype, device=q.device).masked_fill(key_padding, float("-inf"))
            mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, -1, d))


class Resampler(nn.Module):
    """``vision.resampler``: ``query_num`` learned queries (no position embedding) attend to
    the crop's features plus a 2D sin-cos position table (keys only); output
    ``ln_post(out) @ proj`` (proj is stored [in, out])."""

    def __init__(self, query_num: int, embed_dim: int, kv_dim: int, eps: float = 1e-6, grid: int = 70):
        super().__init__()
        # The official model uses hidden_size // 128 heads.
        n_heads = max(embed_dim // 128, 1)
        self.embed_dim, self.grid = embed_dim, grid
        self.query = nn.Parameter(torch.empty(query_num, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = ResamplerAttention(embed_dim, n_heads)
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(embed_dim, eps=eps) for _ in range(3))
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self._pos: dict[tuple, torch.Tensor] = {}

    def pos_embed(self, h: int, w: int, device) -> torch.Tensor:
        # The table is 70 x 70 unless a crop needs more; it is regenerated larger, never interpolated.
        size = (max(self.grid, h), max(self.grid, w))
        key = (size, device)
        if key not in self._pos:
            self._pos[key] = sincos_2d(self.embed_dim, *size).to(device)
        return self._pos[key][:h, :w].reshape(h * w, -1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """x [B, L, kv_dim] (padded), valid [B, L], sizes (rows, cols) per crop -> [B, query_num, D]."""
        kv = self.ln_kv(self.kv_proj(x))
        pos = torch.zeros_like(kv)
        for b, (h, w) in enumerate(sizes):
            pos[b, : h * w] = self.pos_embed(h, w, x.device).to(kv.dtype)
        q = self.ln_q(self.query)[None]
        padding = None if bool(valid.all()) else ~valid
        out = self.attn(q, kv + pos, kv, padding)
        return self.ln_post(out) @ self.proj


class VisionModule(nn.Module):
    """``vision``: ``vpm`` + ``resampler``. Crops are run in chunks of ``batch_size`` (chunking
    does not change results: every crop is masked to its own patches)."""

    def __init__(self, a: VisionArgs, llm_hidden: int, query_num: int, batch_size: int = 8):
        super().__init__()
        self.args, self.batch_size = a, batch_size
        self.vpm = NavitSiglip(a)
        self.resampler = Resampler(query_num, llm_hidden, a.hidden_size)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """crops: [3, H, W] raw 0-255 pixel values (any dtype) -> [n_crops, query_num, llm_hidden]."""
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        device = self.vpm.embeddings.patch_embedding.weight.device
        p = self.args.patch_size
        outs = []
        for start in range(0, len(crops), self.batch_size):
            chunk = crops[start:start + self.batch_size]
            for c in chunk:
                if c.dim() != 3 or c.shape[0] != 3 or c.shape[1] % p or c.shape[2] % p or c.shape[1] == 0:
                    raise ValueError(f"image crops must be [3, H, W] with H and W multiples of {p}, "
                                     f"got {list(c.shape)}")
            # Normalise once, in float32 (as the official model does), then cast.
            norm = [((c.to(device, torch.float32) - 127.5) / 127.5).to(dtype) for c in chunk]
            feats, valid = self.vpm(norm)
            sizes = [(c.shape[1] // p, c.shape[2] // p) for c in chunk]
            outs.append(self.resampler(feats, valid, sizes))
        return torch.cat(outs)


__all__ = ["VisionArgs", "VisionModule", "NavitSiglip", "Resampler", "bucket_position_ids", "sincos_2d"]
