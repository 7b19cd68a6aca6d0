"""Error bounds for float32 arithmetic, for tests that compare results computed in different
orders (our kernels, MKL, a float64 reference).

A dot product summed in float32 in *any* order is within ``gamma(n) * sum(|terms|)`` of the exact
sum (Higham, Accuracy and Stability of Numerical Algorithms, §3.1). The bound is relative to the
terms, not to the result: a sum that cancels to a tiny value still carries the rounding error of
its large terms, so a bound relative to the result fails on some CPUs and orders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

U32 = 2.0 ** -24   # float32 unit roundoff
UBF16 = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits)
SILU_SLOPE = 1.0999  # max |silu'(a)|, so |silu(a) - silu(b)| <= SILU_SLOPE * |a - b|


def gamma(n: int, u: float = U32) -> float:
    assert n * u < 1, "gamma(n) is only defined for n * u < 1"
    return n * u / (1 - n * u)


def exact_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T in float64 (exact enough: float64 rounding is 2^29 times finer than float32's)."""
    return F.linear(x.double(), w.double())


def linear_bound(x: torch.Tensor, w: torch.Tensor, x_err: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bound on |fl32(x @ w^T) - exact(x @ w^T)| for any summation order, elementwise; ``x_err``
    bounds an error already in x (elementwise or scalar), which the product carries along."""
    xa, wa = x.double().abs(), w.double().abs()
    x_err = torch.as_tensor(x_err, dtype=torch.float64).expand_as(xa)
    return F.linear(x_err, wa) + gamma(x.shape[-1]) * F.linear(xa + x_err, wa)


def swiglu_bound(a: torch.Tensor, b: torch.Tensor, ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """Bound on |silu(a') * b' - silu(a) * b| for exact a, b (float64), computed values a', b'
    within ea, eb of them, silu evaluated in float32 (a few roundings) and one product rounding."""
    s = F.silu(a).abs()
    sa, bb = s + SILU_SLOPE * ea, b.abs() + eb
    return SILU_SLOPE * ea * bb + s * eb + 6 * U32 * sa * bb


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str = "result") -> None:
    err = (got.double() - exact).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: error {err.flatten()[worst].item():.3e} exceeds its bound "
                                  f"{bound.flatten()[worst].item():.3e} at flat index {worst.item()}")


def rounding_noise(model, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(max |float32 logits - float64 logits|, float64 logits) of one plain forward pass of
    ``model``: the size of float32 rounding for this model and input on this machine. Paths
    that differ from it only in summation order (batched, cached, kernels vs MKL) deviate from
    the float64 result by the same order of magnitude."""
    import copy

    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(tokens)
        noise = (model(tokens).double() - ref).abs().max().item()
    return noise, ref
