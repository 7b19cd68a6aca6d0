"""Timeouts for tests that stretch with the machine's load instead of fixed wall-clock limits.

A timeout here is the time the work may take on an idle machine (with a margin). It is
measured on a clock that runs at the share of the CPU this machine can give: with 2 cores
and 6 runnable tasks, a wall-clock second counts as a third of one. So a test that needs 20 s
on an idle machine and is given 120 s still passes when the machine is three times
oversubscribed, and a hang is still caught. ``MEGREZ_TEST_TIMEOUT_SCALE`` multiplies every
budget (e.g. 3 on a much slower machine); a hard cap of 20 budgets in wall time catches a
hang under any load.
"""
from __future__ import annotations

import os
import subprocess
import time

SCALE = float(os.environ.get("MEGREZ_TEST_TIMEOUT_SCALE", "1"))
HARD_CAP = 20


def cpu_share() -> float:
    """The fraction of a fair share of the cores that a task gets now: cores / runnable tasks
    (instantaneous and 1-minute averages blended), at most 1."""
    cores = os.cpu_count() or 1
    try:
        fields = open("/proc/loadavg").read().split()
        load1, running = float(fields[0]), int(fields[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 1.0
    return min(1.0, cores / max(cores, (load1 + running) / 2))


class Deadline:
    """``expired()`` once ``seconds`` of load-adjusted time have passed."""

    def __init__(self, seconds: float):
        self.budget = seconds * SCALE
        self.start = self.last = time.monotonic()
        self.used = 0.0

    def expired(self) -> bool:
        now = time.monotonic()
        self.used += (now - self.last) * cpu_share()
        self.last = now
        return self.used > self.budget or now - self.start > HARD_CAP * self.budget

    def remaining(self) -> float:
        """Wall seconds left if the load stayed as it is now (for a single blocking wait)."""
        self.expired()
        return max(0.0, (self.budget - self.used) / max(cpu_share(), 1e-3))


def run(cmd, timeout: float, input: str | None = None, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` with a load-adjusted timeout."""
    deadline = Deadline(timeout)
    with subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        pending = input
        while True:
            try:
                out, err = proc.communicate(pending, timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pending = None  # already handed over: communicate keeps writing it
                if deadline.expired():
                    proc.kill()
                    out, err = proc.communicate()
                    raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


def wait_until(condition, timeout: float, interval: float = 0.05, message: str = "timed out") -> None:
    """Poll ``condition()`` until it is true; fail after ``timeout`` load-adjusted seconds."""
    deadline = Deadline(timeout)
    while not condition():
        assert not deadline.expired(), message
        time.sleep(interval)
