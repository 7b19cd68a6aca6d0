"""CPU kernels for decoding: ``x @ W^T`` (and the fused SwiGLU gate/up product) with float32
or bfloat16 weights when ``x`` has at most 8 rows, and products with quantized weights
(:class:`megrez.quant.QuantTensor`, ggml's block formats) at any number of rows. Decoding is
memory-bound, and BLAS libraries handle these shapes poorly on many CPUs (MKL reaches about half
the memory bandwidth on AMD machines); the C files beside this module stream each weight row
once for all rows of ``x``.

The C files are compiled once per machine and instruction-set variant with the system C
compiler (a few seconds) into ``~/.cache/megrez/kernels`` and loaded with ctypes; the variant is
chosen from the CPU's features at load (``build.py``). Without a compiler, or with
``MEGREZ_CPU_KERNELS=0``, :func:`linear` and :func:`swiglu` use torch (the results differ only
in floating-point summation order) and quantized products dequantize and use torch (slower,
said once on stderr). Float products accumulate in float32 and are rounded to the input's
dtype at the end, as torch's do. Only inference uses the kernels (no autograd).
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch
import torch.nn.functional as F

from ..quant.formats import QuantTensor
from . import build

MAX_ROWS = 8

_lib = None
_state = "untried"  # untried | loaded | unavailable
reason = ""
variant = ""     # the instruction-set variant loaded (build.VARIANTS)
enabled = True  # switched off to measure torch's own path (benchmarks)


def load():
    """The compiled library, compiling it on first use; None when unavailable."""
    global _lib, _state, reason, variant
    if _state != "untried":
        return _lib
    _state = "unavailable"
    if os.environ.get("MEGREZ_CPU_KERNELS", "1") == "0":
        reason = "disabled by MEGREZ_CPU_KERNELS=0"
        return None
    try:
        variant, lib = build.choose()
    except build.BuildError as e:
        reason = str(e)
        if build.compiler() is not None:  # a broken toolchain is worth saying; a missing one is said by the users
            print(f"megrez: CPU kernels unavailable ({reason}); using torch", file=sys.stderr)
        return None
    _check_wait_us()
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    if lib_has_float_kernels(lib):
        lib.megrez_grouped.argtypes = [c_int, c_int, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64]
        lib.megrez_linear.argtypes = [c_int, ptr, ptr, ptr, i64, i64, i64]
        lib.megrez_swiglu.argtypes = [c_int, ptr, ptr, ptr, ptr, i64, i64, i64]
        lib.megrez_grouped.restype = lib.megrez_linear.restype = lib.megrez_swiglu.restype = ctypes.c_int
    quantized.declare(lib)
    decode_ops.declare(lib)
    routing.declare(lib)
    moe_step.declare(lib)
    lib.megrez_read_probe.argtypes = [ptr, i64, c_int, c_int]
    lib.megrez_read_probe.restype = ctypes.c_float
    _lib, _state = lib, "loaded"
    return lib


def _check_wait_us() -> None:
    """MEGREZ_WAIT_US (how long idle kernel workers wait before sleeping, pool.c) must be a whole
    number of microseconds, 0 to 10,000,000; pool.c ignores anything else, and this says so."""
    raw = os.environ.get("MEGREZ_WAIT_US", "")
    if raw and not (raw.isdigit() and int(raw) <= 10_000_000):
        print(f"megrez: ignoring MEGREZ_WAIT_US={raw!r}: expected a whole number of microseconds from 0 to "
              "10000000; idle kernel threads wait the default (500, or 0 with OMP_WAIT_POLICY=passive)", file=sys.stderr)


def lib_has_float_kernels(lib) -> bool:
    return hasattr(lib, "megrez_linear")


def _float_lib():
    lib = load()
    return lib if lib is not None and lib_has_float_kernels(lib) else None


WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1}


def _eligible(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    if not enabled or x.device.type != "cpu" or x.dtype not in WEIGHT_TYPES or x.numel() > MAX_ROWS * x.shape[-1]:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    dtype = weights[0].dtype
    return dtype in WEIGHT_TYPES and all(w.dtype == dtype and w.is_contiguous() and w.device.type == "cpu"
                                         for w in weights)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous float32 rows (activations are few: converting them costs nothing)."""
    return x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()


def _run(lib, swiglu: bool, items: list[tuple]) -> list[torch.Tensor]:
    """One kernel call over items (x [M, K] float32 contiguous, w1 [N, K], w2 [N, K] or None);
    float32 results."""
    if len(items) > 64:  # the kernel's bound on products per call
        return _run(lib, swiglu, items[:64]) + _run(lib, swiglu, items[64:])
    widths = {w1.shape[1] for _, w1, _ in items}
    if len(widths) > 1:  # one call shares K: one call per K (e.g. routed and shared experts' down)
        outs = {}
        for width in widths:
            idx = [i for i, (_, w1, _) in enumerate(items) if w1.shape[1] == width]
            outs.update(zip(idx, _run(lib, swiglu, [items[i] for i in idx])))
        return [outs[i] for i in range(len(items))]
    g = len(items)
    k = items[0][1].shape[1]
    outs = [torch.empty(x.shape[0], w1.shape[0], dtype=torch.float32) for x, w1, _ in items]
    ptrs = ctypes.c_void_p * g
    lengths = ctypes.c_int64 * g
    rc = lib.megrez_grouped(int(swiglu), WEIGHT_TYPES[items[0][1].dtype], g,
                            ptrs(*(x.data_ptr() for x, _, _ in items)),
                            ptrs(*(w1.data_ptr() for _, w1, _ in items)),
                            ptrs(*((w2 if w2 is not None else w1).data_ptr() for _, w1, w2 in items)),
                            ptrs(*(o.data_ptr() for o in outs)), lengths(*(x.shape[0] for x, _, _ in items)),
                            lengths(*(w1.shape[0] for _, w1, _ in items)), k)
    if rc != 0:
        raise RuntimeError("megrez_grouped: invalid arguments")
    return outs


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through the decode kernel where it applies."""
    if isinstance(weight, QuantTensor):
        return quantized.linear(x, weight, bias)
    if not _eligible(x, weight) or (lib := _float_lib()) is None:
        return F.linear(x, weight, bias)
    n, k = weight.shape
    xc = _rows(x)
    y = torch.empty(xc.shape[0], n)
    lib.megrez_linear(WEIGHT_TYPES[weight.dtype], xc.data_ptr(), weight.data_ptr(), y.data_ptr(), xc.shape[0], n, k)
    y = y.view(*x.shape[:-1], n).to(x.dtype)
    return y + bias if bias is not None else y


def linear_many(x: torch.Tensor, weights: list[torch.Tensor], biases: list | None = None) -> list[torch.Tensor]:
    """``[F.linear(x, w, b) for w, b in ...]`` in one kernel call (e.g. Q, K and V)."""
    if isinstance(weights[0], QuantTensor):
        return quantized.linear_many(x, weights, biases)
    biases = biases or [None] * len(weights)
    if not _eligible(x, *weights) or (lib := _float_lib()) is None:
        return [F.linear(x, w, b) for w, b in zip(weights, biases)]
    xc = _rows(x)
    outs = [o.view(*x.shape[:-1], o.shape[-1]).to(x.dtype) for o in _run(lib, False, [(xc, w, None) for w in weights])]
    return [o + b if b is not None else o for o, b in zip(outs, biases)]


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(x @ gate^T) * (x @ up^T)``, fused in the decode kernel where it applies."""
    if isinstance(gate, QuantTensor):
        return quantized.swiglu(x, gate, up)
    if not _eligible(x, gate, up) or (lib := _float_lib()) is None:
        return F.silu(F.linear(x, gate)) * F.linear(x, up)
    n, k = gate.shape
    xc = _rows(x)
    h = torch.empty(xc.shape[0], n)
    lib.megrez_swiglu(WEIGHT_TYPES[gate.dtype], xc.data_ptr(), gate.data_ptr(), up.data_ptr(), h.data_ptr(),
                      xc.shape[0], n, k)
    return h.view(*x.shape[:-1], n).to(x.dtype)


def experts_swiglu(segments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]):
    """For experts (x [M, H], gate [I, H], up [I, H], down [H, I]): ``swiglu(x) @ down^T`` each,
    all experts in two kernel calls when every segment has at most 8 rows."""
    if segments and isinstance(segments[0][1], QuantTensor):
        return quantized.experts_swiglu(segments)
    if segments and all(_eligible(x, g, u, d) for x, g, u, d in segments) and (lib := _float_lib()) is not None:
        dtype = segments[0][0].dtype
        hs = _run(lib, True, [(_rows(x), g, u) for x, g, u, _ in segments])
        # The intermediate is rounded to the compute dtype between the two products, as in torch.
        hs = [h.to(dtype).to(torch.float32) for h in hs]
        return [y.to(dtype) for y in _run(lib, False, [(h, d, None) for h, (_, _, _, d) in zip(hs, segments)])]
    return [F.linear(swiglu(x, g, u), d) for x, g, u, d in segments]


from . import decode_ops, moe_step, quantized, routing  # noqa: E402  (they read this module's state at call time)
