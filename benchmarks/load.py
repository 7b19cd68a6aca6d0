"""Load test for an OpenAI-compatible server: N concurrent streaming clients for T seconds.

    python benchmarks/load.py --url http://127.0.0.1:8000 --concurrency 16 --duration 60 --max-tokens 128

Each client sends one streaming request after another (prompts of random words, a distinct
seed per request) until the duration is up; requests in flight then finish and count. Prints
a table, then one JSON line with every figure (for scripts). Times are measured on the client:
TTFT is request sent -> first chunk with text; ITL is the gap between consecutive chunks with
text (a chunk can carry more than one token when the server holds back a partial character);
TPOT is (latency - TTFT) / (output tokens - 1) per request. Output tokens are the server's
usage counts (stream_options.include_usage).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = ("the model answers questions about language code numbers and the quick brown fox "
         "jumps over a lazy dog while experts share layers 你好 世界 今天 天气 很好 学习 模型").split()


@dataclass
class Result:
    ok: bool
    start: float = 0.0
    ttft: float | None = None
    latency: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def make_body(a, rng: random.Random, model: str, seed: int) -> tuple[str, dict]:
    words = " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.gauss(a.prompt_words, a.prompt_words / 4)))))
    body = {"model": model, "max_tokens": a.max_tokens, "temperature": a.temperature, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    if not a.stop_at_eos:
        body["ignore_eos"] = True  # fixed output lengths make runs comparable (a vLLM extension)
    if a.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": words}]
        return "/v1/chat/completions", body
    body["prompt"] = words
    return "/v1/completions", body


async def one_request(client: httpx.AsyncClient, path: str, body: dict) -> Result:
    r = Result(ok=False, start=time.perf_counter())
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                r.error = f"HTTP {resp.status_code}: {text[:200]}"
                return r
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = f"stream error: {chunk['error'].get('message')}"
                    return r
                if chunk.get("usage"):
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                    r.prompt_tokens = chunk["usage"]["prompt_tokens"]
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        if r.ttft is None:
                            r.ttft = now - r.start
                        r.chunk_times.append(now)
            if not done:
                r.error = "stream ended without [DONE]"
                return r
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.latency = time.perf_counter() - r.start
    r.ok = True
    return r


class ServerError(Exception):
    """The server cannot be load-tested as asked (unreachable, wrong key, no model)."""


async def preflight(client: httpx.AsyncClient, a) -> str:
    """Checks the server answers and accepts the key before any load is sent; returns the model."""
    try:
        resp = await client.get("/v1/models")
    except httpx.HTTPError as e:
        raise ServerError(f"cannot reach {a.url} ({type(e).__name__}: {e}); is the server running?") from None
    if resp.status_code == 401:
        raise ServerError(f"{a.url} requires an API key and " + (
            "refused the one given (--api-key / $MEGREZ_API_KEY)" if a.api_key else
            "none was given: pass --api-key KEY or set MEGREZ_API_KEY"))
    if resp.status_code != 200:
        raise ServerError(f"{a.url}/v1/models answered HTTP {resp.status_code}: {resp.text[:200]}")
    models = [m.get("id") for m in resp.json().get("data", [])]
    if a.model is not None:
        return a.model
    if not models:
        raise ServerError(f"{a.url}/v1/models lists no model; pass --model")
    return models[0]


async def run(a) -> dict:
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(max_connections=a.concurrency, max_keepalive_connections=a.concurrency)
    async with httpx.AsyncClient(base_url=a.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(a.timeout)) as client:
        model = await preflight(client, a)
        results: list[Result] = []
        seeds = iter(range(a.seed, a.seed + 10 ** 9))
        start = time.perf_counter()
        deadline = start + a.duration

        async def client_loop(i: int):
            rng = random.Random(a.seed * 1000 + i)
            while time.perf_counter() < deadline:
                path, body = make_body(a, rng, model, next(seeds))
                results.append(await one_request(client, path, body))

        await asyncio.gather(*(client_loop(i) for i in range(a.concurrency)))
        wall = time.perf_counter() - start
    return summarise(a, model, results, wall)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(values)

    def q(p):  # linear interpolation between closest ranks
        k = (len(s) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"mean": statistics.fmean(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def summarise(a, model: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    itl = [t1 - t0 for r in ok for t0, t1 in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "url": a.url, "model": model, "endpoint": a.endpoint, "concurrency": a.concurrency,
        "duration_s": a.duration, "wall_s": wall, "max_tokens": a.max_tokens, "prompt_words": a.prompt_words,
        "requests": len(ok), "errors": len(errors), "error_samples": sorted(set(errors))[:5],
        "requests_per_s": len(ok) / wall, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / wall,
        "prompt_tokens_mean": statistics.fmean([r.prompt_tokens for r in ok]) if ok else None,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles(itl), "tpot_s": percentiles(tpot),
        "latency_s": percentiles([r.latency for r in ok]),
        "client": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
    }


def print_table(s: dict) -> None:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.1f}"

    print(f"model {s['model']}  endpoint {s['endpoint']}  concurrency {s['concurrency']}  "
          f"duration {s['duration_s']:g}s (wall {s['wall_s']:.1f}s)  max_tokens {s['max_tokens']}")
    print(f"requests {s['requests']}  errors {s['errors']}  {s['requests_per_s']:.2f} req/s  "
          f"{s['output_tokens_per_s']:.1f} output tok/s  mean prompt {s['prompt_tokens_mean'] or 0:.0f} tokens")
    print(f"{'':12s}{'mean':>10s}{'p50':>10s}{'p90':>10s}{'p99':>10s}   (ms)")
    for label, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("latency", "latency_s")):
        p = s[key]
        print(f"{label:12s}{ms(p['mean']):>10s}{ms(p['p50']):>10s}{ms(p['p90']):>10s}{ms(p['p99']):>10s}")
    for e in s["error_samples"]:
        print(f"error: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--api-key", default=os.environ.get("MEGREZ_API_KEY"), help="default: $MEGREZ_API_KEY")
    p.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    p.add_argument("--concurrency", "-c", type=int, default=8, help="clients sending requests in parallel")
    p.add_argument("--duration", "-d", type=float, default=30.0, help="seconds during which requests are started")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32, help="mean words per prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at-eos", action="store_true", help="let requests end early at end-of-turn tokens")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    a = p.parse_args(argv)
    if a.concurrency < 1 or a.duration <= 0 or a.max_tokens < 1:
        p.error("--concurrency, --duration and --max-tokens must be positive")
    try:
        summary = asyncio.run(run(a))
    except ServerError as e:
        print(f"load.py: error: {e}", file=sys.stderr)
        return 2
    print_table(summary)
    print(json.dumps(summary))
    return 0 if summary["errors"] == 0 and summary["requests"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
