"""The operations of a decoding step other than the weight products (``decode_ops.c``):
attention of one new token per row against the paged KV cache, with its RoPE and cache write,
and RMSNorm. At a few rows, torch spends far longer dispatching these operators than computing
them. float32 on the CPU, with autograd off; callers fall back to torch when :func:`available`
is false."""
from __future__ import annotations

import ctypes

import torch

from .. import kernels as _kernels

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class DecodeAttention(ctypes.Structure):
    _fields_ = [("rows", _i64), ("n_heads", _i64), ("n_kv", _i64), ("head_dim", _i64),
                ("num_blocks", _i64), ("block_size", _i64), ("max_blocks", _i64),
                ("q", _ptr), ("k", _ptr), ("v", _ptr), ("cos", _ptr), ("sin", _ptr),
                ("k_cache", _ptr), ("v_cache", _ptr), ("tables", _ptr), ("lengths", _ptr),
                ("scale", _f32), ("out", _ptr)]


def declare(lib) -> None:
    lib.megrez_decode_attention.argtypes = [ctypes.POINTER(DecodeAttention)]
    lib.megrez_rms_norm.argtypes = [_ptr, _ptr, _i64, _i64, _f32, _ptr]
    lib.megrez_decode_attention.restype = lib.megrez_rms_norm.restype = ctypes.c_int


def _lib():
    return _kernels.load() if _kernels.enabled else None


def _usable(*tensors: torch.Tensor) -> bool:
    # Attribute tests only: at one row, a few microseconds here are the whole cost of the call.
    return not torch.is_grad_enabled() and all(t.is_cpu and t.dtype is torch.float32 for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``weight * rms_norm(x)`` over the last dimension, or None where the kernel does not apply."""
    if not _usable(x, weight) or (lib := _lib()) is None or weight.shape[0] != x.shape[-1]:
        return None
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.shape[-1]
    if lib.megrez_rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // n, n, eps, y.data_ptr()) != 0:
        raise RuntimeError("megrez_rms_norm: invalid arguments")
    return y


def decode_attention(q, k, v, cos, sin, k_cache, v_cache, tables: torch.Tensor, lengths: torch.Tensor,
                     n_heads: int, scale: float) -> torch.Tensor | None:
    """One new token per row: q [B, n_heads*hd], k/v [B, n_kv*hd] (before RoPE), cos/sin [B, hd],
    caches [n_kv, blocks, block_size, hd], tables [B, max_blocks] and lengths [B] (int64, keys
    after this step). Writes the new keys and values into the cache and returns the attention
    output [B, n_heads*hd], or None where the kernel does not apply."""
    if not _usable(q, k, v, cos, sin, k_cache, v_cache) or (lib := _lib()) is None:
        return None
    n_kv, num_blocks, block_size, hd = k_cache.shape
    rows = q.shape[0]
    q, k, v, cos, sin = (t.contiguous() for t in (q, k, v, cos, sin))
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    out = torch.empty(rows, n_heads * hd)
    args = DecodeAttention(rows, n_heads, n_kv, hd, num_blocks, block_size, tables.shape[1],
                           q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                           k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lengths.data_ptr(),
                           scale, out.data_ptr())
    rc = lib.megrez_decode_attention(ctypes.byref(args))
    if rc != 0:
        raise RuntimeError(f"megrez_decode_attention failed ({rc}): invalid cache layout or out of memory")
    return out
