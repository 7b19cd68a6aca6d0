"""ggml block formats: dequantization equals the gguf package's reference bit for bit; Q8_0/Q4_0
(and F16/BF16) quantization equal its reference quantizer; the K-quant quantizers keep every
weight within the error their format allows (and, where llama.cpp is installed, equal it)."""
import numpy as np
import pytest
import torch

from megrez.quant import formats as F
from megrez.quant.formats import BLOCK_SIZES, QType, QuantTensor, dequantize, quantize, row_bytes

gguf = pytest.importorskip("gguf")

ALL = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.Q4_K, QType.Q6_K]


def reference_dequantize(data: torch.Tensor, qtype: QType, shape) -> torch.Tensor:
    out = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType(int(qtype)))
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(shape)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_dequantize_equals_gguf_bit_for_bit(qtype):
    # Random bytes cover every bit pattern a file may hold: NaN and infinite scales included.
    g = torch.Generator().manual_seed(int(qtype))
    shape = (3, 5, 512)  # stacked (experts) as well as plain matrices
    data = torch.randint(0, 256, (*shape[:-1], row_bytes(qtype, shape[-1])), dtype=torch.uint8, generator=g)
    ours = dequantize(QuantTensor(data, qtype, shape))
    ref = reference_dequantize(data, qtype, shape)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
    # Indexing a stack gives the same weights as dequantizing the whole.
    assert torch.equal(QuantTensor(data, qtype, shape)[2].dequantize().view(torch.int32), ref[2].view(torch.int32))


def awkward_weights(rows: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian rows with the cases quantizers get wrong: zero blocks, constant blocks, ties of
    +max and -max, one huge outlier, tiny values, rounding midpoints."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, rows)[:, None]
    w[0, :64] = 0
    w[1, :64] = 0.25
    w[2, :32] = torch.tensor([1.0, -1.0] * 16)
    w[3, 7] = 1e4
    w[4] = w[4] * 1e-6
    w[5, :32] = torch.arange(32) / 2 - 8  # halves: where round-half rules differ
    return w


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.F16, QType.BF16], ids=lambda q: q.name)
def test_quantize_equals_gguf_reference(qtype):
    w = awkward_weights(24, 768, seed=3)
    ours = quantize(w, qtype)
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(int(qtype)))
    ref = torch.from_numpy(np.ascontiguousarray(ref)).view(torch.uint8).reshape(ours.data.shape)
    assert torch.equal(ours.data, ref)
    assert ours.shape == tuple(w.shape)


def test_quantize_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="Q4_K rows need a multiple of 256"):
        quantize(torch.zeros(4, 320), QType.Q4_K)
    with pytest.raises(ValueError, match="Q8_0 rows need a multiple of 32"):
        quantize(torch.zeros(4, 33), QType.Q8_0)


def k_quant_steps(qt: QuantTensor):
    """Per sub-block: (step d, offset m) so that a weight is d * q - m with integer q in its range,
    and (lo, hi) of that range."""
    nbytes = BLOCK_SIZES[qt.qtype][1]
    blocks = qt.data.reshape(-1, nbytes)
    if qt.qtype == QType.Q4_K:
        sc, mn = F._scale_min_k4(blocks[:, 4:16])
        return F._f16(blocks[:, 0:2]) * sc.float(), F._f16(blocks[:, 2:4]) * mn.float(), 32, (0, 15)
    sc = blocks[:, 192:208].contiguous().view(torch.int8).float()
    return F._f16(blocks[:, 208:210]) * sc, torch.zeros_like(sc), 16, (-32, 31)


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("dist", ["gauss", "uniform", "heavy", "positive", "mixed"])
def test_k_quants_stay_within_half_a_step(qtype, dist):
    """Every weight that lies inside its sub-block's grid is within half a step of it (rounding to
    the nearest level); weights outside are clamped to the end of the grid; all-zero blocks stay 0."""
    g = torch.Generator().manual_seed(7)
    shape = (8, 1024)
    w = {"gauss": lambda: torch.randn(shape, generator=g),
         "uniform": lambda: torch.rand(shape, generator=g) * 2 - 1,
         "heavy": lambda: torch.randn(shape, generator=g) / torch.rand(shape, generator=g).clamp(min=0.02),
         "positive": lambda: torch.rand(shape, generator=g) + 0.5,
         "mixed": lambda: torch.randn(shape, generator=g) * torch.logspace(-4, 1, 1024)}[dist]()
    w[0, :256] = 0
    qt = quantize(w, qtype)
    x_hat = dequantize(qt)
    d, m, sub, (lo, hi) = k_quant_steps(qt)
    d, m = d.reshape(-1, 1), m.reshape(-1, 1)
    x, err = w.reshape(-1, sub), (x_hat - w).reshape(-1, sub)
    pos = (x + m) / torch.where(d == 0, 1, d)  # Q6_K steps may be negative
    inside = (pos >= lo - 0.5) & (pos <= hi + 0.5) & (d != 0)
    slack = 1e-6 * (x.abs() + m.abs() + d.abs())  # float32 rounding of d * q - m
    assert (err.abs() <= d.abs() / 2 + slack)[inside].all()
    # Outside the grid: clamped to its nearest end.
    outside = ~inside & (d != 0)
    end = torch.where(pos > hi, d * hi - m, d * lo - m).expand_as(x)
    assert torch.allclose(x_hat.reshape(-1, sub)[outside], end[outside], rtol=1e-6, atol=0)
    assert inside.float().mean() > 0.95
    assert torch.equal(x_hat[0, :256], torch.zeros(256))


def test_more_bits_mean_less_error():
    w = torch.randn(32, 2048, generator=torch.Generator().manual_seed(0))

    def rel(qtype):
        return float((dequantize(quantize(w, qtype)) - w).norm() / w.norm())

    q4_0, q4_k, q6_k, q8_0 = (rel(q) for q in (QType.Q4_0, QType.Q4_K, QType.Q6_K, QType.Q8_0))
    assert q8_0 < q6_k < q4_k < q4_0 < 0.1
    # Uniform rounding error is step / sqrt(12); Q8_0's step is max|x| / 127 over 32 weights (~2.5 sigma).
    assert q8_0 < 2.5 / 127 / 12 ** 0.5 * 1.2


def _ggml():
    """llama.cpp's ggml library (from llama-cpp-python), or None."""
    try:
        import ctypes
        import pathlib

        import llama_cpp
    except ImportError:
        return None
    lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml.so"):
        path = lib_dir / name
        if path.exists():
            lib = ctypes.CDLL(str(path))
            if hasattr(lib, "ggml_quantize_chunk"):
                lib.ggml_quantize_chunk.restype = ctypes.c_size_t
                lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                return lib
    return None


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q6_K, QType.Q8_0, QType.Q4_0], ids=lambda q: q.name)
def test_quantize_equals_llama_cpp(qtype):
    lib = _ggml()
    if lib is None:
        pytest.skip("llama-cpp-python is not installed")
    w = awkward_weights(64, 2048, seed=11).contiguous()
    ours = quantize(w, qtype)
    out = torch.empty_like(ours.data)
    lib.ggml_quantize_chunk(int(qtype), w.data_ptr(), out.data_ptr(), 0, w.shape[0], w.shape[1], None)
    mismatched = (out != ours.data).any(dim=1).nonzero().flatten().tolist()
    assert not mismatched, f"rows {mismatched} differ from llama.cpp"
