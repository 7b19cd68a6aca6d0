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

    def view(self, starts, num_new: int, slots=None) -> "CacheView":
        """A context for a forward pass over ``num_new`` tokens per row, row b starting at
        position ``starts[b]`` of slot ``slots[b]`` (rows 0..B-1 when ``slots`` is None).
        ``starts`` and ``slots`` are lists of ints or 1-D tensors."""
        return CacheView(self, starts, num_new, slots)


class CacheView:
    """Attention for one forward pass against the cache: write the new keys/values at each
    row's positions, then attend over the row's whole history."""

    def __init__(self, cache: KVCache, starts, num_new: int, slots=None):
        device = cache.k[0].device
        starts = [int(s) for s in (starts.tolist() if torch.is_tensor(starts) else starts)]
        b = len(starts)
        slots = list(range(b)) if slots is None else [int(s) for s in (slots.tolist() if torch.is_tensor(slots)
                                                                       else slots)]
        self.cache, self.starts, self.num_new = cache, starts, num_new
        self.positions = torch.tensor(starts, device=device)[:, None] + torch.arange(num_new, device=device)  # [B, T]
        # Keys beyond the longest row are never attended: slice them off instead of masking.
        self.span = max(starts) + num_new
        if self.span > cache.max_len:
            raise ValueError(f"sequence of {self.span} tokens exceeds the KV cache length {cache.max_len}")
        # Consecutive slots are read as a view; others are gathered.
        self._rows = slice(slots[0], slots[0] + b) if slots == list(range(slots[0], slots[0] + b)) else \
            torch.tensor(slots, device=device)
        self._slot_index = torch.tensor(slots, device=device)[:, None]
        self.mask, self.is_causal = None, False
        if num_new == 1 and len(set(starts)) == 1:
            pass  # one new token per row, all rows equally long: every cached key is visible
        elif set(starts) == {0}:
            self.is_causal = True  # a fresh prefill: plain causal attention
        else:
            key_pos = torch.arange(self.span, device=device)
            self.mask = (key_pos[None, None, :] <= self.positions[:, :, None])[:, None]  # [B, 1, T, S]

    def attend(self, layer_idx: int, q, k, v):
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k, v = k.to(kc.dtype), v.to(vc.dtype)
        if len(self.starts) == 1:
            slot, start = (self._rows.start if isinstance(self._rows, slice) else int(self._rows[0])), self.starts[0]
            kc[slot, :, start:start + self.num_new] = k[0]
            vc[slot, :, start:start + self.num_new] = v[0]
        else:
            # kc[idx, :, pos] addresses [B, T, nkv, hd] (advanced indices first).
            kc[self._slot_index, :, self.positions] = k.transpose(1, 2)
            vc[self._slot_index, :, self.positions] = v.transpose(1, 2)
        keys = kc[self._rows, :, : self.span]
        values = vc[self._rows, :, : self.span]
        if q.device.type == "cpu" and q.dtype != torch.float32:
            # CPU attention kernels are several times slower in 16-bit; the cast costs little.
            out = sdpa(q.float(), keys.float(), values.float(), mask=self.mask, is_causal=self.is_causal)
            return out.to(q.dtype)
        return sdpa(q, keys, values, mask=self.mask, is_causal=self.is_causal)
