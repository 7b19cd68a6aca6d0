"""Decode step time three ways, rounds alternating in one process (the machines are shared and
noisy): the whole step in one kernel call (``moe_step.run``, batch 1, quantized weights: what the
engine runs), each decoder layer as one kernel call (``decode_ops.decode_layer``) and the model
run module by module.

    python benchmarks/fused_layers.py runs-out/vs-llama-cpp/llama-30l-q4_k_m.gguf --threads 2
    python benchmarks/fused_layers.py --shape megrez2-350m --quantization q8_0 --rounds 4

A GGUF file (or any model path ``LLM`` loads), or a random model of a named shape
(``megrez.bench.SHAPES``) quantized by a scheme. The three give the same tokens, bit for bit
(``tests/test_moe_step.py``, ``tests/test_decode_ops.py``). The last line is one JSON object.
"""
from __future__ import annotations

import megrez  # noqa: F401  (first: it sets the OpenMP waiting policy before torch starts OpenMP)

# isort: split
import argparse
import json
import statistics
import time

import torch

from megrez import kernels
from megrez.bench import device_name, random_model
from megrez.engine.engine import Engine
from megrez.engine.sampling import SamplingParams
from megrez.kernels import decode_ops, moe_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="a model path (e.g. a GGUF file); or use --shape")
    p.add_argument("--shape", help="a random model of this shape instead (megrez.bench.SHAPES)")
    p.add_argument("--quantization", default="q4_k_m", help="scheme for --shape (default q4_k_m)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=16, help="decode steps per round")
    p.add_argument("--prompt", type=int, default=40)
    a = p.parse_args(argv)
    if (a.model is None) == (a.shape is None):
        p.error("give a model path or --shape")
    torch.set_num_threads(a.threads)
    if a.model:
        from megrez.llm import LLM

        llm = LLM(a.model, device="cpu")
        engine, vocab = llm.engine, llm.model.args.vocab_size
    else:
        model = random_model(a.shape, torch.device("cpu"), torch.float32, quantization=a.quantization,
                             random_weights="blocks").eval()
        vocab = model.args.vocab_size
        engine = Engine(model, None, max_num_seqs=1, max_model_len=a.prompt + 2 * a.rounds * a.steps + 16,
                        kv_cache_memory=1 << 34)
    ids = torch.randint(10, vocab - 10, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request(ids, SamplingParams(temperature=0, max_tokens=2 * a.rounds * a.steps + 8, ignore_eos=True))
    model_type = type(engine.model)
    real = {"layer": decode_ops.decode_layer, "step": moe_step.run, "all_layers": model_type.decode_all_layers}
    calls = {"layer": 0, "step": 0}

    def counted(kind):
        def call(*args, **kwargs):
            out = real[kind](*args, **kwargs)
            calls[kind] += out is not None
            return out
        return call

    def off(*args, **kwargs):
        return None

    # mode -> (whole-step call, per-layer call)
    modes = {"step": (real["all_layers"], counted("layer")), "layers": (off, counted("layer")), "modules": (off, off)}
    ms = {mode: [] for mode in modes}
    moe_step.run = counted("step")
    try:
        with torch.inference_mode():
            for _ in range(4):  # prefill and warm-up
                engine.step()
            calls.update(layer=0, step=0)
            for _ in range(a.rounds):
                for mode, (all_layers, layer) in modes.items():
                    model_type.decode_all_layers, decode_ops.decode_layer = all_layers, layer
                    t = time.perf_counter()
                    for _ in range(a.steps):
                        engine.step()
                    ms[mode].append((time.perf_counter() - t) / a.steps * 1e3)
    finally:
        moe_step.run, decode_ops.decode_layer, model_type.decode_all_layers = real["step"], real["layer"], real["all_layers"]
    if calls["step"] == 0:
        print("note: no step ran in one call (float weights, or the kernels are unavailable)")
    if calls["layer"] == 0:
        print("note: no layer ran fused (float weights, or the kernels are unavailable)")
    for mode, v in ms.items():
        print(f"{mode:8s} ms/step: {' '.join(f'{x:.1f}' for x in v)}   best {min(v):.1f}, median {statistics.median(v):.1f}")
    for mode in ("layers", "modules"):
        print(f"{mode} / step: {min(ms[mode]) / min(ms['step']):.2f} (best), "
              f"{statistics.median(ms[mode]) / statistics.median(ms['step']):.2f} (median)")
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": device_name(torch.device("cpu")),
                      "kernels": kernels.variant, "threads": a.threads, "model": a.model or a.shape,
                      "quantization": None if a.model else a.quantization, "whole_step_calls": calls["step"],
                      "fused_layer_calls": calls["layer"], "ms_per_step": ms}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
