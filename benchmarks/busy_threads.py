"""Decode speed with the default thread settings against ``--threads 1``, on a quiet machine and
with another process keeping one core busy (the case of a shared laptop or CI runner).

    python benchmarks/busy_threads.py                       # the bundled model, 3 interleaved rounds
    python benchmarks/busy_threads.py --model DIR --max-tokens 128 --rounds 5
    python benchmarks/busy_threads.py --env GOMP_SPINCOUNT=300000   # OpenMP's own default waiting

Each measurement is a fresh ``megrez generate`` process (greedy, fixed prompt) whose
``--verbose`` line gives decode tokens/s; the cases are interleaved round by round so that
changes in the machine's load hit all of them alike. The busy core is a separate Python process
spinning in a loop, started before and stopped after each busy measurement. Prints a table and
one JSON line: per condition, the median tokens/s of each setting and the default's ratio to
the better of the two (the target: >= 0.5 busy, and no loss when quiet).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

SPIN = "while True: pass"


def decode_rate(args, threads: int | None, env: dict) -> float:
    cmd = [sys.executable, "-m", "megrez.cli", "generate", args.prompt, "--max-tokens", str(args.max_tokens),
           "--temperature", "0", "--device", "cpu", "-v"]
    if args.model:
        cmd += ["--model", args.model]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    m = re.search(r"decode ([0-9.]+) tokens/s", proc.stderr)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return float(m.group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600, help="seconds per generate process")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the measured processes (repeatable)")
    a = p.parse_args(argv)
    env = {**os.environ, **dict(kv.split("=", 1) for kv in a.env)}
    settings = {"default": None, "threads=1": 1}
    rates: dict[tuple[str, str], list[float]] = {}
    for r in range(a.rounds):
        for condition in ("quiet", "busy"):
            for name, threads in settings.items():
                spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if condition == "busy" else None
                try:
                    if spinner:
                        time.sleep(0.2)
                    rate = decode_rate(a, threads, env)
                finally:
                    if spinner:
                        spinner.kill()
                        spinner.wait()
                rates.setdefault((condition, name), []).append(rate)
                print(f"round {r + 1}: {condition:5s} {name:9s} {rate:8.1f} tokens/s", file=sys.stderr)
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "env": a.env, "max_tokens": a.max_tokens, "rounds": a.rounds}
    print(f"{'condition':10s} {'default':>10s} {'threads=1':>10s} {'default / best':>15s}")
    for condition in ("quiet", "busy"):
        med = {name: statistics.median(rates[(condition, name)]) for name in settings}
        ratio = med["default"] / max(med.values())
        summary[condition] = {**{f"{n}_tokens_per_s": v for n, v in med.items()}, "default_over_best": ratio,
                              "runs": {n: rates[(condition, n)] for n in settings}}
        print(f"{condition:10s} {med['default']:10.1f} {med['threads=1']:10.1f} {ratio:15.2f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
