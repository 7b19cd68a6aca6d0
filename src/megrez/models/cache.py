"""Preallocated key/value cache organised in slots: one slot per running sequence.

The cache only stores tensors. Which slot a sequence uses and how many tokens it holds is
the engine's business: it builds a :class:`CacheView` for every forward pass, and advances
the lengths itself afterwards.
"""
from __future__ import annotations

import torch

from .base import sdpa


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_slots, n_kv, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_len = num_slots, max_len

    @staticmethod
    def bytes_per_token(num_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * n_kv * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def view(self, starts: torch.Tensor, num_new: int, slots: torch.Tensor | None = None) -> "CacheView":
        """A context for a forward pass over ``num_new`` tokens per row, row b starting at
        position ``starts[b]`` of slot ``slots[b]`` (rows 0..B-1 when ``slots`` is None)."""
        return CacheView(self, starts, num_new, slots)


class CacheView:
    def __init__(self, cache: KVCache, starts: torch.Tensor, num_new: int, slots: torch.Tensor | None):
        device = cache.k[0].device
        self.cache, self.slots = cache, slots
        self.starts = starts.to(device)
        b = self.starts.shape[0]
        self.positions = self.starts[:, None] + torch.arange(num_new, device=device)  # [B, T]
        # Keys beyond the longest row are never attended: slice them off instead of masking.
        self.span = int(self.starts.max()) + num_new
        if self.span > cache.max_len:
            raise ValueError(f"sequence of {self.span} tokens exceeds the KV cache length {cache.max_len}")
        key_pos = torch.arange(self.span, device=device)
        self.mask = (key_pos[None, None, :] <= self.positions[:, :, None])[:, None]  # [B, 1, T, S]
        self._rows = slice(0, b) if slots is None else self.slots.to(device)

    def attend(self, layer_idx: int, q, k, v):
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        rows = self._rows
        if isinstance(rows, slice):
            idx = torch.arange(q.shape[0], device=q.device)[:, None]
        else:
            idx = rows[:, None]
        # kc[idx, :, pos] addresses [B, T, nkv, hd] (advanced indices first).
        kc[idx, :, self.positions] = k.transpose(1, 2).to(kc.dtype)
        vc[idx, :, self.positions] = v.transpose(1, 2).to(vc.dtype)
        keys = kc[rows, :, : self.span]
        values = vc[rows, :, : self.span]
        return sdpa(q, keys, values, mask=self.mask)
