"""Time to first token over a multi-turn chat, with and without prefix caching.

    python benchmarks/prefix_chat.py --model DIR --turns 10 --system-tokens 1000 --rounds 3

Starts two ``megrez serve`` processes on the same checkpoint, one with prefix caching (the
default) and one with ``--no-prefix-caching``, and plays the same conversation against both:
a system prompt of about ``--system-tokens`` tokens, then ``--turns`` user turns, each resending
the whole conversation (as chat clients do) and appending the answer. The two servers take
turns request by request (the order alternating), so both see the same machine load; only
one request runs at a time. Each round uses a fresh system prompt. Both conversations go on
with the cached server's answer, so both servers see the same prompts; whether their (greedy)
answers were equal is counted. Prints, per turn, the median time to first token (streamed,
measured on the client) of each server and their ratio, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import httpx
import serve_process

WORDS = ("the model answers questions about language code numbers and the quick brown fox jumps over a lazy "
         "dog while experts share layers across the network of routed and shared experts").split()


def start(a, caching: bool) -> tuple[subprocess.Popen, str]:
    flags = ["--model", a.model, "--threads", str(a.threads), "--log-level", "warning", "--max-num-seqs", "4",
             "--served-model-name", "m"]
    if a.max_model_len:
        flags += ["--max-model-len", str(a.max_model_len)]
    return serve_process.start(flags if caching else flags + ["--no-prefix-caching"])


def system_prompt(client: httpx.Client, url: str, tokens: int, rng: random.Random) -> str:
    words = []
    while True:
        words += [rng.choice(WORDS) for _ in range(50)]
        n = client.post(url + "/v1/tokenize", json={"prompt": " ".join(words)}).json()["count"]
        if n >= tokens:
            return " ".join(words)


def turn(client: httpx.Client, url: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    """(time to first token, answer, cached prompt tokens) of one streamed chat request."""
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t = time.perf_counter()
    ttft, text, cached = None, [], 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"stream error: {chunk['error']}")
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t
                    text.append(c["delta"]["content"])
            if chunk.get("usage"):
                cached = chunk["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return ttft, "".join(text), cached


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--user-words", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=32, help="answer length per turn")
    p.add_argument("--rounds", type=int, default=3, help="conversations (fresh system prompts) per server")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    servers = {"cached": start(a, True), "uncached": start(a, False)}
    ttft = {name: [[] for _ in range(a.turns)] for name in servers}
    cached_tokens = [[] for _ in range(a.turns)]
    matches = [[] for _ in range(a.turns)]  # whether the two servers' answers were equal
    prompt_tokens = [0] * a.turns
    try:
        with httpx.Client(timeout=600) as client:
            for rnd in range(a.rounds):
                rng = random.Random(a.seed * 1000 + rnd)
                system = system_prompt(client, servers["cached"][1], a.system_tokens, rng)
                convs = {name: [{"role": "system", "content": system}] for name in servers}
                for i in range(a.turns):
                    user = " ".join(rng.choice(WORDS) for _ in range(a.user_words))
                    order = list(servers) if (rnd + i) % 2 == 0 else list(servers)[::-1]
                    answers = {}
                    for name in order:
                        convs[name].append({"role": "user", "content": user})
                        t, answers[name], cached = turn(client, servers[name][1], convs[name], a.max_tokens)
                        ttft[name][i].append(t)
                        if name == "cached":
                            cached_tokens[i].append(cached)
                    matches[i].append(answers["cached"] == answers["uncached"])
                    # Both conversations go on with the same answer, so every turn's prompts are equal.
                    for name in servers:
                        convs[name].append({"role": "assistant", "content": answers["cached"]})
                    prompt_tokens[i] = client.post(servers["cached"][1] + "/v1/tokenize",
                                                   json={"messages": convs["cached"][:-1]}).json()["count"]
    finally:
        for proc, _ in servers.values():
            serve_process.stop(proc)
    rows = []
    print(f"{'turn':>4s} {'prompt':>7s} {'cached':>7s} {'TTFT cached (ms)':>17s} {'TTFT uncached (ms)':>19s} "
          f"{'ratio':>7s} {'equal answers':>14s}")
    for i in range(a.turns):
        hot, cold = statistics.median(ttft["cached"][i]), statistics.median(ttft["uncached"][i])
        rows.append({"turn": i + 1, "prompt_tokens": prompt_tokens[i],
                     "cached_tokens": statistics.median(cached_tokens[i]), "ttft_cached_s": hot,
                     "ttft_uncached_s": cold, "ratio": cold / hot, "equal_answers": sum(matches[i])})
        print(f"{i + 1:4d} {prompt_tokens[i]:7d} {rows[-1]['cached_tokens']:7.0f} {hot * 1000:17.1f} "
              f"{cold * 1000:19.1f} {cold / hot:7.2f}x {sum(matches[i]):>8d} of {len(matches[i])}")
    print(json.dumps({"model": a.model, "rounds": a.rounds, "system_tokens": a.system_tokens,
                      "max_tokens": a.max_tokens, "threads": a.threads, "cpus": os.cpu_count(), "turns": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
