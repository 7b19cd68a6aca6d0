"""Attention contexts for packed training rows.

On CUDA, block-diagonal causal attention runs through FlexAttention with a block mask built
from the document ids: fully masked blocks are skipped and no [T, T] mask is materialised per
row. Elsewhere (CPU) the core ``PackedContext`` with a dense boolean mask through SDPA is used;
it is exact and fast enough at CPU sizes. Both restart positions at every document start.
"""
from __future__ import annotations

import torch

from ..models.base import PackedContext

ATTENTION_BACKENDS = ("auto", "dense", "flex")
_compiled_flex = None


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> position of each token inside its document (0 at every document start)."""
    b, t = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values


def _flex():
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        # Compiled flex is the fused kernel; eager flex is a slow reference (used on CPU in tests).
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _compiled_flex


class FlexPackedContext:
    """Packed documents through FlexAttention (same semantics as ``PackedContext``)."""

    def __init__(self, doc_ids: torch.Tensor, compiled: bool | None = None):
        from torch.nn.attention.flex_attention import create_block_mask

        b, t = doc_ids.shape
        self.positions = document_positions(doc_ids)
        docs = doc_ids

        def same_doc_causal(bi, h, q, kv):
            return (docs[bi, q] == docs[bi, kv]) & (q >= kv)

        self.block_mask = create_block_mask(same_doc_causal, b, None, t, t, device=doc_ids.device)
        use_compiled = doc_ids.is_cuda if compiled is None else compiled
        self._attn = _flex() if use_compiled else None

    def attend(self, layer_idx, q, k, v):
        from torch.nn.attention.flex_attention import flex_attention

        fn = self._attn or flex_attention
        return fn(q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1])


def packed_context(doc_ids: torch.Tensor, backend: str = "auto"):
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend == "flex" or (backend == "auto" and doc_ids.is_cuda):
        return FlexPackedContext(doc_ids)
    return PackedContext(doc_ids)
