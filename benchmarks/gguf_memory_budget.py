"""Megrez2 at its released shape (3x7B-A3B), Q4_K_M in a GGUF file, decoded all in RAM and
under ``--memory-budget`` (routed experts read from the file, in its types, by the pre-gate).

    python benchmarks/gguf_memory_budget.py --gguf /tmp/megrez2-3x7b-q4_k_m.gguf --budgets 3GiB 2GiB --threads 2

The file is written first if it does not exist (random normal(0, 0.02) weights quantized by the
recipe, the bundled tokenizer; about 4.3 GB and a few minutes). Each configuration runs in a
fresh process (so its peak RSS is its own), the configurations interleaved over ``--reps``
rounds; each process decodes one greedy request of ``--output`` tokens after a ``--prompt``-token
prompt and reports decode tokens/s, the peak RSS over the process's start, and the expert
cache's statistics. Every budget's tokens must equal the all-in-RAM ones. The last line is one
JSON object. Random weights route near uniformly: a worst case for the cache (a trained
model reuses its experts more).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SHAPE = "megrez2-3x7b-a3b"  # the released shape (--shape for a smaller one)

CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import torch
torch.set_num_threads(int(sys.argv[3]))
from megrez import LLM, SamplingParams
from megrez.engine.offload import parse_bytes
path, budget, prompt, output, kv = sys.argv[1], sys.argv[2], int(sys.argv[4]), int(sys.argv[5]), parse_bytes(sys.argv[6])
before = status("VmRSS:")
t = time.perf_counter()
llm = LLM(path, device="cpu", memory_budget=None if budget == "none" else budget, kv_cache_memory=kv,
          max_num_seqs=1, max_model_len=prompt + output + 8)
load = time.perf_counter() - t
ids = [(97 * i + 13) % (min(llm.model.args.vocab_size, 8000) - 100) + 50 for i in range(prompt)]
llm.generate(ids[:4], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # first-use work
if llm.offload is not None:
    llm.offload.reset_stats()
t = time.perf_counter()
first = None
for step in llm.stream_outputs(ids, SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)):
    if first is None:
        first = time.perf_counter()
end = time.perf_counter()
tokens = list(llm.last_request.output_ids)
print(json.dumps({"budget": budget, "load_s": load, "ttft_s": first - t,
                  "decode_tok_s": (len(tokens) - 1) / (end - first), "total_s": end - t,
                  "rss_before": before, "peak_rss": status("VmHWM:"), "tokens": tokens,
                  "stats": llm.offload.stats if llm.offload else None}))
"""


def write_file(path: Path, shape: str, threads: int) -> None:
    import torch

    from megrez.bench import random_model
    from megrez.llm import default_model
    from megrez.loading.gguf import write_gguf

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model = random_model(shape, torch.device("cpu"), torch.float32, quantization="q4_k_m")
    write_gguf(model, path, "q4_k_m", default_model(), name=f"{shape}-random")
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True, help="the Q4_K_M file (written first if missing)")
    ap.add_argument("--shape", default=SHAPE, help="the named Megrez2 shape of a file written here")
    ap.add_argument("--budgets", nargs="+", default=["3GiB", "2GiB"], help="--memory-budget values to run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--kv-cache-memory", default="64MiB", help="KV cache of every run (inside the budget)")
    a = ap.parse_args()
    if not a.gguf.is_file():
        write_file(a.gguf, a.shape, a.threads)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    runs: dict[str, list[dict]] = {}
    for rep in range(a.reps):
        for budget in ["none", *a.budgets]:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(a.gguf), budget, str(a.threads), str(a.prompt),
                                   str(a.output), a.kv_cache_memory], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.splitlines()[-1])
            runs.setdefault(budget, []).append(r)
            s = r["stats"] or {}
            print(f"round {rep + 1} budget {budget}: decode {r['decode_tok_s']:.2f} tok/s, ttft {r['ttft_s']:.1f} s, "
                  f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB (start {r['rss_before'] / 2**30:.2f}), load "
                  f"{r['load_s']:.1f} s" + (f", {s['slots']} slots, hit rate {s['hit_rate']:.1%}, read "
                                             f"{s['bytes_read'] / 2**30:.2f} GiB at {s['read_bandwidth'] / 1e9:.2f} GB/s, "
                                             f"exposed I/O {s['copy_seconds_exposed']:.1f} s" if s else ""), flush=True)
    reference = runs["none"][0]["tokens"]
    same = all(r["tokens"] == reference for rs in runs.values() for r in rs)
    summary = {"shape": a.shape, "file_bytes": a.gguf.stat().st_size, "threads": a.threads, "prompt": a.prompt,
               "output": a.output, "date": time.strftime("%Y-%m-%d"), "tokens_identical": same, "results": []}
    base = statistics.median(r["decode_tok_s"] for r in runs["none"])
    for budget, rs in runs.items():
        dec = statistics.median(r["decode_tok_s"] for r in rs)
        summary["results"].append({
            "budget": budget, "decode_tok_s": dec, "vs_all_in_ram": dec / base,
            "peak_rss_over_start": statistics.median(r["peak_rss"] - r["rss_before"] for r in rs),
            "ttft_s": statistics.median(r["ttft_s"] for r in rs),
            "hit_rate": statistics.median(r["stats"]["hit_rate"] for r in rs) if rs[0]["stats"] else None,
            "slots": rs[0]["stats"]["slots"] if rs[0]["stats"] else None})
    print(json.dumps(summary))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
