"""Paged key/value cache: fixed-size blocks, and a block table per sequence.

The cache only stores tensors. Which blocks a sequence owns, which are shared between
sequences (prefix caching) and how many tokens each holds is the engine's business: it
builds a :class:`CacheView` for every forward pass from the sequences' block tables.

Block 0 is never given to a sequence: padding tokens of a batch write there, so a
padded row can never touch another sequence's (possibly shared) blocks.
"""
from __future__ import annotations

import torch

from .. import kernels
from .base import sdpa

NULL_BLOCK = 0


class KVCache:
    """Per layer, keys and values as ``[n_kv, num_blocks, block_size, head_dim]``: gathering a
    batch's blocks along dim 1 gives ``[B, n_kv, S, head_dim]`` as a view, one copy in all."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a paged KV cache needs at least 2 blocks of at least 1 token "
                             f"(got {num_blocks} x {block_size})")
        shape = (n_kv, num_blocks, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_token(num_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * n_kv * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def view(self, starts, num_new: int, block_tables: list[list[int]], valid=None) -> "CacheView":
        """A context for a forward pass over ``num_new`` tokens per row: row b's tokens sit at
        positions ``starts[b]...`` of the sequence whose blocks are ``block_tables[b]``. Only
        the first ``valid[b]`` tokens of a row are real (default: all); the rest is padding."""
        return CacheView(self, starts, num_new, block_tables, valid)


def _ints(x) -> list[int]:
    return [int(v) for v in (x.tolist() if torch.is_tensor(x) else x)]


class CacheView:
    """Attention for one forward pass against the cache: write the new keys/values of every
    row into its blocks, then attend over each row's whole history. All rows are written
    before any is read, so rows of one pass may share blocks."""

    def __init__(self, cache: KVCache, starts, num_new: int, block_tables: list[list[int]], valid=None):
        device = cache.k[0].device
        bs = cache.block_size
        starts = _ints(starts)
        b = len(starts)
        valid = [num_new] * b if valid is None else _ints(valid)
        if len(block_tables) != b or len(valid) != b:
            raise ValueError(f"{b} rows but {len(block_tables)} block tables and {len(valid)} lengths")
        self.cache, self.starts, self.num_new, self.valid = cache, starts, num_new, valid
        self.positions = torch.tensor(starts, device=device)[:, None] + torch.arange(num_new, device=device)  # [B, T]
        ends = [s + n for s, n in zip(starts, valid)]
        # Keys beyond the longest row are never attended: they are not gathered at all.
        self.span = max(ends)
        n_blocks = -(-self.span // bs)
        for row, (table, end) in enumerate(zip(block_tables, ends)):
            if len(table) * bs < end:
                raise ValueError(f"row {row} needs {end} cached tokens but its {len(table)} blocks hold "
                                 f"{len(table) * bs}")
        # Where each new token's key/value goes (flat index block * block_size + offset);
        # padding goes to the null block, which no sequence reads as its own.
        slots = []
        for s, n, table in zip(starts, valid, block_tables):
            slots += [table[p // bs] * bs + p % bs for p in range(s, s + n)]
            slots += [NULL_BLOCK * bs + j % bs for j in range(num_new - n)]
        self._slots = torch.tensor(slots, device=device)
        tables = [list(t[:n_blocks]) + [NULL_BLOCK] * (n_blocks - len(t[:n_blocks])) for t in block_tables]
        # One row over consecutive blocks (a sequence decoding alone) is read as a view.
        first = tables[0][0]
        self._contiguous = b == 1 and tables[0] == list(range(first, first + n_blocks))
        self._blocks = slice(first, first + n_blocks) if self._contiguous else \
            torch.tensor(tables, device=device).flatten()
        self._rows, self._n_blocks = b, n_blocks
        self._tables, self._ends, self._step_args = tables, ends, None
        self.mask, self.is_causal = None, False
        if num_new == 1 and len(set(ends)) == 1 and len(set(starts)) == 1:
            pass  # one new token per row, all rows equally long: every gathered key is visible
        elif set(starts) == {0} and self.span == num_new:
            self.is_causal = True  # a fresh prefill: plain causal attention
        else:
            key_pos = torch.arange(self.span, device=device)
            self.mask = (key_pos[None, None, :] <= self.positions[:, :, None])[:, None]  # [B, 1, T, S]

    def _gather(self, cache: torch.Tensor) -> torch.Tensor:
        n_kv, _, bs, hd = cache.shape
        # index_select, not cache[:, idx]: the same copy at a tenth of the dispatch cost.
        blocks = cache[:, self._blocks] if self._contiguous else cache.index_select(1, self._blocks)  # [nkv, B*nb, bs, hd]
        rows = blocks.view(n_kv, self._rows, self._n_blocks * bs, hd).permute(1, 0, 2, 3)  # [B, nkv, nb*bs, hd]
        return rows[:, :, : self.span]

    def attend(self, layer_idx: int, q, k, v):
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        n_kv, hd = kc.shape[0], kc.shape[-1]
        flat_k, flat_v = kc.view(n_kv, -1, hd), vc.view(n_kv, -1, hd)
        # [B, nkv, T, hd] -> [nkv, B*T, hd], row-major like the slots.
        flat_k[:, self._slots] = k.to(kc.dtype).transpose(0, 1).reshape(n_kv, -1, hd)
        flat_v[:, self._slots] = v.to(vc.dtype).transpose(0, 1).reshape(n_kv, -1, hd)
        keys, values = self._gather(kc), self._gather(vc)
        if q.device.type == "cpu":
            return self._attend_rows(q, keys, values)
        return sdpa(q, keys, values, mask=self.mask, is_causal=self.is_causal)

    def step_cache(self, layer_idx: int):
        """(keys, values, block tables [B, blocks], lengths [B]) of a layer for the decode
        kernels when this pass is one new token per row on the CPU, else None."""
        if self.num_new != 1 or min(self.valid) != 1 or self.cache.k[layer_idx].device.type != "cpu":
            return None
        if self._step_args is None:
            self._step_args = (torch.tensor(self._tables, dtype=torch.int64), torch.tensor(self._ends, dtype=torch.int64))
        return (self.cache.k[layer_idx], self.cache.v[layer_idx], *self._step_args)

    def attend_step(self, layer_idx: int, q, k, v, cos, sin, n_heads: int):
        """One new token per row on the CPU: RoPE, cache write and attention in one kernel call
        (q [B, 1, n_heads*hd], k/v [B, 1, n_kv*hd] before RoPE) -> [B, 1, n_heads*hd]; None
        where the kernel does not apply (the caller then rotates and calls :meth:`attend`)."""
        if (step := self.step_cache(layer_idx)) is None:
            return None
        kc, vc, tables, lengths = step
        b, hd = q.shape[0], kc.shape[-1]
        out = kernels.decode_ops.decode_attention(q.view(b, -1), k.view(b, -1), v.view(b, -1), cos.view(b, hd),
                                                  sin.view(b, hd), kc, vc, tables, lengths, n_heads, hd ** -0.5)
        return None if out is None else out.view(b, 1, -1)

    def _attend_rows(self, q, keys, values):
        """CPU attention one row at a time, each over exactly its own keys: the bits of a row's
        output then do not depend on the rows beside it (one padded call would sum over a
        padded, masked span, which the CPU kernels block differently, and a 1e-7 difference
        is enough to flip an 8-bit activation of the quantized kernels). A sequence decodes to
        the same tokens alone or in any batch."""
        out = q.new_zeros(q.shape)
        for b, (start, n) in enumerate(zip(self.starts, self.valid)):
            if n == 0:
                continue
            end = start + n
            qb, kb, vb = q[b:b + 1, :, :n], keys[b:b + 1, :, :end], values[b:b + 1, :, :end]
            mask, causal = None, False
            if n > 1 and start == 0:
                causal = True
            elif n > 1:
                key_pos = torch.arange(end, device=q.device)
                mask = (key_pos[None, :] <= self.positions[b, :n, None])[None, None]  # [1, 1, n, end]
            if q.dtype != torch.float32:
                # CPU attention kernels are several times slower in 16-bit; the cast costs little.
                out[b:b + 1, :, :n] = sdpa(qb.float(), kb.float(), vb.float(), mask=mask, is_causal=causal).to(q.dtype)
            else:
                out[b:b + 1, :, :n] = sdpa(qb, kb, vb, mask=mask, is_causal=causal)
        return out
