"""The quantized CPU kernels (megrez/kernels/quantized.c) on ggml's block formats.

* Every SIMD variant this CPU runs returns the scalar reference's bits, for every format, row
  count and fused call (the C file fixes one summation order per output element).
* The scalar reference equals dequantize-then-matmul in float64 within a bound derived from
  the arithmetic: the rounding of the activations to 8 bits (at most half a quantization step
  per element, times |w|) plus float32 rounding of the block scales and sums (relative to the
  sum of |terms|).
* Batch invariance, grouped experts (one call = separate calls, bit for bit), the C
  dequantization against the gguf package's, and the reference path without the kernels.

Test weights: Q8_0/Q4_0 from the gguf package's reference quantizer; Q4_K/Q6_K as random
blocks (every bit pattern of the quants and 6-bit scales, sane fp16 scales), dequantized by the
gguf package.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rounding import U32, gamma, swiglu_bound

from megrez import kernels
from megrez.kernels import build
from megrez.kernels import quantized as kq
from megrez.quant.formats import QType, QuantTensor, row_bytes

gq = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

FORMATS = (QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.Q4_K, QType.Q6_K)
BLOCK = {QType.Q8_0: 32, QType.Q4_0: 32, QType.Q5_0: 32, QType.Q4_K: 256, QType.Q6_K: 256}  # weights per block
ACT_BLOCK = dict(BLOCK)  # activation scale block: the same


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return np.frombuffer(values.astype(np.float16).tobytes(), np.uint8).reshape(*values.shape, 2)


def random_weight(qtype: QType, n: int, k: int, seed: int) -> QuantTensor:
    rng = np.random.default_rng(seed)
    if qtype in (QType.Q8_0, QType.Q4_0, QType.Q5_0):
        w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
        data = gq.quantize(w, GGMLQuantizationType(int(qtype)))
    else:
        nb, size = k // 256, row_bytes(qtype, 256)
        data = rng.integers(0, 256, size=(n, nb, size), dtype=np.uint8)
        if qtype == QType.Q4_K:
            data[..., 0:2] = _fp16_bytes(np.abs(rng.normal(0, 2e-3, (n, nb))))  # d
            data[..., 2:4] = _fp16_bytes(np.abs(rng.normal(0, 2e-3, (n, nb))))  # dmin
        else:
            data[..., 208:210] = _fp16_bytes(rng.normal(0, 5e-4, (n, nb)))       # d
        data = data.reshape(n, nb * size)
    return QuantTensor(torch.from_numpy(np.ascontiguousarray(data)), qtype, (n, k))


def gguf_dequantize(w: QuantTensor) -> torch.Tensor:
    out = gq.dequantize(w.data.numpy(), GGMLQuantizationType(int(w.qtype)))
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(w.shape)


def term_magnitudes(w: QuantTensor) -> torch.Tensor:
    """Per weight, the magnitude M of what the kernel sums for it, |integer term| * scales, so
    that every float rounding in the kernel is bounded by u * sum(M * |x|): |w| for Q8_0,
    |d| (q + 8) for Q4_0 and |d| (q + 16) for Q5_0 (the offset is summed separately), |d sc q| + |dmin m| for Q4_K, and
    |d sc| (q + 32) for Q6_K. Derived from gguf dequantizations of edited blocks."""
    deq = gguf_dequantize(w).double()
    if w.qtype == QType.Q8_0:
        return deq.abs()
    blocks = w.data.numpy().reshape(w.shape[0], -1, row_bytes(w.qtype, BLOCK[w.qtype]))

    def deq_of(edit):
        b = blocks.copy()
        edit(b)
        return gguf_dequantize(QuantTensor(torch.from_numpy(b.reshape(w.data.shape)), w.qtype, w.shape)).double()

    if w.qtype in (QType.Q4_0, QType.Q5_0):
        d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)).abs()
        offset = 8 if w.qtype == QType.Q4_0 else 16
        return deq.abs() + 2 * offset * d.repeat_interleave(32, dim=1)  # |d (q - o)| + 2o |d| >= |d| (q + o)

    if w.qtype == QType.Q4_K:
        no_min = deq_of(lambda b: b.__setitem__((..., slice(2, 4)), 0))    # d sc q
        no_scale = deq_of(lambda b: b.__setitem__((..., slice(0, 2)), 0))  # -dmin m
        return no_min.abs() + no_scale.abs()

    def q_is_33(b):  # every 6-bit quant = 33 (low 4 bits 1, high 2 bits 2): the value is d sc
        b[..., :128] = 0x11
        b[..., 128:192] = 0xaa
    d_sc = deq_of(q_is_33).abs()
    return deq.abs() + 64 * d_sc  # |d sc (q - 32)| + 64 |d sc| >= |d sc| (q + 32)


def float_bound(w: QuantTensor, x_abs: torch.Tensor) -> torch.Tensor:
    """Bound on the kernel's float32 rounding, for activations of magnitude x_abs [M, K]: a
    chain of at most (blocks + 8) roundings per term (scale product, conversions, the running
    sums of the blocks, the final lane sums)."""
    n_blocks = w.shape[1] // BLOCK[w.qtype]
    return gamma(n_blocks + 8) * F.linear(x_abs.double(), term_magnitudes(w))


def half_steps(x: torch.Tensor, qtype: QType) -> torch.Tensor:
    """Per element, the most its 8-bit activation can differ from it: (1/2 + 256 u) of its
    block's step max|x| / 127 (the step and its inverse are rounded)."""
    xd = x.double()
    bs = ACT_BLOCK[qtype]
    step = xd.abs().view(xd.shape[0], -1, bs).amax(-1) / 127 * (1 + U32)
    return ((0.5 + 256 * U32) * step).repeat_interleave(bs, dim=1)


def product_bound(w: QuantTensor, x: torch.Tensor, x_err: torch.Tensor | float = 0.0):
    """(float64 dequantize-then-matmul of x, bound on the kernel's distance from it). ``x_err``
    bounds an error already in the x the kernel is given (a chained product)."""
    deq = gguf_dequantize(w).double()
    exact = F.linear(x.double(), deq)
    x_abs = x.double().abs() + x_err
    rounding = half_steps(x_abs, w.qtype)               # x_abs's block maxima bound the given x's
    bound = (F.linear(rounding + x_err, deq.abs())      # activations off by rounding (and x_err)
             + float_bound(w, x_abs + rounding)         # float32 rounding of the kernel's sums
             + U32 * F.linear(x_abs, deq.abs()))        # gguf's float32 dequantization rounds once
    return exact, bound


def assert_within(got, exact, bound, what):
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"{what}: error {err.max().item():.3e}, bound there {bound.flatten()[err.argmax()]:.3e}"


@pytest.fixture(scope="module")
def libs():
    """Every variant this CPU runs and the compiler builds, scalar first."""
    if os.environ.get("MEGREZ_CPU_KERNELS", "1") == "0" or build.compiler() is None:
        pytest.skip("no C compiler, or kernels disabled")
    out = {}
    for name in ["scalar"] + [v for v in build.runnable_variants() if v != "scalar"]:
        try:
            out[name] = build.load_variant(name)
        except build.BuildError as e:
            if name == "scalar":
                raise
            print(f"variant {name} not built here: {e}")
        else:
            kq.declare(out[name])
    return out


def run(lib, x, w1, w2=None):
    p, y = kq._product(x.contiguous(), w1, w2)
    kq._run(lib, [p])
    return y


SHAPES = [(1, 37, 512), (3, 64, 256), (8, 41, 768), (13, 50, 512)]  # (rows of x, N, K)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_scalar_reference_matches_float64_within_the_derived_bound(libs, qtype):
    for m, n, k in SHAPES:
        w = random_weight(qtype, n, k, seed=m + n)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m))
        x[0, :32] *= 50  # one block of large activations: the bound follows each block's step
        exact, bound = product_bound(w, x)
        assert_within(kq.reference(libs["scalar"], x, w), exact, bound, f"{qtype.name} {m}x{n}x{k}")


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_kernels_sum_the_8_bit_activations_exactly_but_for_float_rounding(libs, qtype):
    """Against float64 sums of the kernel's own 8-bit activations, only float32 rounding is
    left: a bound about 10^4 times tighter, which a wrong scale or nibble cannot meet."""
    m, n, k = 5, 33, 512
    w = random_weight(qtype, n, k, seed=1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    q, d, s = kq.quantize_activations(libs["scalar"], x, qtype)
    bs = ACT_BLOCK[qtype]
    assert q.abs().max() <= 127 and torch.equal(s.int(), q.view(m, -1, 16).int().sum(-1))
    xq = q.double() * d.double().repeat_interleave(bs, dim=1)  # the activations the kernel uses
    assert ((xq - x.double()).abs() <= half_steps(x, qtype)).all()
    assert (d == x.abs().view(m, -1, bs).amax(-1) / 127).all()
    exact = F.linear(xq, gguf_dequantize(w).double())
    bound = float_bound(w, xq.abs()) + U32 * F.linear(xq.abs(), gguf_dequantize(w).double().abs())
    for name, lib in libs.items():
        assert_within(run(lib, x, w), exact, bound, f"{name} {qtype.name}")


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_every_variant_returns_the_scalar_reference_bits(libs, qtype):
    # odd block counts; 35 blocks: two of the VNNI Q8_0 path's groups of 16, a pair and one more
    odd = [(2, 7, 32 * 9 if BLOCK[qtype] == 32 else 256 * 3), (3, 5, 32 * 35 if BLOCK[qtype] == 32 else 256 * 5)]
    for m, n, k in SHAPES + odd:
        w, u = random_weight(qtype, n, k, seed=n), random_weight(qtype, n, k, seed=n + 1)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        ref, ref_h = kq.reference(libs["scalar"], x, w), kq.reference(libs["scalar"], x, w, u)
        for name, lib in libs.items():
            assert torch.equal(run(lib, x, w), ref), f"{name} {qtype.name} linear {m}x{n}x{k}"
            assert torch.equal(run(lib, x, w, u), ref_h), f"{name} {qtype.name} swiglu {m}x{n}x{k}"


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_swiglu_matches_float64_within_the_derived_bound(libs, qtype):
    m, n, k = 4, 40, 512
    gate, up = random_weight(qtype, n, k, seed=3), random_weight(qtype, n, k, seed=4)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5))
    a, ea = product_bound(gate, x)
    b, eb = product_bound(up, x)
    got = run(libs["scalar"], x, gate, up)
    assert_within(got, F.silu(a) * b, swiglu_bound(a, b, ea, eb), f"{qtype.name} swiglu")


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_rows_do_not_depend_on_the_batch(libs, qtype):
    """Each output row is summed in one order whatever the other rows (decode batch sizes and
    prefill tiles alike): a sequence decodes to the same bits alone or in a batch."""
    w = random_weight(qtype, 70, 512, seed=6)
    x = torch.randn(21, 512, generator=torch.Generator().manual_seed(7))
    for name, lib in libs.items():
        together = run(lib, x, w)
        for lo, hi in ((0, 1), (5, 6), (3, 11), (20, 21), (0, 9)):
            assert torch.equal(run(lib, x[lo:hi], w), together[lo:hi]), f"{name} rows {lo}:{hi}"


def test_experts_in_one_call_equal_separate_products(libs):
    """Gate/up then down of every expert in one call: the same bits as one product at a time,
    mixed formats (Q4_K gate/up with a Q6_K or Q5_0 down, as the Q4_K_M recipe does) included."""
    g = torch.Generator().manual_seed(8)
    segments = []
    for e, (rows, qt, qt_down) in enumerate([(1, QType.Q4_K, QType.Q6_K), (3, QType.Q8_0, QType.Q5_0),
                                             (8, QType.Q4_0, QType.Q4_K), (2, QType.Q6_K, QType.Q4_0),
                                             (11, QType.Q4_K, QType.Q6_K)]):
        segments.append((torch.randn(rows, 512, generator=g), random_weight(qt, 256, 512, seed=10 * e),
                         random_weight(qt, 256, 512, seed=10 * e + 1), random_weight(qt_down, 512, 256, 10 * e + 2)))
    with torch.inference_mode():
        fused = kernels.experts_swiglu(segments)
        separate = [kernels.linear(kernels.swiglu(x, gt, up), down) for x, gt, up, down in segments]
        qkv = kernels.linear_many(segments[0][0], [s[1] for s in segments])
    for i, (a, b) in enumerate(zip(fused, separate)):
        assert torch.equal(a, b), f"expert {i}"
    for y, (_, w, _, _) in zip(qkv, segments):
        assert torch.equal(y, kernels.linear(segments[0][0], w))
    # The fused call also matches float64 within the bound of the two products chained.
    x, gate, up, down = segments[1]
    a, ea = product_bound(gate, x)
    b, eb = product_bound(up, x)
    h, eh = F.silu(a) * b, swiglu_bound(a, b, ea, eb)
    exact, bound = product_bound(down, h, eh)
    assert_within(fused[1], exact, bound, "expert 1 against float64")


@pytest.mark.parametrize("qtype, qtype_down", [(QType.Q8_0, QType.Q8_0), (QType.Q4_K, QType.Q6_K)], ids=str)
def test_one_token_moe_call_gives_the_bits_of_the_batched_path(libs, qtype, qtype_down):
    """A decoding token's routed and shared experts, weighted and summed in one kernel call:
    the same bits as the token's per-expert products with torch's additions, and as the token
    among others in the batched (sorted, index_add_) path."""
    from megrez.models.moe import ExpertBank
    from megrez.quant.modules import QuantExpertBank, empty_quant

    hidden, inter, n = 512, 256, 6
    stacks = []
    for j, (qt, rows, cols) in enumerate([(qtype, inter, hidden), (qtype, inter, hidden), (qtype_down, hidden, inter)]):
        stack = empty_quant(qt, (n, rows, cols))
        for e in range(n):
            stack.data[e] = random_weight(qt, rows, cols, seed=100 * j + e).data
        stacks.append(stack)
    bank = QuantExpertBank(*stacks)
    shared = (random_weight(qtype, 512, hidden, 1), random_weight(qtype, 512, hidden, 2),
              random_weight(qtype_down, hidden, 512, 3))
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(3, hidden, generator=g)
    idx = torch.tensor([[4, 0, 2], [5, 1, 3], [2, 0, 1]])
    ws = torch.rand(3, 3, generator=g)
    with torch.inference_mode():
        fused = kernels.quantized.moe_token(xs[1:2], *stacks, [1, 3, 5], ws[1, [1, 2, 0]], [shared])
        routed, (shared_out,) = bank.one_token(xs[1:2], ws[1:2], idx[1:2], [shared])
        batched = ExpertBank.forward(bank, xs, ws, idx)[1:2] + kernels.experts_swiglu([(xs, *shared)])[0][1:2]
        via_bank = bank.one_token_total(xs[1:2], ws[1:2], idx[1:2], [shared])
    assert torch.equal(fused, routed + shared_out)
    assert torch.equal(fused, batched)
    assert torch.equal(via_bank, fused)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_c_dequantization_is_ggml_bit_for_bit(libs, qtype):
    w = random_weight(qtype, 9, 512, seed=11)
    for lib in libs.values():
        assert torch.equal(kq.dequantize(lib, w), gguf_dequantize(w))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_quantized_embedding_rows_are_ggml_dequantization(lib, monkeypatch, qtype):
    from megrez.quant.modules import QuantEmbedding

    w = random_weight(qtype, 40, 512, seed=12)
    tokens = torch.tensor([[3, 39, 3], [0, 17, 8]])
    ref = gguf_dequantize(w)[tokens]
    emb = QuantEmbedding(w)
    assert torch.equal(emb(tokens), ref)  # through the C dequantization
    monkeypatch.setattr(kernels, "enabled", False)
    assert torch.equal(emb(tokens), ref)  # through torch's


def test_forced_variant_and_fallback_without_kernels():
    """MEGREZ_CPU_VARIANT picks the variant (the engine then uses it); MEGREZ_CPU_KERNELS=0
    leaves the reference path, which dequantizes (once said on stderr) and keeps float32
    activations, so it lies within the activation-rounding bound of the kernels."""
    code = ("import torch, megrez.kernels as k\n"
            "from test_quantized_kernels import random_weight, product_bound\n"
            "from megrez.quant.formats import QType\n"
            "w = random_weight(QType.Q8_0, 16, 256, seed=0)\n"
            "x = torch.randn(2, 256)\n"
            "y = k.linear(x, w)\n"
            "assert torch.equal(k.linear(x, w), y)\n"
            "exact, bound = product_bound(w, x)\n"
            "assert ((y.double() - exact).abs() <= bound).all()\n"
            "print(k.variant or 'none', k.reason)\n")
    here = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runnable = build.runnable_variants() if build.compiler() else []
    if "avx2" in runnable:
        out = subprocess.run([sys.executable, "-c", code], env={**env, "MEGREZ_CPU_VARIANT": "avx2"},
                             capture_output=True, text=True, check=True)
        assert out.stdout.split()[0] == "avx2"
    off = subprocess.run([sys.executable, "-c", code], env={**env, "MEGREZ_CPU_KERNELS": "0"},
                         capture_output=True, text=True)
    if off.returncode != 0 and "NotImplementedError" in off.stderr:
        pytest.skip("the reference path needs megrez.quant.formats.dequantize")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split()[0] == "none" and "MEGREZ_CPU_KERNELS=0" in off.stdout
    assert off.stderr.count("quantized CPU kernels unavailable") == 1


def test_libraries_do_not_depend_on_the_build_machine(monkeypatch, tmp_path):
    """Fixed flags per variant (never -march=native), and a cache key that changes with the
    sources, the compiler, the flags and the CPU's features."""
    for v in build.VARIANTS.values():
        assert not any("native" in f or f.startswith(("-march", "-mtune")) for f in (*build.COMMON_FLAGS, *v.flags))
    monkeypatch.setenv("MEGREZ_CACHE", str(tmp_path))
    cc = build.compiler() or "cc"
    avx2 = build.VARIANTS["avx2"]
    base = build.library_path(avx2, 1, cc)
    assert base.parent == tmp_path / "kernels" and "avx2" in base.name
    assert build.library_path(avx2, 3, cc) != base                                          # CPU features
    assert build.library_path(build.VARIANTS["avx512"], 1, cc) != base                      # flags
    build._compiler_ids[cc] = "another compiler"
    try:
        assert build.library_path(avx2, 1, cc) != base                                      # compiler
    finally:
        del build._compiler_ids[cc]
    assert build.library_path(avx2, 1, cc) == base


def test_a_variant_the_cpu_cannot_run_is_refused_clearly():
    code = ("import megrez.kernels as k\n"
            "assert k.load() is None\n"
            "print(k.reason)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MEGREZ_CPU_VARIANT": "avx1024"},
                         capture_output=True, text=True, check=True)
    assert "unknown CPU kernel variant 'avx1024'" in out.stdout


def test_non_finite_activations_are_not_hidden(libs):
    """A NaN or an infinity in x makes the products it enters NaN or infinite, as in float math,
    instead of vanishing in the 8-bit rounding."""
    for qtype in FORMATS:
        w = random_weight(qtype, 8, 512, seed=12)
        x = torch.randn(3, 512, generator=torch.Generator().manual_seed(13))
        x[0, 5], x[1, 300] = float("nan"), float("inf")
        for name, lib in libs.items():
            y = run(lib, x, w)
            assert y[0].isnan().all() and not y[1].isfinite().any() and y[2].isfinite().all(), (name, qtype.name)
