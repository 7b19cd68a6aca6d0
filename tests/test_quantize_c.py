"""The C quantizer (megrez/kernels/quantize.c) gives the bytes of the Python quantizers
(megrez/quant/formats.py, which follow ggml's reference code) for every block type, in every
instruction-set variant this CPU runs, and those of the gguf package's reference quantizer
for Q8_0/Q4_0/Q5_0; on rows that quantizers get wrong (zeros, constants, ties, midpoints,
outliers, tiny and huge magnitudes). Without the kernels, quantize() runs the Python code and
says so once."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megrez.kernels import build
from megrez.kernels import quantized as kq
from megrez.quant import formats
from megrez.quant.formats import QType, quantize, row_bytes

gguf = pytest.importorskip("gguf")

BLOCK_TYPES = (QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.Q4_K, QType.Q6_K)
K = 1024


def hard_rows(seed: int = 0) -> torch.Tensor:
    """[R, 1024] float32: Gaussian rows from 1e-30 to 1e5, and the degenerate cases."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(K, generator=g) * m for m in (1e-30, 1e-6, 1e-3, 0.02, 1.0, 1e3, 1e5)]
    rows += [
        torch.zeros(K),                                     # all zero
        torch.full((K,), 0.25), torch.full((K,), -3.0),     # constant rows
        torch.tensor([1.0, -1.0]).repeat(K // 2),           # ties of +max and -max
        torch.arange(K) % 32 / 2 - 8,                       # halves: where round-half rules differ
        (torch.arange(K) % 16 - 8).float(),                 # values on a grid
        torch.randn(K, generator=g) / torch.rand(K, generator=g).clamp(min=0.02),  # heavy tails
        torch.rand(K, generator=g) + 0.5,                   # positive only (Q4_K's min is 0)
        -torch.rand(K, generator=g),                        # negative only
        torch.randn(K, generator=g) * torch.logspace(-4, 1, K),  # magnitudes changing along the row
    ]
    outlier = torch.randn(K, generator=g) * 0.02
    outlier[7], outlier[300] = 1e4, -1e4
    sparse = torch.zeros(K)
    sparse[::32] = torch.randn(K // 32, generator=g)        # one weight per 32
    mixed = torch.randn(K, generator=g)
    mixed[:256] = 0                                         # one zero super-block among others
    mixed[512:528] = 5e-16                                  # a sub-block under ggml's GROUP_MAX_EPS
    return torch.stack(rows + [outlier, sparse, mixed]).contiguous()


def variants() -> dict:
    if os.environ.get("MEGREZ_CPU_KERNELS", "1") == "0" or build.compiler() is None:
        pytest.skip("no C compiler / kernels disabled")
    out = {}
    for name in ["scalar"] + [v for v in build.runnable_variants() if v != "scalar"]:
        try:
            out[name] = build.load_variant(name)
            kq.declare(out[name])
        except build.BuildError as e:
            print(f"variant {name} not built here: {e}")
    return out


@pytest.fixture(scope="module")
def libs():
    return variants()


@pytest.fixture(scope="module")
def rows():
    return hard_rows()


@pytest.fixture(scope="module")
def python_bytes(rows):
    return {q: quantize(rows, q, reference=True).data for q in BLOCK_TYPES}


def c_bytes(lib, x: torch.Tensor, qtype: QType) -> torch.Tensor:
    out = torch.empty(x.shape[0], row_bytes(qtype, x.shape[1]), dtype=torch.uint8)
    kq.quantize_rows(lib, x, qtype, out)
    return out


def differing_rows(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return (a != b).any(dim=1).nonzero().flatten().tolist()


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_every_variant_gives_the_python_quantizers_bytes(libs, rows, python_bytes, qtype):
    for name, lib in libs.items():
        bad = differing_rows(c_bytes(lib, rows, qtype), python_bytes[qtype])
        assert not bad, f"{name}: {qtype.name} rows {bad} differ from the Python quantizer"


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q5_0], ids=lambda q: q.name)
def test_equals_the_gguf_reference_quantizer(libs, rows, qtype):
    # Beyond the hard rows: magnitudes whose scales overflow fp16 (the quants still come from
    # the float32 scale, as in ggml).
    x = torch.cat([rows, torch.randn(4, K, generator=torch.Generator().manual_seed(1)) * 1e8])
    with np.errstate(over="ignore"):  # the fp16 overflow is the point
        ref = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType(int(qtype)))
    ref = torch.from_numpy(np.ascontiguousarray(ref)).view(torch.uint8).reshape(x.shape[0], -1)
    for name, lib in libs.items():
        bad = differing_rows(c_bytes(lib, x, qtype), ref)
        assert not bad, f"{name}: {qtype.name} rows {bad} differ from gguf.quants.quantize"


def test_many_rows_in_parallel_equal_one_row_at_a_time(libs):
    # Blocks are split among threads in chunks: the bytes cannot depend on the split.
    x = torch.randn(300, 2048, generator=torch.Generator().manual_seed(2)) * 0.02
    for name, lib in libs.items():
        for qtype in BLOCK_TYPES:
            whole = c_bytes(lib, x, qtype)
            single = torch.cat([c_bytes(lib, x[i:i + 1].contiguous(), qtype) for i in range(0, 300, 37)])
            assert torch.equal(whole[::37], single), f"{name} {qtype.name}"


def test_quantize_takes_any_float_dtype_and_layout(monkeypatch, libs):
    # bfloat16/float16 and strided inputs are converted a chunk at a time (a small chunk here):
    # the same bytes as their float32 values, for stacked (expert) shapes too.
    monkeypatch.setattr(formats, "C_CHUNK_WEIGHTS", 3 * 512)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 16, 512, generator=g) * 0.05
    for dtype in (torch.bfloat16, torch.float16):
        v = w.to(dtype)
        for qtype in (QType.Q4_K, QType.Q8_0):
            ours = quantize(v, qtype)
            assert ours.shape == (3, 16, 512) and ours.data.shape == (3, 16, row_bytes(qtype, 512))
            assert torch.equal(ours.data, quantize(v.float(), qtype, reference=True).data)
    strided = torch.randn(512, 64, generator=g).t()  # [64, 512], not contiguous
    assert torch.equal(quantize(strided, QType.Q6_K).data, quantize(strided.contiguous(), QType.Q6_K, reference=True).data)


def test_bad_arguments_are_refused(libs):
    lib = next(iter(libs.values()))
    with pytest.raises(ValueError, match="cannot quantize rows of 320 weights to Q4_K"):
        kq.quantize_rows(lib, torch.zeros(2, 320), QType.Q4_K, torch.empty(2, 180, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous float32 rows"):
        kq.quantize_rows(lib, torch.zeros(2, 256, dtype=torch.float64), QType.Q4_K,
                         torch.empty(2, 144, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"need a uint8 output \[2, 144\]"):
        formats.quantize_rows(torch.zeros(2, 256), QType.Q4_K, torch.empty(2, 143, dtype=torch.uint8))


def test_without_kernels_quantize_runs_python_and_says_so_once(libs):
    code = ("import torch, sys\n"
            "from megrez.quant.formats import quantize, QType\n"
            "w = torch.randn(8, 512, generator=torch.Generator().manual_seed(4))\n"
            "a = quantize(w, QType.Q4_K).data; b = quantize(w, QType.Q6_K).data\n"
            "sys.stdout.buffer.write(a.numpy().tobytes() + b.numpy().tobytes())\n")
    env = {**os.environ, "MEGREZ_CPU_KERNELS": "0"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    on = subprocess.run([sys.executable, "-c", code], env={**env, "MEGREZ_CPU_KERNELS": "1"}, capture_output=True,
                        timeout=120)
    assert off.returncode == 0 and on.returncode == 0, off.stderr.decode() + on.stderr.decode()
    assert off.stdout == on.stdout and len(off.stdout) == 8 * (row_bytes(QType.Q4_K, 512) + row_bytes(QType.Q6_K, 512))
    said = off.stderr.decode()
    assert said.count("C quantizer unavailable") == 1 and "MEGREZ_CPU_KERNELS=0" in said
    assert "C quantizer unavailable" not in on.stderr.decode()
