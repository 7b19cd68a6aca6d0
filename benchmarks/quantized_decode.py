"""Decode and prefill speed of a model shape with quantized weights on the CPU, next to the
memory read bandwidth measured in the same run, with the time inside the quantized kernels
split from the rest of each step.

    python benchmarks/quantized_decode.py                                  # megrez2-350m, f32 q8_0 q4_k_m
    python benchmarks/quantized_decode.py --schemes q4_k_m --threads 2 --output 48 --rounds 3
    python benchmarks/quantized_decode.py --prefill-only --prompt 512      # int8 GEMM vs dequantize + MKL

Weights are ``megrez bench``'s random quantized models (``random_model(quantization=...,
random_weights="blocks")``):
llama.cpp's type mix for the scheme (megrez.quant.recipe), allocated quantized and filled with
random blocks whose scales match a 0.02-std initialisation; kernel speed does not depend on the
values.

Rounds are interleaved (each round: bandwidth probe, then every scheme) and the best round of
each scheme is reported, with its fraction of the same round's bandwidth probe. "kernel ms"
is the time spent inside the quantized kernel calls (the whole-step call included) over the
run, the prompt's prefill included, per decode step: with long prompts and few steps it exceeds
the step. The last line is one JSON object.
"""
from __future__ import annotations

import megrez  # noqa: F401  (first: it sets the OpenMP waiting policy before torch starts OpenMP)

# isort: split
import argparse
import json
import sys
import time

import torch

from megrez import kernels
from megrez.bench import best_time, device_name, fill_random_blocks, measure_read_bandwidth, random_model, run_case
from megrez.kernels import moe_step
from megrez.kernels import quantized as kq
from megrez.quant.formats import QType
from megrez.quant.modules import empty_quant


class KernelTimer:
    """Time inside the quantized kernel calls (wraps their entry points: the products', a
    decoding token's whole MoE layer's and a whole decoding step's, every layer in one call)."""

    NAMES = ((kq, "_run"), (kq, "moe_token"), (moe_step, "run"))

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._real = {(module, name): getattr(module, name) for module, name in self.NAMES}

    def __enter__(self):
        def timed(real):
            def call(*args):
                t = time.perf_counter()
                try:
                    return real(*args)
                finally:
                    self.seconds += time.perf_counter() - t
                    self.calls += 1
            return call
        for (module, name), real in self._real.items():
            setattr(module, name, timed(real))
        return self

    def __exit__(self, *exc):
        for (module, name), real in self._real.items():
            setattr(module, name, real)


def prefill_products(m: int, threads: int) -> list[dict]:
    """One layer-sized product at m rows: the kernels' int8 GEMM vs dequantize + torch matmul."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for qtype in (QType.Q8_0, QType.Q4_K, QType.Q6_K):
        w = empty_quant(qtype, (2816, 1024))
        fill_random_blocks(w, gen)
        x = torch.randn(m, 1024)
        lib = kernels.load()
        with torch.inference_mode():
            gemm = best_time(lambda: kq.linear(x, w), torch.device("cpu"), reps=5)
            deq = best_time(lambda: torch.nn.functional.linear(x, kq.dequantize(lib, w)), torch.device("cpu"),
                            reps=5)
        rows.append({"qtype": qtype.name, "rows": m, "int8_gemm_ms": gemm * 1e3, "dequantize_matmul_ms": deq * 1e3,
                     "int8_gemm_gflops": 2 * m * 2816 * 1024 / gemm / 1e9})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="megrez2-350m")
    p.add_argument("--schemes", nargs="+", default=["f32", "q8_0", "q4_k_m"], choices=["f32", "q8_0", "q4_0", "q4_k_m"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prefill-only", action="store_true", help="only the int8 GEMM vs dequantize + matmul table")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if kernels.load() is None:
        sys.exit(f"the CPU kernels are unavailable: {kernels.reason}")
    header = {"shape": a.shape, "device_name": device_name(torch.device("cpu")), "threads": a.threads,
              "variant": kernels.variant, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    print(f"{a.shape}, {header['device_name']}, {a.threads} threads, kernels {kernels.variant}")
    prefill = prefill_products(a.prompt, a.threads)
    print("prefill-sized product [%d x 1024] @ [2816 x 1024]^T:" % a.prompt)
    for r in prefill:
        print(f"  {r['qtype']}: int8 GEMM {r['int8_gemm_ms']:.2f} ms ({r['int8_gemm_gflops']:.0f} GFLOP/s), "
              f"dequantize + matmul {r['dequantize_matmul_ms']:.2f} ms")
    if a.prefill_only:
        print(json.dumps({**header, "prefill_products": prefill}))
        return 0
    models = {}
    for scheme in a.schemes:
        models[scheme] = random_model(a.shape, torch.device("cpu"), torch.float32,
                                      quantization=None if scheme == "f32" else scheme, random_weights="blocks")
    best: dict[str, dict] = {}
    for r in range(a.rounds):
        bw = measure_read_bandwidth(torch.device("cpu"), 512 << 20)
        ceilings = {"read_bandwidth": bw["best"], "matmul_flops": 1.0}
        for scheme, model in models.items():
            run_case(model, 1, 16, 4, ceilings)  # warm-up
            with KernelTimer() as kt:
                res = run_case(model, 1, a.prompt, a.output, ceilings)
            steps = a.output - 1
            row = {"round": r + 1, "read_bandwidth_gbs": bw["best"] / 1e9, "decode_tokens_per_s": res.decode_tokens_per_s,
                   "decode_step_ms": res.decode_step_ms, "mb_per_step": res.bytes_per_step / 1e6,
                   "bandwidth_fraction": res.bandwidth_fraction, "prefill_tokens_per_s": res.prefill_tokens_per_s,
                   "kernel_ms_per_step": kt.seconds * 1e3 / (steps + 1) if scheme != "f32" else None,
                   "kernel_calls_per_step": kt.calls / (steps + 1) if scheme != "f32" else None}
            print(f"round {r + 1} {scheme:7s}: decode {res.decode_tokens_per_s:6.1f} tok/s, {res.decode_step_ms:6.2f} ms "
                  f"/ step, {row['mb_per_step']:6.1f} MB / step, {res.bandwidth_fraction:6.1%} of {bw['best'] / 1e9:.1f} "
                  f"GB/s; prefill {res.prefill_tokens_per_s:.0f} tok/s", file=sys.stderr)
            if scheme not in best or row["decode_tokens_per_s"] > best[scheme]["decode_tokens_per_s"]:
                best[scheme] = row
    print("scheme   | decode tok/s | ms/step | MB/step | of BW  | kernel ms/step | prefill tok/s")
    for scheme, row in best.items():
        k = f"{row['kernel_ms_per_step']:6.2f}" if row["kernel_ms_per_step"] is not None else "     -"
        print(f"{scheme:8s} | {row['decode_tokens_per_s']:12.1f} | {row['decode_step_ms']:7.2f} | "
              f"{row['mb_per_step']:7.1f} | {row['bandwidth_fraction']:6.1%} | {k:>14s} | {row['prefill_tokens_per_s']:13.0f}")
    print(json.dumps({**header, "prompt": a.prompt, "output": a.output, "results": best, "prefill_products": prefill}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
