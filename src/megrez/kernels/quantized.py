"""Products with quantized weights (:class:`megrez.quant.QuantTensor`): the functions in
``megrez.kernels`` route here when a weight is quantized.

The C kernels (quantized.c) quantize the activations to 8 bits per block, as llama.cpp does,
and compute integer dot products against the weights where they lie; every product of a layer
step (Q/K/V, gate/up, all selected experts and their down projections) runs in one parallel
call. Each output row is computed in one fixed order whatever the number of rows or the other
rows, so results are batch-invariant, and every instruction-set variant gives the scalar
reference's bits.

Reference path, where the kernels are unavailable (no C compiler, ``MEGREZ_CPU_KERNELS=0``) or
autograd needs the product: dequantize to float32, then torch. It keeps the activations in
float32, so its results differ from the kernels' by the activation rounding (see
tests/test_quantized_kernels.py for the bound); it is said once on stderr.
"""
from __future__ import annotations

import ctypes
import sys

import torch
import torch.nn.functional as F

from .. import kernels as _kernels  # the package (initialising while it imports this module)
from ..quant.formats import FLOAT_QTYPES, QType, QuantTensor

KERNEL_TYPES = (QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.Q4_K, QType.Q6_K)
MAX_PRODUCTS = 256  # per stage of one kernel call (quantized.c)


class Product(ctypes.Structure):
    """quantized.c's ``mz_product``."""
    _fields_ = [("x", ctypes.c_void_p), ("m", ctypes.c_int64), ("w1", ctypes.c_void_p), ("w2", ctypes.c_void_p),
                ("qtype", ctypes.c_int32), ("swiglu", ctypes.c_int32), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("y", ctypes.c_void_p)]


def declare(lib) -> None:
    """ctypes signatures of quantized.c's entry points."""
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.megrez_q_products.argtypes = [i64, ptr, i64, ptr]
    lib.megrez_q_moe_token.argtypes = [i64, ptr, ptr, i64, ptr, i64, ptr]
    lib.megrez_q_reference.argtypes = [ptr]
    lib.megrez_q_quantize_rows.argtypes = [c_int, ptr, i64, i64, ptr, ptr, ptr]
    lib.megrez_q_dequantize.argtypes = [c_int, ptr, i64, i64, ptr]
    lib.megrez_quantize.argtypes = [c_int, ptr, i64, i64, ptr]
    for f in (lib.megrez_q_products, lib.megrez_q_moe_token, lib.megrez_q_reference, lib.megrez_q_quantize_rows, lib.megrez_q_dequantize,
              lib.megrez_quantize):
        f.restype = c_int


_announced = False


def _kernel_lib(x: torch.Tensor, *weights: QuantTensor):
    """The library when the kernels apply to this product, else None (reference path)."""
    if not (_kernels.enabled and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    if not all(w.qtype in KERNEL_TYPES and w.device.type == "cpu" and w.is_contiguous() for w in weights):
        return None
    lib = _kernels.load()
    if lib is None:
        _announce()
    return lib


def _announce() -> None:
    global _announced
    if not _announced:
        _announced = True
        print(f"megrez: quantized CPU kernels unavailable ({_kernels.reason}); dequantizing weights for torch instead "
              "(slower)", file=sys.stderr)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()


def _check(x: torch.Tensor, w: QuantTensor) -> None:
    if len(w.shape) != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"cannot multiply x [..., {x.shape[-1]}] by a {w.qtype.name} weight of shape {list(w.shape)}")


def _product(x: torch.Tensor, w1: QuantTensor, w2: QuantTensor | None = None) -> tuple[Product, torch.Tensor]:
    """A kernel product for float32 rows x [M, K] and its output [M, N]."""
    _check(x, w1)
    n, k = w1.shape
    y = torch.empty(x.shape[0], n)
    p = Product(x.data_ptr(), x.shape[0], w1.data.data_ptr(), 0 if w2 is None else w2.data.data_ptr(), int(w1.qtype),
                int(w2 is not None), n, k, y.data_ptr())
    return p, y


def _run(lib, stage1: list[Product], stage2: list[Product] = ()) -> None:
    if len(stage1) > MAX_PRODUCTS or len(stage2) > MAX_PRODUCTS:
        raise ValueError(f"at most {MAX_PRODUCTS} products per kernel call")
    a = (Product * len(stage1))(*stage1)
    b = (Product * len(stage2))(*stage2) if stage2 else None
    rc = lib.megrez_q_products(len(stage1), a, len(stage2), b)
    if rc != 0:
        raise RuntimeError(f"megrez_q_products failed ({rc}): invalid product shapes or out of memory")


def _plain(w: QuantTensor) -> torch.Tensor:
    """An unquantized QuantTensor (F32/F16/BF16) as the torch tensor it is."""
    return w.data.view(FLOAT_QTYPES[w.qtype]).view(w.shape)


def linear(x: torch.Tensor, weight: QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.qtype in FLOAT_QTYPES:
        return _kernels.linear(x, _plain(weight), bias)
    if (lib := _kernel_lib(x, weight)) is None:
        y = F.linear(x.float(), weight.dequantize(), None if bias is None else bias.float())
        return y.to(x.dtype)
    xr = _rows(x)
    p, y = _product(xr, weight)
    _run(lib, [p])
    y = y.view(*x.shape[:-1], y.shape[-1])
    return (y + bias if bias is not None else y).to(x.dtype)


def linear_many(x: torch.Tensor, weights: list[QuantTensor], biases: list | None = None) -> list[torch.Tensor]:
    """Several products of one x (Q, K and V) in one kernel call."""
    biases = biases or [None] * len(weights)
    quantized = [isinstance(w, QuantTensor) and w.qtype in KERNEL_TYPES for w in weights]
    if not all(quantized) or (lib := _kernel_lib(x, *weights)) is None:
        return [_kernels.linear(x, w, b) for w, b in zip(weights, biases)]
    xr = _rows(x)
    products = [_product(xr, w) for w in weights]
    _run(lib, [p for p, _ in products])
    outs = [y.view(*x.shape[:-1], y.shape[-1]) for _, y in products]
    return [(o + b if b is not None else o).to(x.dtype) for o, b in zip(outs, biases)]


def swiglu(x: torch.Tensor, gate: QuantTensor, up: QuantTensor) -> torch.Tensor:
    if gate.qtype != up.qtype or gate.qtype not in KERNEL_TYPES or (lib := _kernel_lib(x, gate, up)) is None:
        xf = x.float()
        return (F.silu(_kernels.linear(xf, gate)) * _kernels.linear(xf, up)).to(x.dtype)
    xr = _rows(x)
    p, h = _product(xr, gate, up)
    _run(lib, [p])
    return h.view(*x.shape[:-1], h.shape[-1]).to(x.dtype)


def experts_swiglu(segments: list[tuple[torch.Tensor, QuantTensor, QuantTensor, QuantTensor]]) -> list[torch.Tensor]:
    """For experts (x [M, H], gate [I, H], up [I, H], down [H, I]): ``swiglu(x) @ down^T`` each, all
    experts in one kernel call (gate/up products, then the down products on their results)."""
    if not segments:
        return []
    ws = [w for _, g, u, d in segments for w in (g, u, d)]
    if (any(g.qtype != u.qtype for _, g, u, _ in segments) or not all(w.qtype in KERNEL_TYPES for w in ws)
            or (lib := _kernel_lib(segments[0][0], *ws)) is None):
        return [linear(swiglu(x, g, u), d) for x, g, u, d in segments]
    if len(segments) > MAX_PRODUCTS:
        return experts_swiglu(segments[:MAX_PRODUCTS]) + experts_swiglu(segments[MAX_PRODUCTS:])
    dtype = segments[0][0].dtype
    rows = {}  # experts of one token share its x: one float32 copy, quantized once in the kernel
    first, second, hs, outs = [], [], [], []  # the C code writes hs and outs: keep them alive
    for x, g, u, d in segments:
        xr = rows.get(id(x))
        if xr is None:
            xr = rows[id(x)] = _rows(x)
        p1, h = _product(xr, g, u)
        p2, y = _product(h, d)
        first.append(p1)
        second.append(p2)
        hs.append(h)
        outs.append(y)
    _run(lib, first, second)
    return [y.to(dtype) for y in outs]


def moe_token(x: torch.Tensor, gate: QuantTensor, up: QuantTensor, down: QuantTensor, experts: list[int],
              weights: torch.Tensor, extra: list[tuple[QuantTensor, QuantTensor, QuantTensor]]) -> torch.Tensor | None:
    """One token's MoE output [1, H] in one kernel call: ``sum_e weights[e] * expert_e(x)`` over
    ``experts`` of the stacked banks gate/up [E, I, H], down [E, H, I], in the order given, plus
    the ``extra`` experts' (gate, up, down) outputs unweighted (the shared experts): the bits of
    :func:`experts_swiglu` followed by the batched path's additions. None where the kernels do
    not apply. At one token the products take less time than building them one by one in
    Python, so the experts' matrices are addressed from the stacks directly."""
    if not (_kernels.enabled and x.is_cpu and x.dtype is torch.float32 and not torch.is_grad_enabled()):
        return None
    mats = [gate, up, down, *(w for ws in extra for w in ws)]
    if (gate.qtype != up.qtype or any(g.qtype != u.qtype for g, u, _ in extra)
            or not all(w.qtype in KERNEL_TYPES and w.data.is_cpu and w.data.is_contiguous() for w in mats)
            or len(experts) + len(extra) > MAX_PRODUCTS or (lib := _kernels.load()) is None):
        return None
    hidden, inter = x.shape[-1], gate.shape[1]
    if gate.shape[2] != hidden or down.shape[1] != hidden or any(g.shape[1] != hidden or d.shape[0] != hidden
                                                                 for g, _, d in extra):
        return None
    xr = x.reshape(1, hidden).contiguous()
    count = len(experts) + len(extra)
    widths = [inter] * len(experts) + [g.shape[0] for g, _, _ in extra]
    h = torch.empty(sum(widths))
    ys = torch.empty(count, hidden)
    out = torch.empty(1, hidden)
    first, second = (Product * count)(), (Product * count)()
    gq, dq = int(gate.qtype), int(down.qtype)
    g0, u0, d0 = gate.data.data_ptr(), up.data.data_ptr(), down.data.data_ptr()
    gs, ds = gate.data.stride(0), down.data.stride(0)  # bytes per expert (uint8 data)
    hp, yp, xp, at = h.data_ptr(), ys.data_ptr(), xr.data_ptr(), 0
    for i, e in enumerate(experts):
        first[i] = Product(xp, 1, g0 + e * gs, u0 + e * gs, gq, 1, inter, hidden, hp + 4 * at)
        second[i] = Product(hp + 4 * at, 1, d0 + e * ds, 0, dq, 0, hidden, inter, yp + 4 * hidden * i)
        at += inter
    for j, (g, u, d) in enumerate(extra):
        i, n = len(experts) + j, g.shape[0]
        first[i] = Product(xp, 1, g.data.data_ptr(), u.data.data_ptr(), int(g.qtype), 1, n, hidden, hp + 4 * at)
        second[i] = Product(hp + 4 * at, 1, d.data.data_ptr(), 0, int(d.qtype), 0, hidden, n, yp + 4 * hidden * i)
        at += n
    w = weights.to(torch.float32).contiguous()
    if w.numel() != len(experts):
        raise ValueError(f"{len(experts)} experts but {w.numel()} weights")
    rc = lib.megrez_q_moe_token(count, first, second, len(experts), w.data_ptr(), hidden, out.data_ptr())
    if rc != 0:
        raise RuntimeError(f"megrez_q_moe_token failed ({rc}): invalid product shapes or out of memory")
    return out


# ------------------------------------------------------------------ quantizing weights

_quantizer_announced = False


def quantizer():
    """The library whose ``megrez_quantize`` (quantize.c) quantizes weights, or None (no C
    compiler, ``MEGREZ_CPU_KERNELS=0``): then :func:`megrez.quant.formats.quantize` runs its
    Python code, which gives the same bytes, slower; said once on stderr."""
    global _quantizer_announced
    lib = _kernels.load()
    if lib is None and not _quantizer_announced:
        _quantizer_announced = True
        print(f"megrez: C quantizer unavailable ({_kernels.reason}); quantizing in Python instead (same bytes, "
              "about 20x slower)", file=sys.stderr)
    return lib


def quantize_rows(lib, rows: torch.Tensor, qtype: QType, out: torch.Tensor) -> None:
    """float32 rows [n, K] (contiguous) -> ``out`` uint8 [n, row bytes] in place, by quantize.c."""
    n, k = rows.shape
    if not (rows.dtype == torch.float32 and rows.is_contiguous() and out.dtype == torch.uint8
            and out.is_contiguous() and out.shape[0] == n):
        raise ValueError("quantize_rows needs contiguous float32 rows and a contiguous uint8 output of as many rows")
    if lib.megrez_quantize(int(qtype), rows.data_ptr(), n, k, out.data_ptr()) != 0:
        raise ValueError(f"cannot quantize rows of {k} weights to {QType(qtype).name}")


# ------------------------------------------------------------------ for tests and benchmarks

def reference(lib, x: torch.Tensor, w1: QuantTensor, w2: QuantTensor | None = None) -> torch.Tensor:
    """The scalar reference implementation of one product (float32 x [M, K])."""
    xr = _rows(x)
    p, y = _product(xr, w1, w2)
    if lib.megrez_q_reference(ctypes.byref(p)) != 0:
        raise RuntimeError("megrez_q_reference: invalid product")
    return y


def quantize_activations(lib, x: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' 8-bit activations of float32 x [M, K] for weights of ``qtype``: (q int8 [M, K],
    scales float32 [M, K / block], sums of 16 int16 [M, K / 16])."""
    xr = _rows(x)
    m, k = xr.shape
    block = 32 if qtype in (QType.Q8_0, QType.Q4_0, QType.Q5_0) else 256
    q = torch.empty(m, k, dtype=torch.int8)
    d = torch.empty(m, k // block)
    s = torch.empty(m, k // 16, dtype=torch.int16)
    if lib.megrez_q_quantize_rows(int(qtype), xr.data_ptr(), m, k, q.data_ptr(), d.data_ptr(), s.data_ptr()) != 0:
        raise ValueError(f"{QType(qtype).name} activations need a multiple of {block} columns, got {k}")
    return q, d, s


def dequantize(lib, w: QuantTensor) -> torch.Tensor:
    """float32 [N, K] weights through the C dequantization (ggml's operations, rows in parallel)."""
    k = w.shape[-1]
    rows = w.data.numel() // w.data.shape[-1]
    out = torch.empty(*w.shape)
    if lib.megrez_q_dequantize(int(w.qtype), w.data.data_ptr(), rows, k, out.data_ptr()) != 0:
        raise ValueError(f"cannot dequantize {w.qtype.name} rows of {k}")
    return out
