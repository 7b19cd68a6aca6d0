"""``megrez serve`` as a subprocess on a free loopback port, for the benchmark scripts."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(flags: list[str], src: str | None = None, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Starts ``megrez serve FLAGS`` (from the source tree ``src`` when given) and waits until
    /health answers; returns the process and its base URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": src} if src else None
    proc = subprocess.Popen([sys.executable, "-m", "megrez.cli", "serve", "--port", str(port), *flags], env=env,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"megrez serve {' '.join(flags)} exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"megrez serve {' '.join(flags)} did not become healthy in {timeout:g} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
