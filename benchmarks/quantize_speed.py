"""Quantizer speed: weights per second of the C quantizer (megrez/kernels/quantize.c) and of the
Python quantizers it replaces (megrez/quant/formats.py, the fallback without a compiler), per
block type, in interleaved rounds, checking on the way that both give the same bytes. Then
what that means for a whole model: the time to quantize a shape's weights in a scheme's
type mix.

    python benchmarks/quantize_speed.py                           # every block type, 3 rounds
    python benchmarks/quantize_speed.py --types q4_k q6_k --threads 2 --rounds 5

Weights are normal(0, 0.02) rows of 2048 (speed hardly depends on the values). Each round
times, for every type, the C quantizer on ``--c-weights`` weights and the Python one on
``--py-weights`` (it is much slower), and the best round of each is reported. The last line
is one JSON object.
"""
from __future__ import annotations

import megrez  # noqa: F401  (first: it sets the OpenMP waiting policy before torch starts OpenMP)

# isort: split
import argparse
import json
import time

import torch

from megrez import kernels
from megrez.bench import device_name
from megrez.models import build_model
from megrez.presets import PRESETS
from megrez.quant.formats import QType, quantize
from megrez.quant.recipe import tensor_types

TYPES = {"q8_0": QType.Q8_0, "q4_0": QType.Q4_0, "q5_0": QType.Q5_0, "q4_k": QType.Q4_K, "q6_k": QType.Q6_K}


def weights_per_type(shape: str, scheme: str) -> dict[QType, int]:
    """How many weights of ``shape`` the scheme puts in each block type."""
    with torch.device("meta"):
        model = build_model(dict(PRESETS[shape]))
    params = dict(model.named_parameters())
    counts: dict[QType, int] = {}
    for name, qtype in tensor_types(model, scheme).items():
        counts[qtype] = counts.get(qtype, 0) + params[name].numel()
    return counts


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="threads (default: torch's)")
    p.add_argument("--c-weights", type=int, default=1 << 24, help="weights per C timing")
    p.add_argument("--py-weights", type=int, default=1 << 20, help="weights per Python timing")
    p.add_argument("--shape", default="megrez2-3x7b-a3b", choices=sorted(PRESETS),
                   help="the model whose quantization time is estimated")
    p.add_argument("--scheme", default="q4_k_m", choices=["q8_0", "q4_0", "q4_k_m"])
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if kernels.load() is None:
        raise SystemExit(f"the C quantizer is unavailable ({kernels.reason}): nothing to compare")
    g = torch.Generator().manual_seed(0)
    c_rows = torch.randn(a.c_weights // 2048, 2048, generator=g) * 0.02
    py_rows = c_rows[: a.py_weights // 2048]
    best = {t: {"c": float("inf"), "python": float("inf")} for t in a.types}
    for t in a.types:  # warm-up: first-touch page faults of the outputs, the library's threads
        quantize(c_rows, TYPES[t])
    for _ in range(a.rounds):
        for t in a.types:
            qtype = TYPES[t]
            c_s = timed(lambda: quantize(c_rows, qtype))
            py_s = timed(lambda: quantize(py_rows, qtype, reference=True))
            best[t]["c"] = min(best[t]["c"], c_s)
            best[t]["python"] = min(best[t]["python"], py_s)
    results = []
    print(f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, kernels {kernels.variant}")
    print("type  | C (M weights/s) | Python (M weights/s) | ratio | same bytes")
    for t in a.types:
        qtype = TYPES[t]
        same = torch.equal(quantize(py_rows, qtype).data, quantize(py_rows, qtype, reference=True).data)
        c = c_rows.numel() / best[t]["c"]
        py = py_rows.numel() / best[t]["python"]
        results.append({"type": t, "c_weights_per_s": c, "python_weights_per_s": py, "ratio": c / py,
                        "same_bytes": same})
        print(f"{t:5s} | {c / 1e6:15.1f} | {py / 1e6:20.2f} | {c / py:5.1f} | {same}")
    estimate = {}
    counts = weights_per_type(a.shape, a.scheme)
    rate = {TYPES[r["type"]]: r for r in results}
    if all(q in rate for q in counts):
        for impl in ("c", "python"):
            estimate[impl] = sum(n / rate[q][f"{impl}_weights_per_s"] for q, n in counts.items())
        mix = ", ".join(f"{q.name} {n / 1e9:.2f}B" for q, n in sorted(counts.items()))
        print(f"{a.shape} at {a.scheme} ({mix} weights): quantizing takes about {estimate['c'] / 60:.1f} min in C, "
              f"{estimate['python'] / 60:.0f} min in Python")
    print(json.dumps({"device_name": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
                      "variant": kernels.variant, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                      "results": results, "shape": a.shape, "scheme": a.scheme,
                      "estimated_model_seconds": estimate}))
    return 0 if all(r["same_bytes"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
