"""Side by side with llama.cpp on the same GGUF files: decode and prefill tokens/s of a random
Llama checkpoint (Megrez-3B's architecture at ~340M parameters by default) in F32, Q8_0 and
Q4_K_M, same threads, runs interleaved.

    pip install llama-cpp-python          # builds llama.cpp from source (a benchmark oracle, not a dependency)
    python benchmarks/vs_llama_cpp.py --threads 2
    python benchmarks/vs_llama_cpp.py --llama-bench ~/llama.cpp/build/bin/llama-bench --threads 2 --rounds 3
    python benchmarks/vs_llama_cpp.py --types q8_0 --layers 4 --decode 32 --prefill 128   # a quick look

The checkpoint is written once into --work (random weights, megrez's tiny tokenizer), each type
by ``megrez quantize`` (the GGUF llama.cpp reads; seconds per 100M weights with the C
quantizer). Both engines then load the same file: ours with ``LLM(file.gguf)``, llama.cpp with
``llama_cpp.Llama(file.gguf)``, or with ``--llama-bench PATH`` llama.cpp's own benchmark
binary (``llama-bench -m file.gguf -t THREADS -r 1 -p PREFILL -n DECODE``: its pp and tg tests,
after its warm-up run), one process per run. Decode: greedy tokens after a short prompt, timed
from the second token (llama-bench: its tg test, every token); prefill: one prompt of
--prefill tokens. Each round runs every type in both engines, alternating which goes first;
the table gives the best round and the median of the rounds, and the load average seen at each
run. The last line is one JSON object, every round included; ours/llama.cpp >= 1.0 at decode
for Q8_0 and Q4_K_M is the target.

OpenMP's waiting policy decides a lot on a shared machine (docs/performance.md, *Threads on a
shared machine*): ``import megrez`` sets ``GOMP_SPINCOUNT=1000`` for itself unless the user
chose a policy, and llama.cpp's CPU backend waits at its barriers through the same libgomp. By
default (``--llama-env megrez``) llama-bench runs with the same setting; ``--llama-env
default`` gives it the environment as it was before megrez changed it (libgomp's defaults).
With the llama-cpp-python bindings both engines share one process, so one policy.

Our decode also reports the time inside the matrix products (``kernels.linear``,
``linear_many`` and ``swiglu``, their Python wrappers included; a decoder layer run as one
kernel call, ``decode_ops.decode_layer``, and a whole step in one call, ``moe_step.run``, count
whole) per step: the rest of the step
is the model's other torch operations and the engine's Python. ``--profile`` runs only our
decode of each type under ``torch.profiler`` (the products marked as one range) and prints
where a step's time goes; it needs no llama.cpp:

    python benchmarks/vs_llama_cpp.py --profile --types q8_0 q4_k_m --threads 2
"""
from __future__ import annotations

import megrez  # noqa: F401  (first: it sets the OpenMP waiting policy before torch starts OpenMP)

# isort: split
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from megrez import LLM, SamplingParams, kernels
from megrez.bench import device_name
from megrez.tiny import create_tiny

# The environment as it was before ``import megrez`` set its OpenMP waiting policy.
_MEGREZ_SET = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
_USER_ENV = dict(os.environ)
if all(os.environ.get(k) == v for k, v in _MEGREZ_SET.items()) and "OMP_WAIT_POLICY" not in os.environ:
    for k in _MEGREZ_SET:
        _USER_ENV.pop(k, None)


def checkpoint(work: Path, layers: int) -> Path:
    path = work / f"llama-{layers}l"
    if not (path / "config.json").is_file():
        create_tiny(path, "dense", seed=0, overrides={
            "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 4, "max_position_embeddings": 4096, "rope_theta": 10000.0})
    return path


def gguf(work: Path, ckpt: Path, qtype: str) -> Path:
    out = work / f"{ckpt.name}-{qtype}.gguf"
    if not out.is_file():
        print(f"writing {out.name} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "megrez.cli", "quantize", str(ckpt), str(out), "--type", qtype],
                       check=True)
    return out


def prompt_ids(n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(n)
    return torch.randint(10, vocab - 10, (n,), generator=g).tolist()


class ProductTimer:
    """Wall time inside the model's matrix products (the kernels module's entry points the
    models call, float and quantized), counted once where one calls another. A decoder layer
    that runs as one kernel call (quantized weights, ``decode_ops.decode_layer``) counts whole:
    its norms and attention with its products; so does a whole decoding step in one call
    (``moe_step.run``: every layer of a token)."""

    NAMES = ("linear", "linear_many", "swiglu", "experts_swiglu")
    CALLS = {"decode_layer": kernels.decode_ops, "run": kernels.moe_step}

    def __init__(self):
        self.seconds, self.calls, self._depth, self._saved = 0.0, 0, 0, {}

    def _wrap(self, f):
        def timed(*args, **kwargs):
            self._depth += 1
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - t
                    self.calls += 1
        return timed

    def __enter__(self):
        targets = [(kernels, name) for name in self.NAMES] + [(module, name) for name, module in self.CALLS.items()]
        for module, name in targets:
            self._saved[module, name] = getattr(module, name)
            setattr(module, name, self._wrap(self._saved[module, name]))
        return self

    def __exit__(self, *exc):
        for (module, name), f in self._saved.items():
            setattr(module, name, f)


def ours(path: Path, threads: int, decode: int, prefill: int) -> dict:
    torch.set_num_threads(threads)
    llm = LLM(str(path), device="cpu", max_model_len=prefill + decode + 16)
    engine, vocab = llm.engine, llm.model.args.vocab_size

    def run(ids, n, timer=None):
        """(seconds of the first step: prefill and first token, seconds of the other n - 1)"""
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        t = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        if timer is not None:
            timer.seconds, timer.calls = 0.0, 0
        while engine.has_work():
            engine.step()
        return t1 - t, time.perf_counter() - t1

    run(prompt_ids(8, vocab), 4)  # warm-up
    with ProductTimer() as timer:
        _, decode_s = run(prompt_ids(8, vocab), decode, timer)
    prefill_s, _ = run(prompt_ids(prefill, vocab), 1)
    steps = decode - 1
    return {"decode_tokens_per_s": steps / decode_s, "prefill_tokens_per_s": prefill / prefill_s,
            "decode_ms_per_step": decode_s * 1e3 / steps, "products_ms_per_step": timer.seconds * 1e3 / steps,
            "product_calls_per_step": timer.calls / steps}


def theirs(path: Path, threads: int, decode: int, prefill: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_batch=prefill,
                          n_ctx=prefill + decode + 16, verbose=False, logits_all=False)
    vocab = llm.n_vocab()

    def greedy(ids, n):
        llm.reset()
        llm.eval(ids)
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        times = []
        for _ in range(n - 1):
            t = time.perf_counter()
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            times.append(time.perf_counter() - t)
        return times

    greedy(prompt_ids(8, vocab), 4)  # warm-up
    times = greedy(prompt_ids(8, vocab), decode)
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt_ids(prefill, vocab))
    prefill_s = time.perf_counter() - t
    return {"decode_tokens_per_s": len(times) / sum(times), "prefill_tokens_per_s": prefill / prefill_s}


def profile(path: Path, threads: int, decode: int, top: int = 12) -> dict:
    """Our decode under torch.profiler: time per step in the products and in the torch ops
    outside them (self CPU time), the ops counted per step."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    llm = LLM(str(path), device="cpu", max_model_len=decode + 32)
    engine, vocab = llm.engine, llm.model.args.vocab_size
    saved = {name: getattr(kernels, name) for name in ProductTimer.NAMES}

    def marked(f):
        def call(*args, **kwargs):
            with record_function("megrez::products"):
                return f(*args, **kwargs)
        return call

    engine.add_request(prompt_ids(8, vocab), SamplingParams(temperature=0, max_tokens=decode + 1, ignore_eos=True))
    for _ in range(2):  # the prompt's step and a first decode step, not profiled
        engine.step()
    for name, f in saved.items():
        setattr(kernels, name, marked(f))
    try:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            steps = 0
            while engine.has_work():
                engine.step()
                steps += 1
            wall = time.perf_counter() - t
    finally:
        for name, f in saved.items():
            setattr(kernels, name, f)
    ms: dict[str, float] = {}
    calls: dict[str, int] = {}
    products_us, product_calls = 0.0, 0
    for e in prof.events():
        if e.name == "megrez::products":
            if not _inside_products(e.cpu_parent):
                products_us += e.cpu_time_total
                product_calls += 1
        elif not _inside_products(e.cpu_parent):  # ops inside the products count with them
            ms[e.name] = ms.get(e.name, 0.0) + e.self_cpu_time_total / 1e3 / steps
            calls[e.name] = calls.get(e.name, 0) + 1
    ops = sorted(ms.items(), key=lambda kv: -kv[1])
    step_ms = wall * 1e3 / steps
    return {"steps": steps, "ms_per_step": step_ms, "products_ms_per_step": products_us / 1e3 / steps,
            "product_calls_per_step": product_calls / steps,
            "torch_ops_outside_products_per_step": sum(calls.values()) / steps,
            "torch_ops_outside_products_ms_per_step": sum(ms.values()),
            "top_ops_outside_products": [{"op": k, "self_ms_per_step": v, "calls_per_step": calls[k] / steps}
                                         for k, v in ops[:top]]}


def _inside_products(e) -> bool:
    while e is not None:
        if e.name == "megrez::products":
            return True
        e = e.cpu_parent
    return False


def llama_bench(binary: str, env: dict):
    """A baseline running llama.cpp's llama-bench, one process per run."""
    def run(path: Path, threads: int, decode: int, prefill: int) -> dict:
        cmd = [binary, "-m", str(path), "-t", str(threads), "-r", "1", "-p", str(prefill), "-n", str(decode),
               "-o", "json"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
        tests = json.loads(r.stdout)
        pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
        tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
        return {"decode_tokens_per_s": tg["avg_ts"], "prefill_tokens_per_s": pp["avg_ts"],
                "build_commit": tg.get("build_commit"), "model_type": tg.get("model_type")}
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", nargs="+", default=["f32", "q8_0", "q4_k_m"], choices=["f32", "f16", "q8_0", "q4_0", "q4_k_m"])
    p.add_argument("--layers", type=int, default=30, help="decoder layers (30: ~340M parameters)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", type=int, default=64, help="tokens decoded per run")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default="runs-out/vs-llama-cpp", help="where the checkpoint and GGUF files are kept")
    p.add_argument("--llama-bench", metavar="PATH",
                   help="llama.cpp's llama-bench binary as the baseline (instead of the llama-cpp-python bindings)")
    p.add_argument("--llama-env", choices=["megrez", "default"], default="megrez",
                   help="llama-bench's OpenMP waiting policy: the one megrez sets for itself (GOMP_SPINCOUNT=1000), "
                        "or the environment as it was before (libgomp's defaults)")
    p.add_argument("--profile", action="store_true",
                   help="profile our decode of each type (torch.profiler) instead of comparing; no llama.cpp needed")
    a = p.parse_args(argv)
    if a.profile:
        work = Path(a.work)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = checkpoint(work, a.layers)
        out = {}
        for t in a.types:
            r = out[t] = profile(gguf(work, ckpt, t), a.threads, a.decode)
            rest = r["ms_per_step"] - r["products_ms_per_step"] - r["torch_ops_outside_products_ms_per_step"]
            print(f"{t}: {r['ms_per_step']:.1f} ms/step under the profiler: products {r['products_ms_per_step']:.1f} ms "
                  f"({r['product_calls_per_step']:.0f} calls), {r['torch_ops_outside_products_per_step']:.0f} other torch "
                  f"ops {r['torch_ops_outside_products_ms_per_step']:.1f} ms, Python and the rest {rest:.1f} ms; "
                  "the other ops (self ms/step, calls/step):")
            for o in r["top_ops_outside_products"]:
                print(f"    {o['op']:40s} {o['self_ms_per_step']:7.2f} {o['calls_per_step']:7.1f}")
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": device_name(torch.device("cpu")),
                          "kernels": kernels.variant, "threads": a.threads, "layers": a.layers, "profile": out}))
        return 0
    if a.llama_bench:
        if not os.access(a.llama_bench, os.X_OK):
            sys.exit(f"{a.llama_bench}: not an executable llama-bench")
        baseline = llama_bench(a.llama_bench, dict(os.environ) if a.llama_env == "megrez" else _USER_ENV)
        baseline_name = "llama-bench " + ("(megrez's OpenMP policy)" if a.llama_env == "megrez" else "(its own env)")
    else:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python (or pass --llama-bench PATH)")
        baseline, baseline_name = theirs, "llama-cpp-python " + llama_cpp.__version__
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(work, a.layers)
    files = {t: gguf(work, ckpt, t) for t in a.types}
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(a.rounds):
        for t, path in files.items():
            engines = [("megrez", ours), ("llama.cpp", baseline)]
            for name, run in engines if r % 2 == 0 else engines[::-1]:
                load_before = os.getloadavg()[0]
                res = run(path, a.threads, a.decode, a.prefill)
                res["load_average"] = [load_before, os.getloadavg()[0]]
                runs.setdefault((t, name), []).append(res)
                extra = (f", products {res['products_ms_per_step']:.1f} of {res['decode_ms_per_step']:.1f} ms/step"
                         if "products_ms_per_step" in res else "")
                print(f"round {r + 1} {t:7s} {name:9s}: decode {res['decode_tokens_per_s']:7.1f} tok/s, "
                      f"prefill {res['prefill_tokens_per_s']:7.1f} tok/s{extra} (load {load_before:.1f})",
                      file=sys.stderr)

    def summary(rs: list[dict]) -> dict:
        out = {}
        for k in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            out[k] = max(r[k] for r in rs)
            out[k.replace("_tokens_per_s", "_median")] = statistics.median(r[k] for r in rs)
        if "products_ms_per_step" in rs[0]:
            out["decode_products_share"] = statistics.median(r["products_ms_per_step"] / r["decode_ms_per_step"]
                                                             for r in rs)
        return out

    print(f"megrez against {baseline_name}, {a.threads} threads, best of {a.rounds} rounds (median in brackets)")
    print("type    | megrez decode  | llama.cpp decode | ratio        | megrez prefill | llama.cpp prefill | ratio")
    rows = []
    for t in files:
        m, l = summary(runs[(t, "megrez")]), summary(runs[(t, "llama.cpp")])
        row = {"type": t, "megrez": m, "llama_cpp": l,
               "decode_ratio": m["decode_tokens_per_s"] / l["decode_tokens_per_s"],
               "prefill_ratio": m["prefill_tokens_per_s"] / l["prefill_tokens_per_s"],
               "decode_ratio_median": m["decode_median"] / l["decode_median"],
               "prefill_ratio_median": m["prefill_median"] / l["prefill_median"],
               "rounds": {"megrez": runs[(t, "megrez")], "llama_cpp": runs[(t, "llama.cpp")]}}
        rows.append(row)
        print(f"{t:7s} | {m['decode_tokens_per_s']:6.1f} ({m['decode_median']:5.1f}) | "
              f"{l['decode_tokens_per_s']:7.1f} ({l['decode_median']:5.1f}) | "
              f"{row['decode_ratio']:5.2f} ({row['decode_ratio_median']:4.2f}) | "
              f"{m['prefill_tokens_per_s']:6.1f} ({m['prefill_median']:5.1f}) | "
              f"{l['prefill_tokens_per_s']:8.1f} ({l['prefill_median']:5.1f}) | "
              f"{row['prefill_ratio']:5.2f} ({row['prefill_ratio_median']:4.2f})")
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": device_name(torch.device("cpu")),
                      "baseline": baseline_name, "llama_env": a.llama_env if a.llama_bench else None,
                      "kernels": kernels.variant, "threads": a.threads, "layers": a.layers, "decode": a.decode,
                      "prefill": a.prefill, "rounds": a.rounds, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
