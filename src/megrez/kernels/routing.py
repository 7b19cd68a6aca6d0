"""MoE routing of token rows in one call (``routing.c``): the router's float32 product, sigmoid
or softmax scores, the top-k choice (with a selection-only bias) and the normalised weights,
the definition of ``models.moe.route``. On the CPU with autograd off; None elsewhere, and the
caller routes with torch."""
from __future__ import annotations

import ctypes

import torch

from .. import kernels as _kernels

_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
MAX_EXPERTS = 1024  # routing.c's bound
# Tensors whose data_ptr is their data (not, e.g., a sharded DTensor's local piece).
_PLAIN = (torch.Tensor, torch.nn.Parameter, type(None))


class Route(ctypes.Structure):
    _fields_ = [("rows", _i64), ("hidden", _i64), ("experts", _i64), ("top_k", _i64),
                ("x", _ptr), ("w", _ptr), ("bias", _ptr), ("softmax", _i32), ("normalize", _i32),
                ("scale", _f32), ("weights", _ptr), ("indices", _ptr)]


def declare(lib) -> None:
    lib.megrez_route.argtypes = [ctypes.POINTER(Route)]
    lib.megrez_route.restype = ctypes.c_int


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int, softmax: bool,
          normalize: bool, scale: float):
    """x [N, H] -> (weights [N, k] float32, indices [N, k] int64, best choice first), or None
    where the kernel does not apply (autograd on, not the CPU, a weight not float32 or not a plain
    tensor)."""
    if (torch.is_grad_enabled() or not _kernels.enabled or not all(type(t) in _PLAIN for t in (x, weight, bias))
            or not (x.is_cpu and weight.is_cpu)
            or weight.dtype is not torch.float32 or (bias is not None and bias.dtype is not torch.float32)
            or weight.dim() != 2 or not 1 <= top_k <= weight.shape[0] <= MAX_EXPERTS
            or (lib := _kernels.load()) is None):
        return None
    n, h = x.shape
    experts = weight.shape[0]
    if weight.shape[1] != h or (bias is not None and bias.shape != (experts,)):
        return None
    x = x.to(torch.float32).contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    weights = torch.empty(n, top_k)
    indices = torch.empty(n, top_k, dtype=torch.int64)
    args = Route(n, h, experts, top_k, x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                 int(softmax), int(normalize), scale, weights.data_ptr(), indices.data_ptr())
    if lib.megrez_route(ctypes.byref(args)) != 0:
        raise RuntimeError(f"megrez_route: invalid arguments (rows {n}, hidden {h}, experts {experts}, top_k {top_k})")
    return weights, indices
