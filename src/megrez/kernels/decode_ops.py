"""The operations of a decoding step other than the weight products (``decode_ops.c``):
attention of one new token per row against the paged KV cache, with its RoPE and cache write,
RMSNorm, and a whole decoder layer with quantized weights in one call. At a few rows, torch spends far longer dispatching these operators than computing
them. float32 on the CPU, with autograd off; callers fall back to torch when :func:`available`
is false."""
from __future__ import annotations

import ctypes

import torch

from .. import kernels as _kernels
from .quantized import KERNEL_TYPES

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class DecodeAttention(ctypes.Structure):
    _fields_ = [("rows", _i64), ("n_heads", _i64), ("n_kv", _i64), ("head_dim", _i64),
                ("num_blocks", _i64), ("block_size", _i64), ("max_blocks", _i64),
                ("q", _ptr), ("k", _ptr), ("v", _ptr), ("cos", _ptr), ("sin", _ptr),
                ("k_cache", _ptr), ("v_cache", _ptr), ("tables", _ptr), ("lengths", _ptr),
                ("scale", _f32), ("out", _ptr)]


class DecodeLayer(ctypes.Structure):
    _fields_ = [("rows", _i64), ("hidden", _i64), ("n_heads", _i64), ("n_kv", _i64), ("head_dim", _i64), ("inter", _i64),
                ("h_in", _ptr), ("h_out", _ptr), ("y", _ptr), ("norm1", _ptr), ("norm2", _ptr),
                ("eps", _f32), ("scale", _f32),
                ("wq", _ptr), ("wk", _ptr), ("wv", _ptr), ("wo", _ptr), ("wg", _ptr), ("wu", _ptr), ("wd", _ptr),
                ("tq", ctypes.c_int32), ("tk", ctypes.c_int32), ("tv", ctypes.c_int32), ("to", ctypes.c_int32),
                ("tgu", ctypes.c_int32), ("td", ctypes.c_int32),
                ("cos", _ptr), ("sin", _ptr), ("k_cache", _ptr), ("v_cache", _ptr),
                ("num_blocks", _i64), ("block_size", _i64), ("max_blocks", _i64), ("tables", _ptr), ("lengths", _ptr)]


def declare(lib) -> None:
    lib.megrez_decode_attention.argtypes = [ctypes.POINTER(DecodeAttention)]
    lib.megrez_decode_layer.argtypes = [ctypes.POINTER(DecodeLayer)]
    lib.megrez_rms_norm.argtypes = [_ptr, _ptr, _i64, _i64, _f32, _ptr]
    for f in (lib.megrez_decode_attention, lib.megrez_decode_layer, lib.megrez_rms_norm):
        f.restype = ctypes.c_int


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


def layer_args(hidden: int, norms: tuple[torch.Tensor, torch.Tensor], eps: float, attention: tuple, mlp: tuple | None,
               n_heads: int, n_kv: int, head_dim: int, scale: float) -> DecodeLayer | None:
    """The fixed part of a :func:`decode_layer` call (weights, norms, shapes; the per-step
    pointers left unset), or None where the kernel does not apply to these weights."""
    mats = (*attention, *(mlp or ()))
    if (not all(n.is_cpu and n.dtype is torch.float32 for n in norms) or not all(w.qtype in KERNEL_TYPES and w.data.is_cpu and w.data.is_contiguous() for w in mats)
            or (mlp is not None and mlp[0].qtype != mlp[1].qtype) or not all(n.is_contiguous() for n in norms)):
        return None
    wq, wk, wv, wo = attention
    if (wq.shape != (n_heads * head_dim, hidden) or wk.shape != (n_kv * head_dim, hidden) or wv.shape != wk.shape
            or wo.shape != (hidden, n_heads * head_dim) or any(n.shape != (hidden,) for n in norms)):
        return None
    inter = 0
    if mlp is not None:
        inter = mlp[0].shape[0]
        if mlp[0].shape != (inter, hidden) or mlp[1].shape != mlp[0].shape or mlp[2].shape != (hidden, inter):
            return None
    gate, up, down = mlp if mlp is not None else (None, None, None)
    args = DecodeLayer()
    args.hidden, args.n_heads, args.n_kv, args.head_dim, args.inter = hidden, n_heads, n_kv, head_dim, inter
    args.norm1, args.norm2, args.eps, args.scale = norms[0].data_ptr(), norms[1].data_ptr(), eps, scale
    args.wq, args.wk, args.wv, args.wo = (w.data.data_ptr() for w in attention)
    args.tq, args.tk, args.tv, args.to = (int(w.qtype) for w in attention)
    if mlp is not None:
        args.wg, args.wu, args.wd = gate.data.data_ptr(), up.data.data_ptr(), down.data.data_ptr()
        args.tgu, args.td = int(gate.qtype), int(down.qtype)
    return args


def decode_layer(h: torch.Tensor, norms: tuple[torch.Tensor, torch.Tensor], eps: float, attention: tuple,
                 mlp: tuple | None, cos, sin, k_cache, v_cache, tables, lengths, n_heads: int, scale: float):
    """One decoder layer at one new token per row: h [B, H] float32, ``attention`` the
    (q, k, v, o) QuantTensors, ``mlp`` the (gate, up, down) QuantTensors or None (the layer's
    MLP is run by the caller, e.g. an MoE layer's). Returns (h after the layer [B, H], the
    post-attention norm's output y [B, H]), or None where the kernel does not apply (nothing
    is written then)."""
    if (not _usable(h, cos, sin, k_cache, v_cache) or (lib := _lib()) is None
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        return None
    rows, hidden = h.shape
    n_kv, num_blocks, block_size, hd = k_cache.shape
    args = layer_args(hidden, norms, eps, attention, mlp, n_heads, n_kv, hd, scale)
    if args is None:
        return None
    h = h.contiguous()
    h_out, y = torch.empty_like(h), torch.empty_like(h)
    cos, sin = cos.contiguous(), sin.contiguous()
    args.rows, args.h_in, args.h_out, args.y = rows, h.data_ptr(), h_out.data_ptr(), y.data_ptr()
    args.cos, args.sin, args.k_cache, args.v_cache = cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()
    args.num_blocks, args.block_size, args.max_blocks = num_blocks, block_size, tables.shape[1]
    args.tables, args.lengths = tables.data_ptr(), lengths.data_ptr()
    rc = lib.megrez_decode_layer(ctypes.byref(args))
    if rc != 0:
        raise RuntimeError(f"megrez_decode_layer failed ({rc}): invalid shapes, cache layout or out of memory")
    return h_out, y
