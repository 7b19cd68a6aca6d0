"""The CPU decode kernels against float64 products (within the rounding bound of a float32
sum in any order, the bound torch's own products meet too), and the fallback to torch when
they are switched off."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from rounding import U32, UBF16, assert_within, exact_linear, linear_bound, swiglu_bound

from megrez import kernels


@pytest.fixture(scope="module")
def lib():
    lib = kernels.load()
    if lib is None:
        pytest.skip(f"CPU kernels unavailable here: {kernels.reason}")
    if not kernels.lib_has_float_kernels(lib):
        pytest.skip(f"the {kernels.variant} kernels have no float products (they need AVX2)")
    return lib


def swiglu_exact_and_bound(x, gate, up):
    a, b = exact_linear(x, gate), exact_linear(x, up)
    return F.silu(a) * b, swiglu_bound(a, b, linear_bound(x, gate), linear_bound(x, up))


@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("n,k", [(1, 8), (7, 13), (64, 64), (257, 1000), (1024, 96)])
def test_linear_and_swiglu_match_torch(lib, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w, u = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    exact, bound = exact_linear(x, w), linear_bound(x, w)
    exact_h, bound_h = swiglu_exact_and_bound(x, w, u)
    with torch.inference_mode():
        assert_within(kernels.linear(x, w), exact, bound, "kernel linear")
        assert_within(F.linear(x, w), exact, bound, "torch linear")  # the bound is torch's too
        assert_within(kernels.swiglu(x, w, u), exact_h, bound_h, "kernel swiglu")
        # Leading dims and bias: one more rounding, of the sum.
        assert_within(kernels.linear(x[None], w, b)[0], exact + b.double(),
                      bound + U32 * ((exact + b.double()).abs() + bound), "kernel linear with bias")


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(7, 13), (257, 1000)])
def test_bfloat16_weights_match_float32_math(lib, m, n, k):
    """bfloat16 weights are widened exactly; products accumulate in float32 and round once."""
    g = torch.Generator().manual_seed(n + k + m)
    x = torch.randn(m, k, generator=g).bfloat16()
    w, u = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    with torch.inference_mode():
        y = kernels.linear(x, w)
        h = kernels.swiglu(x, w, u)
        y_torch = F.linear(x, w)
    assert y.dtype == h.dtype == torch.bfloat16
    exact, bound = exact_linear(x, w), linear_bound(x, w)
    exact_h, bound_h = swiglu_exact_and_bound(x, w, u)
    # The float32 sum's error (relative to its terms), then one rounding to bfloat16 (relative
    # to the value rounded).
    assert_within(y, exact, bound + UBF16 * (exact.abs() + bound), "kernel linear")
    assert_within(h, exact_h, bound_h + UBF16 * (exact_h.abs() + bound_h), "kernel swiglu")
    assert_within(y_torch, exact, bound + UBF16 * (exact.abs() + bound), "torch's bfloat16 linear")


def test_grouped_products_with_different_rows_per_expert(lib):
    g = torch.Generator().manual_seed(0)
    # Different intermediate sizes too (routed and shared experts in one call).
    segs = [(torch.randn(rows, 64, generator=g), torch.randn(inter, 64, generator=g), torch.randn(inter, 64, generator=g),
             torch.randn(64, inter, generator=g)) for rows, inter in ((1, 32), (3, 32), (8, 96), (2, 32), (5, 48))]
    with torch.inference_mode():
        got = kernels.experts_swiglu(segs)
        qkv = kernels.linear_many(segs[0][0], [s[1] for s in segs] + [segs[0][3].t().contiguous()])
    for (x, gate, up, down), y in zip(segs, got):
        h, h_err = swiglu_exact_and_bound(x, gate, up)
        assert_within(y, exact_linear(h, down), linear_bound(h, down, h_err), "expert")
    for y, w in zip(qkv, [s[1] for s in segs] + [segs[0][3].t()]):
        assert_within(y, exact_linear(segs[0][0], w), linear_bound(segs[0][0], w), "linear_many")


def test_results_do_not_depend_on_the_batch(lib):
    """Each output row is summed in the same order whatever the other rows: batch-invariant."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 300, generator=g), torch.randn(77, 300, generator=g)
    with torch.inference_mode():
        together = kernels.linear(x, w)
        alone = torch.cat([kernels.linear(x[i:i + 1], w) for i in range(6)])
    assert torch.equal(together, alone)


def test_training_and_large_inputs_use_torch(lib):
    w = torch.randn(16, 32, requires_grad=True)
    x = torch.randn(2, 32)
    y = kernels.linear(x, w)
    assert y.requires_grad  # autograd still works: the kernel stood aside
    assert kernels.linear(torch.randn(9, 32), w.detach()).shape == (9, 16)


def test_switched_off_falls_back_to_torch(tmp_path):
    code = ("import torch, megrez.kernels as k\n"
            "x, w = torch.randn(1, 64), torch.randn(8, 64)\n"
            "y = k.linear(x, w)\n"
            "assert k.load() is None and 'MEGREZ_CPU_KERNELS=0' in k.reason\n"
            "assert torch.equal(y, torch.nn.functional.linear(x, w))\n")
    env = {**os.environ, "MEGREZ_CPU_KERNELS": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_expert_bank_is_batch_invariant(lib):
    """A token's MoE output is bit-identical alone (the one-token path) or in a batch."""
    from megrez.models.moe import ExpertBank

    g = torch.Generator().manual_seed(0)
    bank = ExpertBank(16, 64, 32)
    for p in bank.parameters():
        p.data.normal_(generator=g)
    x = torch.randn(5, 64, generator=g)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(5)])
    w = torch.rand(5, 4, generator=g)
    with torch.inference_mode():
        together = bank(x, w, idx)
        alone = torch.cat([bank(x[i:i + 1], w[i:i + 1], idx[i:i + 1]) for i in range(5)])
    assert torch.equal(together, alone)
