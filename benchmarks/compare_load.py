"""The load benchmark against two builds of the server, interleaved, with their ratio.

    git worktree add /tmp/megrez-base main
    python benchmarks/compare_load.py --baseline-src /tmp/megrez-base/src --model DIR \\
        --concurrency 1 8 32 --duration 20 --rounds 2

Starts ``megrez serve`` twice on the same checkpoint and flags: from ``--baseline-src`` (an
older checkout's ``src``) and from this checkout. For every round and concurrency it runs
``benchmarks/load.py`` against one, then the other (the order alternating), so both see the
same machine load; only one runs at a time. Prints the median output tokens/s and TTFT p50 of
each and the ratio new / baseline, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import serve_process

HERE = Path(__file__).resolve().parent


def start(src: Path, a) -> tuple[subprocess.Popen, str]:
    return serve_process.start(["--model", a.model, "--threads", str(a.threads), "--log-level", "warning",
                                "--max-num-seqs", str(a.max_num_seqs), "--max-model-len", str(a.max_model_len),
                                *a.server_flag], src=str(src))


def load(url: str, concurrency: int, a) -> dict:
    cmd = [sys.executable, str(HERE / "load.py"), "--url", url, "--concurrency", str(concurrency), "--duration",
           str(a.duration), "--max-tokens", str(a.max_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.duration * 20 + 120)
    if out.returncode != 0:
        raise SystemExit(f"load.py failed against {url}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-src", required=True, type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--server-flag", action="append", default=[], help="extra flag for both servers (repeatable)")
    a = p.parse_args(argv)
    builds = {"baseline": a.baseline_src.resolve(), "new": (HERE.parent / "src").resolve()}
    servers = {name: start(src, a) for name, src in builds.items()}
    runs = {name: {c: [] for c in a.concurrency} for name in builds}
    try:
        for rnd in range(a.rounds):
            for k, c in enumerate(a.concurrency):
                order = list(builds) if (rnd + k) % 2 == 0 else list(builds)[::-1]
                for name in order:
                    runs[name][c].append(load(servers[name][1], c, a))
    finally:
        for proc, _ in servers.values():
            serve_process.stop(proc)
    rows = []
    print(f"{'conc':>4s} {'base tok/s':>11s} {'new tok/s':>10s} {'ratio':>7s} {'base TTFT p50':>14s} "
          f"{'new TTFT p50':>13s} {'errors':>7s}")
    for c in a.concurrency:
        tps = {n: statistics.median(r["output_tokens_per_s"] for r in runs[n][c]) for n in builds}
        ttft = {n: statistics.median(r["ttft_s"]["p50"] for r in runs[n][c]) for n in builds}
        errors = sum(r["errors"] for n in builds for r in runs[n][c])
        rows.append({"concurrency": c, "tokens_per_s": tps, "ttft_p50_s": ttft, "ratio": tps["new"] / tps["baseline"],
                     "errors": errors, "runs": {n: [r["output_tokens_per_s"] for r in runs[n][c]] for n in builds}})
        print(f"{c:4d} {tps['baseline']:11.1f} {tps['new']:10.1f} {tps['new'] / tps['baseline']:6.3f}x "
              f"{ttft['baseline'] * 1000:12.1f}ms {ttft['new'] * 1000:11.1f}ms {errors:7d}")
    print(json.dumps({"model": a.model, "baseline_src": str(builds["baseline"]), "rounds": a.rounds,
                      "duration_s": a.duration, "max_tokens": a.max_tokens, "threads": a.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
