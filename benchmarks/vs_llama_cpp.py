"""Side by side with llama.cpp on the same GGUF files: decode and prefill tokens/s of a random
Llama checkpoint (Megrez-3B's architecture at ~340M parameters by default) in F32, Q8_0 and
Q4_K_M, same threads, runs interleaved.

    pip install llama-cpp-python          # builds llama.cpp from source (a benchmark oracle, not a dependency)
    python benchmarks/vs_llama_cpp.py --threads 2
    python benchmarks/vs_llama_cpp.py --types q8_0 --layers 4 --decode 32 --prefill 128   # a quick look

The checkpoint is written once into --work (random weights, megrez's tiny tokenizer), each type
by ``megrez quantize`` (the GGUF llama.cpp reads; seconds per 100M weights with the C
quantizer). Both engines then load the same file: ours with ``LLM(file.gguf)``, llama.cpp with
``llama_cpp.Llama(file.gguf)``. Decode: greedy tokens after a short prompt, timed from the
second token; prefill: one prompt of --prefill tokens. Each round runs every type in both
engines, alternating which goes first; the best round counts. The last line is one JSON
object; ours/llama.cpp >= 1.0 at decode for Q8_0 and Q4_K_M is the target.
"""
from __future__ import annotations

import megrez  # noqa: F401  (first: it sets the OpenMP waiting policy before torch starts OpenMP)

# isort: split
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from megrez import LLM, SamplingParams
from megrez.bench import device_name
from megrez.tiny import create_tiny


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


def ours(path: Path, threads: int, decode: int, prefill: int) -> dict:
    torch.set_num_threads(threads)
    llm = LLM(str(path), device="cpu", max_model_len=prefill + decode + 16)
    engine, vocab = llm.engine, llm.model.args.vocab_size

    def run(ids, n):
        """(seconds of the first step: prefill and first token, seconds of the other n - 1)"""
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        t = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        while engine.has_work():
            engine.step()
        return t1 - t, time.perf_counter() - t1

    run(prompt_ids(8, vocab), 4)  # warm-up
    _, decode_s = run(prompt_ids(8, vocab), decode)
    prefill_s, _ = run(prompt_ids(prefill, vocab), 1)
    return {"decode_tokens_per_s": (decode - 1) / decode_s, "prefill_tokens_per_s": prefill / prefill_s}


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", nargs="+", default=["f32", "q8_0", "q4_k_m"], choices=["f32", "f16", "q8_0", "q4_0", "q4_k_m"])
    p.add_argument("--layers", type=int, default=30, help="decoder layers (30: ~340M parameters)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", type=int, default=64, help="tokens decoded per run")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default="runs-out/vs-llama-cpp", help="where the checkpoint and GGUF files are kept")
    a = p.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(work, a.layers)
    files = {t: gguf(work, ckpt, t) for t in a.types}
    best: dict[tuple[str, str], dict] = {}
    for r in range(a.rounds):
        for t, path in files.items():
            engines = [("megrez", ours), ("llama.cpp", theirs)]
            for name, run in engines if r % 2 == 0 else engines[::-1]:
                res = run(path, a.threads, a.decode, a.prefill)
                print(f"round {r + 1} {t:7s} {name:9s}: decode {res['decode_tokens_per_s']:7.1f} tok/s, "
                      f"prefill {res['prefill_tokens_per_s']:7.1f} tok/s", file=sys.stderr)
                key = (t, name)
                if key not in best or res["decode_tokens_per_s"] > best[key]["decode_tokens_per_s"]:
                    best[key] = res
    print("type    | megrez decode | llama.cpp decode | ratio | megrez prefill | llama.cpp prefill | ratio")
    rows = []
    for t in files:
        m, l = best[(t, "megrez")], best[(t, "llama.cpp")]
        row = {"type": t, "megrez": m, "llama_cpp": l,
               "decode_ratio": m["decode_tokens_per_s"] / l["decode_tokens_per_s"],
               "prefill_ratio": m["prefill_tokens_per_s"] / l["prefill_tokens_per_s"]}
        rows.append(row)
        print(f"{t:7s} | {m['decode_tokens_per_s']:13.1f} | {l['decode_tokens_per_s']:16.1f} | {row['decode_ratio']:5.2f} | "
              f"{m['prefill_tokens_per_s']:14.1f} | {l['prefill_tokens_per_s']:17.1f} | {row['prefill_ratio']:5.2f}")
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": device_name(torch.device("cpu")),
                      "threads": a.threads, "layers": a.layers, "decode": a.decode, "prefill": a.prefill, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
