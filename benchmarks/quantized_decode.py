"""Decode and prefill speed of a model shape with quantized weights on the CPU, next to the
memory read bandwidth measured in the same run, with the time inside the quantized kernels
split from the rest of each step.

    python benchmarks/quantized_decode.py                                  # megrez2-350m, f32 q8_0 q4_k_m
    python benchmarks/quantized_decode.py --schemes q4_k_m --threads 2 --output 48 --rounds 3
    python benchmarks/quantized_decode.py --prefill-only --prompt 512      # int8 GEMM vs dequantize + MKL

Weights are random *quantized blocks* (random quants, scales sized like a 0.02-std
initialisation), laid out as the formats store them: kernel speed does not depend on the
values, and building them takes seconds where quantizing 350M random floats takes many
minutes. Types follow llama.cpp's mixes: q8_0 and q4_0 everywhere; q4_k_m Q4_K with Q6_K for
the LM head and for V and down projections (routed experts' too) on llama.cpp's "more bits"
layers. The router, norms and embedding stay float32.

Rounds are interleaved (each round: bandwidth probe, then every scheme) and the best round of
each scheme is reported, with its fraction of the same round's bandwidth probe. "kernel ms"
is the time spent inside the quantized kernel calls during decode; the rest of a step is
attention, norms, routing and Python. The last line is one JSON object.
"""
from __future__ import annotations

import megrez  # noqa: F401  (first: it sets the OpenMP waiting policy before torch starts OpenMP)

# isort: split
import argparse
import json
import sys
import time

import numpy as np
import torch
from torch import nn

from megrez import kernels
from megrez.bench import best_time, device_name, measure_read_bandwidth, random_model, run_case
from megrez.kernels import quantized as kq
from megrez.models.moe import ExpertBank
from megrez.quant.formats import BLOCK_SIZES, QType, QuantTensor, row_bytes

MAIN_TYPE = {"q8_0": QType.Q8_0, "q4_0": QType.Q4_0, "q4_k_m": QType.Q4_K}


def _fp16(v: float, shape) -> np.ndarray:
    return np.frombuffer(np.full(shape, v, dtype=np.float16).tobytes(), np.uint8).reshape(*shape, 2)


def random_blocks(qtype: QType, shape, rng, std: float = 0.02) -> QuantTensor:
    """Random quants with block scales that give weights of about ``std``."""
    *lead, k = shape
    n = int(np.prod(lead))
    block, nbytes = BLOCK_SIZES[qtype]
    data = rng.integers(0, 256, size=(n, k // block, nbytes), dtype=np.uint8)
    if qtype == QType.Q8_0:
        data[..., 0:2] = _fp16(std / 73, data.shape[:2])            # |q| ~ 73 on average
    elif qtype == QType.Q4_0:
        data[..., 0:2] = _fp16(std / 4.6, data.shape[:2])
    elif qtype == QType.Q4_K:
        data[..., 0:2] = _fp16(std / 32 / 7.5, data.shape[:2])      # d * sc * q, sc ~ 32, q ~ 7.5
        data[..., 2:4] = _fp16(std / 32, data.shape[:2])
    elif qtype == QType.Q6_K:
        data[..., 208:210] = _fp16(std / 64 / 18, data.shape[:2])   # |sc| ~ 64, |q - 32| ~ 18
    return QuantTensor(torch.from_numpy(data.reshape(*lead, row_bytes(qtype, k))), qtype, tuple(shape))


def quantize_random(model, scheme: str, seed: int = 0):
    """Replace every linear weight and expert bank of ``model`` by random quantized blocks."""
    rng = np.random.default_rng(seed)
    main = MAIN_TYPE[scheme]
    n = model.args.num_hidden_layers

    def more_bits(i):  # llama.cpp's use_more_bits
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    def kind(name, proj, layer):
        if scheme == "q4_k_m" and (name == "lm_head" or (proj in ("v_proj", "down_proj") and more_bits(layer))):
            return QType.Q6_K
        return main

    for name, mod in list(model.named_modules()):
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        if isinstance(mod, ExpertBank):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                shape = getattr(mod, proj).shape
                del mod._parameters[proj]
                setattr(mod, proj, random_blocks(kind(name, proj, layer), shape, rng))
        elif isinstance(mod, nn.Linear) and not name.endswith("mlp.gate"):
            shape = mod.weight.shape
            del mod._parameters["weight"]
            mod.weight = random_blocks(kind(name, name.rsplit(".", 1)[-1], layer), shape, rng)
    return model


class KernelTimer:
    """Time inside the quantized kernel calls (wraps their one entry point)."""

    def __init__(self):
        self.seconds, self.calls, self._run = 0.0, 0, kq._run

    def __enter__(self):
        def timed(*args):
            t = time.perf_counter()
            try:
                return self._run(*args)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1
        kq._run = timed
        return self

    def __exit__(self, *exc):
        kq._run = self._run


def prefill_products(m: int, threads: int) -> list[dict]:
    """One layer-sized product at m rows: the kernels' int8 GEMM vs dequantize + torch matmul."""
    rng = np.random.default_rng(1)
    rows = []
    for qtype in (QType.Q8_0, QType.Q4_K, QType.Q6_K):
        w = random_blocks(qtype, (2816, 1024), rng)
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
    p.add_argument("--schemes", nargs="+", default=["f32", "q8_0", "q4_k_m"], choices=["f32", *MAIN_TYPE])
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
        model = random_model(a.shape, torch.device("cpu"), torch.float32)
        models[scheme] = model if scheme == "f32" else quantize_random(model, scheme)
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
