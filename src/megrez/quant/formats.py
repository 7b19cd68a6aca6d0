"""ggml block formats, byte-identical to GGUF's, so a tensor is used where it lies in a file.

A quantized weight [N, K] is N rows of ``K // block`` blocks each; one row is
``row_bytes(qtype, K)`` bytes. :class:`QuantTensor` holds those bytes as a uint8 tensor
[..., N, row_bytes] (leading dims: stacked experts) together with its type and logical shape.

    Q8_0  32 int8 + fp16 scale                                  34 bytes / 32 weights
    Q4_0  32 4-bit + fp16 scale (x = (q - 8) * d)               18 bytes / 32 weights
    Q5_0  fp16 scale, 4 bytes of 5th bits, 16 bytes of 4-bit     22 bytes / 32 weights
          (llama.cpp's stand-in for Q4_K where rows are not whole super-blocks)
    Q4_K  256: fp16 d, dmin, 12 bytes of 6-bit scales/mins,
          128 bytes of 4-bit values                           144 bytes / 256 weights
    Q6_K  256: 128 bytes low 4 bits, 64 bytes high 2 bits,
          16 int8 scales, fp16 d                               210 bytes / 256 weights

This module imports nothing else from megrez at import time: the kernels and the models build on
it (:func:`quantize` calls the C quantizer of ``megrez.kernels`` when it runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch


class QType(IntEnum):
    """ggml's type ids (``GGMLQuantizationType``), as stored in GGUF tensor infos."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q5_0 = 6
    Q8_0 = 8
    Q4_K = 12
    Q6_K = 14
    BF16 = 30


# qtype -> (weights per block, bytes per block)
BLOCK_SIZES: dict[QType, tuple[int, int]] = {
    QType.F32: (1, 4), QType.F16: (1, 2), QType.BF16: (1, 2),
    QType.Q8_0: (32, 34), QType.Q4_0: (32, 18), QType.Q5_0: (32, 22), QType.Q4_K: (256, 144), QType.Q6_K: (256, 210),
}


# The unquantized types and the torch dtypes their bytes are.
FLOAT_QTYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}


def row_bytes(qtype: QType, k: int) -> int:
    """Bytes of one row of ``k`` weights; ``k`` must be a multiple of the block size."""
    block, nbytes = BLOCK_SIZES[QType(qtype)]
    if k % block:
        raise ValueError(f"{QType(qtype).name} rows need a multiple of {block} weights, got {k}")
    return k // block * nbytes


@dataclass
class QuantTensor:
    """Quantized weights: ``data`` uint8 [..., N, row_bytes] (contiguous), logical ``shape``
    (..., N, K). Indexing the first dimension gives one stacked matrix (an expert)."""
    data: torch.Tensor
    qtype: QType
    shape: tuple[int, ...]

    def __post_init__(self):
        self.qtype = QType(self.qtype)
        self.shape = tuple(int(s) for s in self.shape)
        want = (*self.shape[:-1], row_bytes(self.qtype, self.shape[-1]))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want:
            raise ValueError(f"{self.qtype.name} data for shape {self.shape} must be uint8 {list(want)}, "
                             f"got {self.data.dtype} {list(self.data.shape)}")

    def __getitem__(self, i: int) -> "QuantTensor":
        if not isinstance(i, int) or isinstance(i, bool):
            return QuantTensor(self.data[i], self.qtype, self.shape[1:])
        # One matrix of a validated stack is valid: skip the checks (this runs for every routed
        # expert of every decode step).
        view = object.__new__(QuantTensor)
        view.data, view.qtype, view.shape = self.data[i], self.qtype, self.shape[1:]
        return view

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def is_contiguous(self) -> bool:
        return self.data.is_contiguous()

    def dequantize(self) -> torch.Tensor:
        """float32 weights of ``shape``."""
        return dequantize(self)


# ------------------------------------------------------------------------------ dequantize

def dequantize(qt: QuantTensor) -> torch.Tensor:
    """float32 [*shape], bit for bit what ggml's reference dequantization gives (the same float32
    operations in the same order as the ``gguf`` package's reference code)."""
    qtype, shape = qt.qtype, qt.shape
    data = qt.data.contiguous()
    if qtype == QType.F32:
        return data.view(torch.float32).reshape(shape).clone()
    if qtype == QType.F16:
        return _half_to_float(data.view(torch.int16)).reshape(shape)
    if qtype == QType.BF16:
        return data.view(torch.bfloat16).float().reshape(shape)
    block, nbytes = BLOCK_SIZES[qtype]
    blocks = data.reshape(-1, nbytes)
    out = _DEQUANTIZE[qtype](blocks)
    return out.reshape(shape)


def _half_to_float(half: torch.Tensor) -> torch.Tensor:
    """fp16 bits (int16) -> float32. torch makes a NaN quiet; ggml (and numpy) keep its payload,
    which then propagates through the products: keep it too."""
    out = half.view(torch.float16).float()
    h = half.to(torch.int32) & 0xFFFF
    nan_bits = ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x3FF) << 13)
    return torch.where(out.isnan(), nan_bits.view(torch.float32), out)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """fp16 stored in 2 bytes (little endian) of each row -> float32 [n, 1]."""
    return _half_to_float(b.contiguous().view(torch.int16))


def _dequantize_q8_0(blocks):
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks[:, :2])


def _dequantize_q4_0(blocks):
    qs = blocks[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.int8) - 8
    return _f16(blocks[:, :2]) * q.float()


def _dequantize_q5_0(blocks):
    qh = blocks[:, 2:6].to(torch.int64)
    high = (qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24))[:, None] >> torch.arange(32)
    qs = blocks[:, 6:]
    low = torch.cat([qs & 0x0F, qs >> 4], dim=1)
    q = (low | ((high & 1).to(torch.uint8) << 4)).to(torch.int8) - 16
    return _f16(blocks[:, :2]) * q.float()


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 6-bit scales and mins packed in Q4_K's 12 bytes -> two uint8 [n, 8]."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _dequantize_q4_k(blocks):
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    d = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, 256)


def _dequantize_q6_k(blocks):
    n = blocks.shape[0]
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(blocks[:, 208:210]) * scales).reshape(n, 16, 1)
    ql = ql.reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    qh = qh.reshape(n, 2, 1, 32)
    qh = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, 256)


_DEQUANTIZE = {QType.Q8_0: _dequantize_q8_0, QType.Q4_0: _dequantize_q4_0, QType.Q5_0: _dequantize_q5_0, QType.Q4_K: _dequantize_q4_k,
               QType.Q6_K: _dequantize_q6_k}


# ------------------------------------------------------------------------------ quantize

CHUNK_WEIGHTS = 1 << 18  # the Python quantizers take rows this many weights at a time (temporaries stay in cache)
C_CHUNK_WEIGHTS = 1 << 22  # the C quantizer: float32 copies of this size at most (inputs of other dtypes)


def quantize(weight: torch.Tensor, qtype: QType, reference: bool = False) -> QuantTensor:
    """Quantize float weights [..., N, K] row by row into ``qtype`` blocks, as ggml's reference
    quantizers do (Q8_0, Q4_0 and Q5_0 bit for bit as the ``gguf`` package; Q4_K and Q6_K by the
    algorithms of ggml's ``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref``, bit for bit as
    llama.cpp). The block types go through the C quantizer (``megrez/kernels/quantize.c``, the
    same bytes) where the kernels are available, else (or with ``reference=True``) through the
    Python code below."""
    qtype = QType(qtype)
    if weight.dim() < 1:
        raise ValueError("quantize needs at least one dimension")
    shape = tuple(weight.shape)
    k = shape[-1]
    nbytes = row_bytes(qtype, k)  # refuses a K that is not a multiple of the block size
    w = weight.detach()
    if w.device.type != "cpu":
        w = w.cpu()
    if qtype == QType.F32:
        data = w.to(torch.float32).contiguous().view(torch.uint8)
        return QuantTensor(data.clone() if data.data_ptr() == weight.data_ptr() else data, qtype, shape)
    if qtype == QType.F16:
        return QuantTensor(w.to(torch.float16).contiguous().view(torch.uint8), qtype, shape)
    if qtype == QType.BF16:
        return QuantTensor(_to_bf16(w.to(torch.float32).contiguous()).view(torch.uint8), qtype, shape)
    rows = w.reshape(-1, k)
    out = torch.empty(rows.shape[0], nbytes, dtype=torch.uint8)
    quantize_rows(rows, qtype, out, reference)
    return QuantTensor(out.reshape(*shape[:-1], nbytes), qtype, shape)


def quantize_rows(rows: torch.Tensor, qtype: QType, out: torch.Tensor, reference: bool = False) -> None:
    """Float rows [n, K] (any float dtype) -> ``out`` uint8 [n, row_bytes(qtype, K)] in place, for
    the block types; see :func:`quantize`."""
    qtype = QType(qtype)
    n, k = rows.shape
    nbytes = row_bytes(qtype, k)
    if qtype not in _QUANTIZE:
        raise ValueError(f"{qtype.name} is not a block type")
    if tuple(out.shape) != (n, nbytes) or out.dtype != torch.uint8:
        raise ValueError(f"{qtype.name} rows [{n}, {k}] need a uint8 output [{n}, {nbytes}], got "
                         f"{out.dtype} {list(out.shape)}")
    lib = None
    if not reference:
        from ..kernels import quantized as kq  # the kernels build on this module: imported when used

        lib = kq.quantizer()
    if lib is not None:
        # float32 rows are read where they lie; others are converted a chunk at a time
        step = max(n, 1) if rows.dtype == torch.float32 and rows.is_contiguous() else max(1, C_CHUNK_WEIGHTS // k)
        for start in range(0, n, step):
            chunk = rows[start:start + step].to(torch.float32).contiguous()
            kq.quantize_rows(lib, chunk, qtype, out[start:start + step])
        return
    step = max(1, CHUNK_WEIGHTS // k)
    block = BLOCK_SIZES[qtype][0]
    fn = _QUANTIZE[qtype]
    for start in range(0, n, step):
        chunk = rows[start:start + step].to(torch.float32).reshape(-1, block)
        out[start:start + step] = fn(chunk).reshape(-1, nbytes)


def _to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 bits as ggml rounds (nearest even; NaN made quiet keeping its top bits)."""
    n = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.to(torch.int32).to(torch.int16).view(torch.bfloat16)


def _half_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> fp16 bytes [n, 2] (round to nearest even, as ggml and numpy)."""
    return d.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), in the float32 steps the gguf package uses."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _quantize_q8_0(blocks):
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = _roundf(blocks * inv).to(torch.int8).view(torch.uint8)
    return torch.cat([_half_bytes(d), qs], dim=1)


def _signed_scale(blocks, levels: int):
    """Q4_0/Q5_0 scale: the weight of largest magnitude (sign kept, first one on ties) maps to
    -``levels``. Returns (d [n, 1], 1/d or 0)."""
    imax = blocks.abs().argmax(dim=1, keepdim=True)
    d = blocks.gather(1, imax) / -levels
    return d, torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _quantize_q4_0(blocks):
    d, inv = _signed_scale(blocks, 8)
    q = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat([_half_bytes(d), qs], dim=1)


def _quantize_q5_0(blocks):
    d, inv = _signed_scale(blocks, 16)
    q = torch.trunc(blocks * inv + 16.5).clamp(0, 31).to(torch.uint8)
    qs = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)
    bits = (q >> 4).to(torch.int64) << torch.arange(32)
    word = bits.sum(dim=1)
    qh = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16, 24)], dim=1).to(torch.uint8)
    return torch.cat([_half_bytes(d), qh, qs], dim=1)


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum [n, S] over n in index order, in float32: the rounding of a C loop ``s += t[i]``."""
    s = t[0].clone()
    for i in range(1, t.shape[0]):
        s += t[i]
    return s


def _over(c: float, t: torch.Tensor) -> torch.Tensor:
    """The float32 quotient ``c / t`` (torch computes ``scalar / tensor`` as ``scalar * (1 / t)``,
    which rounds twice)."""
    return torch.full_like(t, c) / t


def _f32(v: float) -> float:
    """A constant rounded to float32, as C computes it."""
    return float(np.float32(v))


def _make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants on S sub-blocks at once. x, w: [n, S] (weights of sub-block s in
    column s). Returns (L uint8 [n, S], scale [S], the_min [S]): x ~ scale * L - the_min, the
    min and scale chosen by weighted least squares over a search of grids. As in ggml, each
    grid is laid from the best min found so far."""
    xmin = first_min = x.amin(dim=0).clamp(max=0)
    xmax = x.amax(dim=0)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = xmax == xmin
    one = torch.ones_like(xmax)
    iscale = _over(nmax, torch.where(flat, one, xmax - xmin))
    scale = 1 / iscale
    L = (x - xmin).mul_(iscale).round_().clamp_(0, nmax)
    diff = (L * scale).add_(xmin).sub_(x)
    best = _seqsum(diff.mul_(diff).mul_(w))
    for step in range(nstep + 1):
        grid = _f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * step)) + nmax)
        span = xmax - xmin
        iscale = _over(grid, torch.where(span == 0, one, span))
        laux = (x - xmin).mul_(iscale).round_().clamp_(0, nmax)
        wl = w * laux
        sum_l, sum_l2 = _seqsum(wl), _seqsum(wl * laux)
        sum_xl = _seqsum(wl.mul_(x))
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Dsafe = torch.where(ok, D, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Dsafe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Dsafe
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(pos, sum_l2, one), this_scale)
        diff = (laux * this_scale).add_(this_min).sub_(x)
        err = _seqsum(diff.mul_(diff).mul_(w))
        better = ok & (err < best)
        L = torch.where(better, laux, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        xmin = torch.where(better, this_min, xmin)
    L = torch.where(flat, 0.0, L)
    scale = torch.where(flat, 0.0, scale)
    return L.to(torch.uint8), scale, -torch.where(flat, first_min, xmin)


def _nearest_uint8(v: torch.Tensor) -> torch.Tensor:
    """``uint8_t l = nearest_int(v)``: round half to even, then wrap to 8 bits as C's conversion does."""
    return torch.round(v).to(torch.int64) & 0xFF


def _quantize_q4_k(blocks):
    nb = blocks.shape[0]
    x = blocks.reshape(nb * 8, 32).t().contiguous()               # [32, S]: sub-blocks in columns
    av = (_seqsum(x * x) / 32).double().sqrt().float()  # torch's float32 sqrt is not always correctly rounded
    w = av + x.abs()
    L, scales, mins = _make_qkx2_quants(x, w, 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    # ggml starts from +0 and takes only larger values: an all-zero block keeps +0, never -0
    max_scale = scales.amax(dim=1, keepdim=True)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)
    max_min = mins.amax(dim=1, keepdim=True)
    max_min = torch.where(max_min > 0, max_min, 0.0)
    inv_scale = torch.where(max_scale > 0, _over(63, torch.where(max_scale > 0, max_scale, 1)), 0)
    inv_min = torch.where(max_min > 0, _over(63, torch.where(max_min > 0, max_min, 1)), 0)
    ls = _nearest_uint8(inv_scale * scales).clamp(max=63)
    lm = _nearest_uint8(inv_min * mins).clamp(max=63)
    packed = torch.zeros(nb, 12, dtype=torch.int64)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d_half, dmin_half = (max_scale / 63).reshape(-1), (max_min / 63).reshape(-1)
    d_bytes, dmin_bytes = _half_bytes(d_half), _half_bytes(dmin_half)
    d = d_half.to(torch.float16).float()[:, None] * ls.float()             # [nb, 8]
    dm = dmin_half.to(torch.float16).float()[:, None] * lm.float()
    xs = blocks.reshape(nb, 8, 32)
    q = torch.round((xs + dm[..., None]) / torch.where(d == 0, 1, d)[..., None]).clamp(0, 15)
    keep = L.t().reshape(nb, 8, 32).float()                 # where d == 0, ggml keeps the search's L
    q = torch.where((d == 0)[..., None], keep, q).to(torch.uint8).reshape(nb, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    return torch.cat([d_bytes, dmin_bytes, packed.to(torch.uint8), qs], dim=1)


def _make_qx_quants(x, nmax: int):
    """ggml's make_qx_quants with rmse_type 1 (weights x^2) on S sub-blocks at once. x: [n, S].
    Returns (L [n, S] in 0..2*nmax-1, scale [S]): x ~ scale * (L - nmax)."""
    ax = x.abs()
    amax, where = ax.max(dim=0)                     # first index of the largest |x|, as the C loop
    xmax = x.gather(0, where[None])[0]
    tiny = amax < GROUP_MAX_EPS
    xmax_safe = torch.where(tiny, torch.ones_like(xmax), xmax)
    w = x * x

    def grid(iscale):
        l = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        return l, _seqsum(w * x * l), _seqsum(w * l * l)

    iscale = _over(-nmax, xmax_safe)
    l, sumlx, suml2 = grid(iscale)
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1), 0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = _over(-_f32(nmax + _f32(_f32(0.1) * step)), xmax_safe)
        l, sumlx, suml2 = grid(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, l + nmax, L)
        scale = torch.where(better, sumlx / torch.where(better, suml2, 1), scale)
        best = torch.where(better, scale * sumlx, best)
    L = torch.where(tiny, torch.zeros_like(L), L)
    scale = torch.where(tiny, torch.zeros_like(scale), scale)
    return L, scale


GROUP_MAX_EPS = 1e-15


def _quantize_q6_k(blocks):
    nb = blocks.shape[0]
    x = blocks.reshape(nb * 16, 16).t().contiguous()              # [16, S]
    L, scales = _make_qx_quants(x, 32)
    scales = scales.reshape(nb, 16)
    abs_scales = scales.abs()
    max_abs, where = abs_scales.max(dim=1)
    max_scale = scales.gather(1, where[:, None])[:, 0]
    zero = max_abs < GROUP_MAX_EPS
    iscale = _over(-128, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d_half = torch.where(zero, torch.zeros_like(iscale), 1 / iscale)
    sc = torch.round(iscale[:, None] * scales).clamp(max=127)
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc).to(torch.int8)
    d = d_half.to(torch.float16).float()[:, None] * sc.float()             # [nb, 16]
    xs = blocks.reshape(nb, 16, 16)
    q = torch.round(xs / torch.where(d == 0, 1, d)[..., None]).clamp(-32, 31) + 32
    keep = L.t().reshape(nb, 16, 16)                        # where d == 0, ggml keeps the search's L
    q = torch.where((d == 0)[..., None], keep, q)
    q = torch.where(zero[:, None, None], torch.zeros_like(q), q).to(torch.uint8).reshape(nb, 2, 4, 32)
    ql = torch.cat([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4), q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)],
                   dim=2).reshape(nb, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return torch.cat([ql, qh.reshape(nb, 64), sc.view(torch.uint8), _half_bytes(d_half)], dim=1)


_QUANTIZE = {QType.Q8_0: _quantize_q8_0, QType.Q4_0: _quantize_q4_0, QType.Q5_0: _quantize_q5_0, QType.Q4_K: _quantize_q4_k,
             QType.Q6_K: _quantize_q6_k}
