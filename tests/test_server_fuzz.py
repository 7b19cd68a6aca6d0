"""schemathesis against /openapi.json: whatever a client sends, no answer is a 5xx.

Bounded (a fixed number of examples per route, a short context, deterministic generation),
so it takes about a minute; docs/serving.md gives the command for a longer run with every
check.

    PYTHONPATH=src python -m pytest -q tests/test_server_fuzz.py
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("uvicorn")

from test_server import KEY, LiveServer  # noqa: E402

from megrez.server.protocol import Limits  # noqa: E402

EXAMPLES = 20


@pytest.mark.slow
def test_no_request_gets_a_server_error(tiny_moe, tmp_path):
    # A short context and small limits keep every generated request cheap.
    s = LiveServer(tiny_moe, max_model_len=96, max_waiting=64,
                   config={"limits": Limits(max_request_tokens=128, max_response_bytes=1 << 20)})
    try:
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", s.url + "/openapi.json", "--checks",
               "not_a_server_error", "-n", str(EXAMPLES), "--generation-deterministic", "--request-timeout", "120",
               "--phases", "coverage,fuzzing", "--suppress-health-check", "all", "--no-color",
               "-H", f"Authorization: Bearer {KEY}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                              env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
        summary = proc.stdout[-3000:]
        assert proc.returncode == 0, summary
        assert "No issues found" in proc.stdout or " passed" in proc.stdout, summary
        assert s.app.state.server.errors[500] == 0
    finally:
        s.close()
