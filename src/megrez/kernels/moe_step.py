"""A whole decoding step at one token with quantized weights in one kernel call
(``moe_step.c``): each layer's attention half (and a dense layer's MLP), its routing and the
pre-gated routing of the next layer, and its MoE products, in the order and with the bits of
the model's layer-by-layer calls. The model (``models.megrez_moe``; ``models.llama``, whose
layers are all dense) describes the layers once
(:class:`StepLayer` from :func:`dense_layer` / :func:`moe_layer`) and runs :func:`run` per
step."""
from __future__ import annotations

import ctypes

import torch

from .. import kernels as _kernels
from .decode_ops import DecodeLayer
from .quantized import KERNEL_TYPES

_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
MAX_EXPERTS_PER_TOKEN = 64  # moe_step.c's bound


class StepLayer(ctypes.Structure):
    _fields_ = [("att", DecodeLayer), ("moe", _i32), ("route_self", _i32), ("route_next", _i32),
                ("router", _ptr), ("router_bias", _ptr), ("eg", _ptr), ("eu", _ptr), ("ed", _ptr),
                ("gu_stride", _i64), ("d_stride", _i64), ("inter", _i64), ("tgu", _i32), ("td", _i32),
                ("sg", _ptr), ("su", _ptr), ("sd", _ptr), ("s_inter", _i64), ("stgu", _i32), ("std", _i32)]


class MoeStep(ctypes.Structure):
    _fields_ = [("layers", _i64), ("hidden", _i64), ("experts", _i64), ("top_k", _i64),
                ("softmax", _i32), ("normalize", _i32), ("scale", _f32), ("L", ctypes.POINTER(StepLayer)),
                ("h", _ptr), ("cos", _ptr), ("sin", _ptr), ("k_caches", ctypes.POINTER(_ptr)),
                ("v_caches", ctypes.POINTER(_ptr)), ("num_blocks", _i64), ("block_size", _i64), ("max_blocks", _i64),
                ("tables", _ptr), ("lengths", _ptr), ("indices", _ptr), ("weights", _ptr)]


def declare(lib) -> None:
    lib.megrez_moe_decode_step.argtypes = [ctypes.POINTER(MoeStep)]
    lib.megrez_moe_decode_step.restype = ctypes.c_int


def _quantized(*ws) -> bool:
    return all(getattr(w, "qtype", None) in KERNEL_TYPES and w.data.is_cpu and w.data.is_contiguous() for w in ws)


def moe_layer(att: DecodeLayer, router: torch.Tensor, bias: torch.Tensor | None, bank: tuple, shared: tuple | None,
              route_self: bool, route_next: bool, hidden: int) -> StepLayer | None:
    """An MoE layer: ``bank`` the group's stacked (gate, up, down) QuantTensors [E, I, H] /
    [E, H, I], ``shared`` its shared experts' (gate, up, down) or None; None where the kernel does
    not apply."""
    gate, up, down = bank
    if (not _quantized(gate, up, down, *(shared or ())) or gate.qtype != up.qtype or gate.shape != up.shape
            or gate.shape[2] != hidden or down.shape[:2] != (gate.shape[0], hidden) or down.shape[2] != gate.shape[1]
            or router.dtype is not torch.float32 or not router.is_contiguous() or router.shape != (gate.shape[0], hidden)
            or (bias is not None and (bias.dtype is not torch.float32 or bias.shape != (gate.shape[0],)))):
        return None
    layer = StepLayer(att, 1, int(route_self), int(route_next), router.data_ptr(), bias.data_ptr() if bias is not None else None,
                      gate.data.data_ptr(), up.data.data_ptr(), down.data.data_ptr(), gate.data.stride(0),
                      down.data.stride(0), gate.shape[1], int(gate.qtype), int(down.qtype))
    if shared is not None:
        sg, su, sd = shared
        if sg.qtype != su.qtype or sg.shape != su.shape or sg.shape[1] != hidden or sd.shape != (hidden, sg.shape[0]):
            return None
        layer.sg, layer.su, layer.sd = sg.data.data_ptr(), su.data.data_ptr(), sd.data.data_ptr()
        layer.s_inter, layer.stgu, layer.std = sg.shape[0], int(sg.qtype), int(sd.qtype)
    return layer


def dense_layer(att: DecodeLayer, route_next: bool) -> StepLayer:
    return StepLayer(att, 0, 0, int(route_next))


class Plan:
    """The layers of one model, described once; ``keep`` holds the tensors they point into."""

    def __init__(self, layers: list[StepLayer], moe_layers: list[int], experts: int, top_k: int, softmax: bool,
                 normalize: bool, scale: float, n_kv: int, head_dim: int, keep: tuple):
        self.layers = (StepLayer * len(layers))(*layers)
        self.n, self.moe_layers, self.experts, self.top_k = len(layers), moe_layers, experts, top_k
        self.softmax, self.normalize, self.scale = softmax, normalize, scale
        self.n_kv, self.head_dim = n_kv, head_dim
        self.keep = keep


def run(plan: Plan, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_caches: list, v_caches: list,
        tables: torch.Tensor, lengths: torch.Tensor):
    """One token: h [1, H] float32 -> (h after every layer [1, H], indices [layers, k], weights
    [layers, k]: each MoE layer's routing, best choice first; dense layers' rows unset), or None
    where the kernel does not apply (nothing is written then)."""
    if (lib := _kernels.load()) is None or torch.is_grad_enabled() or h.shape[0] != 1:
        return None
    kc = k_caches[0]
    if (len(k_caches) != plan.n or len(v_caches) != plan.n or kc.dim() != 4
            or (kc.shape[0], kc.shape[3]) != (plan.n_kv, plan.head_dim)
            or not all(c.is_cpu and c.dtype is torch.float32 and c.is_contiguous() and c.shape == kc.shape
                       for c in (*k_caches, *v_caches))):
        return None
    _, num_blocks, block_size, hd = kc.shape
    h = h.to(torch.float32).contiguous().clone()
    cos, sin = cos.reshape(hd).contiguous(), sin.reshape(hd).contiguous()
    indices = torch.zeros(plan.n, plan.top_k, dtype=torch.int64)
    weights = torch.zeros(plan.n, plan.top_k)
    ptrs = _ptr * plan.n
    args = MoeStep(plan.n, h.shape[1], plan.experts, plan.top_k, int(plan.softmax), int(plan.normalize), plan.scale,
                   plan.layers, h.data_ptr(), cos.data_ptr(), sin.data_ptr(), ptrs(*(c.data_ptr() for c in k_caches)),
                   ptrs(*(c.data_ptr() for c in v_caches)), num_blocks, block_size, tables.shape[1],
                   tables.data_ptr(), lengths.data_ptr(), indices.data_ptr(), weights.data_ptr())
    rc = lib.megrez_moe_decode_step(ctypes.byref(args))
    if rc != 0:
        raise RuntimeError(f"megrez_moe_decode_step failed ({rc}): invalid layer description, shapes or out of memory")
    return h, indices, weights
