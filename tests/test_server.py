"""The OpenAI-compatible server, started for real on a loopback port and driven with the
official ``openai`` client (and raw HTTP where the client would hide the wire format).

    PYTHONPATH=src python -m pytest -q tests/test_server.py
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import timing

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from megrez.engine import Engine, SamplingParams  # noqa: E402
from megrez.llm import LLM  # noqa: E402
from megrez.loading import load_model  # noqa: E402
from megrez.server.app import ServerConfig, create_app  # noqa: E402
from megrez.server.http import loopback_socket, make_server  # noqa: E402
from megrez.server.protocol import TokenText  # noqa: E402
from megrez.tiny import create_tiny  # noqa: E402
from megrez.tokenizer import Tokenizer  # noqa: E402

KEY = "sk-test-key"
MODEL = "megrez-tiny"
MAX_LEN = 1024
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return create_tiny(tmp_path_factory.mktemp("server") / "tiny-moe", arch="moe", seed=0)


class LiveServer:
    """uvicorn on a thread, on a socket bound to a free loopback port."""

    def __init__(self, model_dir: Path, max_request_bytes: int = 64 << 10, http: dict | None = None,
                 config: dict | None = None, **engine_kwargs):
        tokenizer = Tokenizer(model_dir)
        model = load_model(model_dir, device="cpu")
        engine_kwargs = {"max_num_seqs": 8, "max_model_len": MAX_LEN, **engine_kwargs}
        self.engine = Engine(model, tokenizer, **engine_kwargs)
        self.tokenizer = tokenizer
        self.app = create_app(self.engine, ServerConfig([MODEL, "alias"], api_key=KEY,
                                                        max_request_bytes=max_request_bytes, **(config or {})))
        sock = loopback_socket()
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.app, log_level="warning", on_drain=self.app.state.server.drain,
                                  **{"shutdown_timeout": 1.0, **(http or {})})
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_healthy(self.url)

    @property
    def loop(self):
        return self.app.state.server.loop

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


def wait_healthy(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = timing.Deadline(timeout)
    while not deadline.expired():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become healthy in {timeout}s")


def wait_for(condition, timeout: float = 10.0) -> None:
    timing.wait_until(condition, timeout, interval=0.01, message="timed out waiting for the server")


@pytest.fixture(scope="module")
def live(tiny_dir):
    s = LiveServer(tiny_dir)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def chat(client, content="Hello, how are you?", **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


IGNORE_EOS = {"extra_body": {"ignore_eos": True}}


# ---------------------------------------------------------------------------------------- basics
def test_health_models_and_auth(live, client):
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "alias"]
    assert client.models.retrieve("alias").id == "alias"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        r = httpx.get(live.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_matches_offline_llm_and_counts_usage(live, client, tiny_dir):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=11, temperature=0.9,
                                       top_p=0.95, **IGNORE_EOS)
    offline = LLM(tiny_dir, max_num_seqs=1, max_model_len=MAX_LEN).chat(
        messages, SamplingParams(max_tokens=10, seed=11, temperature=0.9, top_p=0.95, ignore_eos=True))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == offline.text
    assert r.choices[0].finish_reason == "length"
    prompt_tokens = len(live.tokenizer.encode_chat(messages))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_tokens, 10,
                                                                                      prompt_tokens + 10)


def test_content_as_text_parts_equals_string(client):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "how are you?"}]
    a = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=8,
                                       seed=3)
    b = chat(client, "Hello, how are you?", max_tokens=8, seed=3)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_max_completion_tokens_and_alias_model(client):
    r = client.chat.completions.create(model="alias", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=5, seed=0, **IGNORE_EOS)
    assert r.model == "alias" and r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_same_seed_same_answer_different_seed_differs(client):
    a, b, c = (chat(client, seed=s, max_tokens=16, temperature=1.0, **IGNORE_EOS) for s in (5, 5, 6))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content


def test_penalties_change_the_answer(client):
    plain = chat(client, seed=2, max_tokens=24, temperature=0, **IGNORE_EOS).choices[0].message.content
    penalised = chat(client, seed=2, max_tokens=24, temperature=0, presence_penalty=2.0, frequency_penalty=2.0,
                     **IGNORE_EOS).choices[0].message.content
    assert plain != penalised


# ---------------------------------------------------------------------------------------- streaming
def test_chat_stream_equals_non_stream_with_usage(client):
    full = chat(client, seed=9, max_tokens=20, **IGNORE_EOS)
    chunks = list(chat(client, seed=9, max_tokens=20, stream=True, stream_options={"include_usage": True},
                       **IGNORE_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format_ends_with_done(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[-2][6:])  # not asked for: not sent


def test_completions_plain_stream_batch_and_token_ids(live, client):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, seed=4, **IGNORE_EOS)
    assert r.object == "text_completion" and r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == len(live.tokenizer.encode(prompt))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=7, seed=4, stream=True, **IGNORE_EOS) if c.choices)
    assert streamed == r.choices[0].text
    ids = live.tokenizer.encode(prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=7, seed=4, **IGNORE_EOS)
    assert by_ids.choices[0].text == r.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[prompt, "你好"], max_tokens=7, seed=4, n=2, **IGNORE_EOS)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == r.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + len(live.tokenizer.encode("你好"))
    assert batch.usage.completion_tokens == 28


def test_completions_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt="Numbers:", seed=1, **IGNORE_EOS)
    assert r.usage.completion_tokens == 16


# ---------------------------------------------------------------------------------------- stop, n
def test_stop_strings_cut_the_answer(client):
    full = chat(client, seed=21, max_tokens=40, temperature=0, **IGNORE_EOS).choices[0].message.content
    clean = [i for i in range(3, len(full) - 3) if "\ufffd" not in full[i:i + 3]]
    assert clean, f"no usable stop string in {full!r}"
    stop = full[clean[0]:clean[0] + 3]
    expected = full[: full.find(stop)]
    for stream in (False, True):
        r = chat(client, seed=21, max_tokens=40, temperature=0, stop=[stop, "never-seen-XYZ"], stream=stream,
                 **IGNORE_EOS)
        if stream:
            chunks = [c for c in r if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, reason) == (expected, "stop")


def test_stop_token_ends_with_finish_reason_stop(client, live):
    first = chat(client, seed=8, max_tokens=6, temperature=0, logprobs=True, **IGNORE_EOS)
    token = first.choices[0].logprobs.content[2].bytes
    ids = [i for i in range(live.engine.model.args.vocab_size) if TokenText(live.tokenizer)(i)[1] == token]
    r = chat(client, seed=8, max_tokens=6, temperature=0, logprobs=True,
             extra_body={"ignore_eos": True, "stop_token_ids": ids})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 3
    assert len(r.choices[0].logprobs.content) == 2  # the stop token is not part of the answer


def test_n_choices_use_seed_plus_index(client):
    r = chat(client, n=3, seed=100, max_tokens=10, temperature=1.0, **IGNORE_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 30
    for i, choice in enumerate(r.choices):
        alone = chat(client, seed=100 + i, max_tokens=10, temperature=1.0, **IGNORE_EOS)
        assert choice.message.content == alone.choices[0].message.content
    streamed = {}
    for c in chat(client, n=3, seed=100, max_tokens=10, temperature=1.0, stream=True, **IGNORE_EOS):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert streamed == {c.index: c.message.content for c in r.choices}


# ---------------------------------------------------------------------------------------- logprobs
def test_chat_logprobs_match_the_engine(client, live, tiny_dir):
    messages = [{"role": "user", "content": "Tell me about Megrez."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=13, logprobs=True,
                                       top_logprobs=3, **IGNORE_EOS)
    offline = LLM(tiny_dir, max_num_seqs=1, max_model_len=MAX_LEN).chat(
        messages, SamplingParams(max_tokens=6, seed=13, logprobs=3, ignore_eos=True))
    content = r.choices[0].logprobs.content
    text_of = TokenText(live.tokenizer)
    assert [e.bytes for e in content] == [text_of(s.token)[1] for s in offline.logprobs]
    for entry, ref in zip(content, offline.logprobs, strict=True):
        assert entry.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
        assert [t.bytes for t in entry.top_logprobs] == [text_of(tid)[1] for tid, _ in ref.top_logprobs]
    no_lp = chat(client, max_tokens=3)
    assert no_lp.choices[0].logprobs is None


def test_completion_logprobs_legacy_format(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, seed=2, logprobs=2, **IGNORE_EOS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] <= len(r.choices[0].text)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and top[token] == logprob and 1 <= len(top) <= 3


def test_token_bytes_rebuild_the_text(live):
    text_of = TokenText(live.tokenizer)
    for text in ("Hello, world! 你好，世界 🙂", "def main(): return None"):
        ids = live.tokenizer.encode(text)
        assert b"".join(bytes(text_of(i)[1]) for i in ids) == text.encode("utf-8")


def test_token_texts_are_distinct_and_partial_characters_show_their_bytes(live):
    text_of = TokenText(live.tokenizer)
    vocab = live.tokenizer.vocab_size
    texts = [text_of(i)[0] for i in range(vocab)]
    assert len(set(texts)) == vocab  # so the legacy top_logprobs dicts never merge two tokens
    partial = [i for i in range(vocab) if texts[i].startswith("bytes:")]
    assert partial
    for i in partial:
        raw = bytes(text_of(i)[1])
        assert texts[i] == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")


# ---------------------------------------------------------------------------------------- load
def crowd_streams(live, requests: list[dict]) -> list[tuple[str, str | None]]:
    """All the chat requests streamed at once; each one's (text, finish reason)."""
    async def one(client, req):
        text, reason = [], None
        stream = await client.chat.completions.create(model=MODEL, stream=True, **req, **IGNORE_EOS)
        async for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                reason = choice.finish_reason or reason
        return "".join(text), reason

    async def crowd():
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        try:
            return await asyncio.gather(*(one(client, r) for r in requests))
        finally:
            await client.close()

    return asyncio.run(crowd())


@pytest.mark.slow
def test_32_concurrent_streams_equal_their_solo_runs(live):
    requests = [dict(messages=[{"role": "user", "content": f"Request {i}: " + "tell me more " * (i % 7)}],
                     seed=1000 + i, temperature=[0.0, 0.7, 1.0][i % 3], top_p=[1.0, 0.9][i % 2], max_tokens=16 + i % 5)
                for i in range(32)]
    steps_before = live.engine.stats["steps"]
    together = crowd_streams(live, requests)
    steps = live.engine.stats["steps"] - steps_before
    tokens = sum(r["max_tokens"] for r in requests)
    print(f"{steps} engine steps for {tokens} tokens")
    assert steps < tokens / 3, f"{steps} steps for {tokens} tokens: requests were not batched"
    client = live.client()
    for req, (text, reason) in zip(requests, together, strict=True):
        alone = client.chat.completions.create(model=MODEL, **req, **IGNORE_EOS)
        assert reason == "length"
        assert text == alone.choices[0].message.content, f"seed {req['seed']} differs in a crowd"


def test_disconnect_mid_stream_frees_the_slot(live, client):
    before = live.metrics()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as raw:
        with raw.stream("POST", live.url + "/v1/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            wait_for(lambda: live.engine.stats["generation_tokens"] - before["megrez_generation_tokens_total"] >= 5)
            assert len(live.engine.running) == 1
    wait_for(lambda: not live.engine.running, timeout=5)
    m = live.metrics()
    assert m["megrez_requests_running"] == 0 and m["megrez_kv_cache_usage_ratio"] == 0
    assert m['megrez_kv_cache_blocks{state="used"}'] == 0
    assert m['megrez_requests_finished_total{finish_reason="abort"}'] == \
        before.get('megrez_requests_finished_total{finish_reason="abort"}', 0) + 1
    assert m["megrez_generation_tokens_total"] - before["megrez_generation_tokens_total"] < 900
    assert live.loop.active == 0
    assert chat(client, max_tokens=3, seed=1).choices[0].finish_reason in ("length", "stop")


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(live):
    before = live.metrics()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=0.3)
    wait_for(lambda: not live.engine.running, timeout=5)
    m = live.metrics()
    assert not live.engine.running and live.loop.active == 0
    assert m['megrez_requests_finished_total{finish_reason="abort"}'] == \
        before.get('megrez_requests_finished_total{finish_reason="abort"}', 0) + 1
    assert m["megrez_generation_tokens_total"] - before["megrez_generation_tokens_total"] < 900


def test_queue_full_gives_429_and_the_server_recovers(tiny_dir):
    s = LiveServer(tiny_dir, max_num_seqs=1, max_waiting=1)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900,
            "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=30, headers=headers) as a, httpx.Client(timeout=30, headers=headers) as b:
            with a.stream("POST", s.url + "/v1/chat/completions", json=body) as ra:
                lines_a = ra.iter_lines()  # held: dropping the iterator closes the stream
                next(lines_a)
                wait_for(lambda: s.engine.running)
                with b.stream("POST", s.url + "/v1/chat/completions", json=body) as rb:
                    lines_b = rb.iter_lines()
                    next(lines_b)
                    assert len(s.engine.running) == 1 and len(s.engine.waiting) == 1
                    with pytest.raises(openai.RateLimitError) as e:
                        chat(s.client(), max_tokens=2)
                    assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
                    assert e.value.body["code"] == "queue_full"
        wait_for(lambda: not (s.engine.running or s.engine.waiting), timeout=5)
        assert chat(s.client(), max_tokens=2).usage.completion_tokens >= 1
    finally:
        s.close()


def test_engine_failure_is_a_500_and_the_server_recovers(tiny_dir):
    s = LiveServer(tiny_dir)
    real_step = s.engine.step

    def broken_step():
        raise RuntimeError("device lost")

    try:
        s.engine.step = broken_step
        with pytest.raises(openai.InternalServerError) as e:
            chat(s.client(), max_tokens=4)
        assert e.value.status_code == 500 and "device lost" in e.value.body["message"]
        events = httpx.post(s.url + CHAT, json={"messages": USER, "max_tokens": 4, "stream": True},
                            headers={"Authorization": f"Bearer {KEY}"}).text.split("\n\n")
        assert "device lost" in json.loads(events[-3][6:])["error"]["message"] and events[-2] == "data: [DONE]"
        wait_for(lambda: httpx.get(s.url + "/health").status_code == 503)  # still failing: not healthy
        s.engine.step = real_step
        wait_for(lambda: httpx.get(s.url + "/health").status_code == 200)
        assert not s.engine.running and not s.engine.waiting and s.loop.active == 0
        assert chat(s.client(), max_tokens=3, **IGNORE_EOS).usage.completion_tokens == 3
    finally:
        s.engine.step = real_step
        s.close()


# ---------------------------------------------------------------------------------------- bad input
LONG = "Hello world " * 700  # about 1,400 tokens: over the 1,024-token context
USER = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _case(id, body, status, param=None, path=CHAT, headers=None, code=None, method="POST"):
    return pytest.param(path, body, status, param, headers, code, method, id=id)


BAD_INPUTS = [
    _case("malformed-json", b'{"model": "megrez-tiny", "messages": [', 400),
    _case("empty-body", b"", 400),
    _case("body-is-array", b"[1, 2]", 400),
    _case("invalid-utf8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    _case("nan-literal", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    _case("lone-surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    _case("huge-integer-literal", b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", 400),
    _case("deep-nesting", b'{"x": ' + b"[" * 20000 + b"]" * 20000 + b"}", 400),
    _case("messages-missing", {"model": MODEL}, 400, "messages"),
    _case("messages-empty", {"messages": []}, 400, "messages"),
    _case("messages-is-string", {"messages": "hi"}, 400, "messages"),
    _case("message-not-object", {"messages": ["hi"]}, 400, "messages[0]"),
    _case("role-missing", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    _case("role-unknown", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    _case("content-number", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    _case("content-image-part", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages[0].content[0]"),
    _case("user-content-null", {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    _case("max-tokens-negative", {"messages": USER, "max_tokens": -1}, 400, "max_tokens"),
    _case("max-tokens-zero", {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    _case("max-tokens-string", {"messages": USER, "max_tokens": "10"}, 400, "max_tokens"),
    _case("max-tokens-fraction", {"messages": USER, "max_tokens": 2.5}, 400, "max_tokens"),
    _case("max-completion-tokens-bool", {"messages": USER, "max_completion_tokens": True}, 400,
          "max_completion_tokens"),
    _case("temperature-negative", {"messages": USER, "temperature": -0.5}, 400, "temperature"),
    _case("temperature-huge", {"messages": USER, "temperature": 1e308}, 400, "temperature"),
    _case("temperature-string", {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    _case("top-p-zero", {"messages": USER, "top_p": 0}, 400, "top_p"),
    _case("top-p-above-one", {"messages": USER, "top_p": 1.5}, 400, "top_p"),
    _case("top-k-below-minus-one", {"messages": USER, "top_k": -2}, 400, "top_k"),
    _case("n-zero", {"messages": USER, "n": 0}, 400, "n"),
    _case("n-huge", {"messages": USER, "n": 10 ** 6}, 400, "n"),
    _case("presence-penalty-out-of-range", {"messages": USER, "presence_penalty": 3}, 400, "presence_penalty"),
    _case("frequency-penalty-list", {"messages": USER, "frequency_penalty": [1]}, 400, "frequency_penalty"),
    _case("seed-too-big", {"messages": USER, "seed": 2 ** 70}, 400, "seed"),
    _case("seed-string", {"messages": USER, "seed": "42"}, 400, "seed"),
    _case("stop-ints", {"messages": USER, "stop": [1, 2]}, 400, "stop"),
    _case("stop-empty-string", {"messages": USER, "stop": [""]}, 400, "stop"),
    _case("stop-too-many", {"messages": USER, "stop": [f"s{i}" for i in range(50)]}, 400, "stop"),
    _case("stream-string", {"messages": USER, "stream": "yes"}, 400, "stream"),
    _case("stream-options-without-stream", {"messages": USER, "stream_options": {"include_usage": True}}, 400,
          "stream_options"),
    _case("logprobs-string", {"messages": USER, "logprobs": "yes"}, 400, "logprobs"),
    _case("top-logprobs-huge", {"messages": USER, "logprobs": True, "top_logprobs": 100}, 400, "top_logprobs"),
    _case("top-logprobs-without-logprobs", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    _case("top-logprobs-negative", {"messages": USER, "logprobs": True, "top_logprobs": -1}, 400, "top_logprobs"),
    _case("logit-bias-not-a-token-id", {"messages": USER, "logit_bias": {"five": 10}}, 400, "logit_bias"),
    _case("logit-bias-out-of-vocab", {"messages": USER, "logit_bias": {"99999999": 10}}, 400, "logit_bias"),
    _case("logit-bias-too-strong", {"messages": USER, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    _case("logit-bias-not-object", {"messages": USER, "logit_bias": [5, 10]}, 400, "logit_bias"),
    _case("tool-without-function", {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
    _case("model-not-string", {"model": 5, "messages": USER}, 400, "model"),
    _case("prompt-over-context", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages",
          code="context_length_exceeded"),
    _case("unknown-model", {"model": "gpt-4o", "messages": USER}, 404, "model", code="model_not_found"),
    _case("no-key", {"messages": USER}, 401, headers={}, code="invalid_api_key"),
    _case("wrong-key", {"messages": USER}, 401, headers={"Authorization": "Bearer sk-wrong"}, code="invalid_api_key"),
    _case("oversize-body", {"messages": [{"role": "user", "content": "x" * (100 << 10)}]}, 413,
          code="request_too_large"),
    _case("completion-prompt-missing", {"max_tokens": 3}, 400, "prompt", path=COMPLETIONS),
    _case("completion-prompt-empty-list", {"prompt": []}, 400, "prompt", path=COMPLETIONS),
    _case("completion-prompt-empty-string", {"prompt": ""}, 400, "prompt", path=COMPLETIONS),
    _case("completion-prompt-bools", {"prompt": [True, False]}, 400, "prompt", path=COMPLETIONS),
    _case("completion-token-out-of-vocab", {"prompt": [5, 10 ** 9]}, 400, "prompt", path=COMPLETIONS),
    _case("completion-token-negative", {"prompt": [[1, -3]]}, 400, "prompt", path=COMPLETIONS),
    _case("completion-prompt-object", {"prompt": {"text": "hi"}}, 400, "prompt", path=COMPLETIONS),
    _case("completion-logprobs-huge", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", path=COMPLETIONS),
    _case("completion-echo-not-bool", {"prompt": "hi", "echo": "yes"}, 400, "echo", path=COMPLETIONS),
    _case("completion-suffix-unsupported", {"prompt": "hi", "suffix": "end"}, 400, "suffix", path=COMPLETIONS,
          code="unsupported_parameter"),
    _case("completion-max-tokens-negative", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", path=COMPLETIONS),
    _case("text-plain-body", b'{"messages": [{"role": "user", "content": "hi"}]}', 415,
          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"}, code="unsupported_media_type"),
    _case("form-body", b"messages=hi", 415, headers={"Authorization": f"Bearer {KEY}",
                                                     "Content-Type": "application/x-www-form-urlencoded"},
          code="unsupported_media_type"),
    _case("tokenize-no-prompt", {"add_special_tokens": True}, 400, "prompt", path="/v1/tokenize"),
    _case("detokenize-out-of-vocab", {"tokens": [1, 10 ** 9]}, 400, "tokens", path="/v1/detokenize"),
    _case("completion-best-of", {"prompt": "hi", "best_of": 3}, 400, "best_of", path=COMPLETIONS),
    _case("completion-too-many-choices", {"prompt": ["a"] * 8, "n": 16}, 400, "n", path=COMPLETIONS),
    _case("completion-prompt-over-context", {"prompt": [5] * MAX_LEN}, 400, "prompt",
          path=COMPLETIONS, code="context_length_exceeded"),
    _case("get-on-post-route", None, 405, method="GET"),
    _case("unknown-route", {"messages": USER}, 404, path="/v1/embeddings"),
]


def send_raw(live, path, body, headers, method) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return httpx.request(method, live.url + path, content=content,
                         headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("path,body,status,param,headers,code,method", BAD_INPUTS)
def test_bad_input_gets_an_openai_error(live, path, body, status, param, headers, code, method):
    r = send_raw(live, path, body, headers, method)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_bad_inputs_never_reach_the_500_handler(live, client):
    assert len(BAD_INPUTS) >= 25
    errors = live.app.state.server.errors
    before = sum(errors.values())
    for case in BAD_INPUTS:
        path, body, status, _, headers, _, method = case.values
        assert send_raw(live, path, body, headers, method).status_code == status
    assert sum(errors.values()) - before == len(BAD_INPUTS) and errors[500] == 0
    assert httpx.get(live.url + "/health").status_code == 200
    assert 'megrez_api_errors_total{status="500"}' not in httpx.get(live.url + "/metrics").text
    assert chat(client, max_tokens=2).usage.completion_tokens >= 1


def test_chat_template_refusals_are_400(tiny_dir, tmp_path):
    # Real templates raise_exception() on conversations they cannot render, or fail on them.
    shutil.copytree(tiny_dir, tmp_path / "strict")
    config_path = tmp_path / "strict" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with a user turn') }}{% endif %}"
        # role "tool" reaches the template as Megrez's "observation"
        "{% if messages[0]['role'] == 'observation' %}{{ messages[0]['content'] | no_such_filter }}{% endif %}"
        + config["chat_template"])
    config_path.write_text(json.dumps(config))
    s = LiveServer(tmp_path / "strict")
    try:
        for role, words in (("assistant", "must start with a user turn"), ("tool", "no_such_filter")):
            r = httpx.post(s.url + CHAT, json={"messages": [{"role": role, "content": "x"}]},
                           headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
            assert r.json()["error"]["param"] == "messages"
        assert chat(s.client(), max_tokens=2).usage.completion_tokens >= 1
    finally:
        s.close()


def test_context_error_says_by_how_much(live):
    n = len(live.tokenizer.encode_chat([{"role": "user", "content": LONG}]))
    r = httpx.post(live.url + CHAT, json={"messages": [{"role": "user", "content": LONG}]},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert f"{n - MAX_LEN + 1} too many" in r.json()["error"]["message"]


def test_metrics_exposition(live, client):
    chat(client, max_tokens=3)
    text = httpx.get(live.url + "/metrics").text
    for name, kind in (("megrez_requests_running", "gauge"), ("megrez_requests_waiting", "gauge"),
                       ("megrez_kv_cache_usage_ratio", "gauge"), ("megrez_generation_tokens_total", "counter"),
                       ("megrez_prompt_tokens_total", "counter"), ("megrez_requests_finished_total", "counter"),
                       ("megrez_time_to_first_token_seconds", "histogram")):
        assert f"# TYPE {name} {kind}" in text
    m = live.metrics()
    assert m["megrez_generation_tokens_total"] == live.engine.stats["generation_tokens"] > 0
    assert m['megrez_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["megrez_time_to_first_token_seconds_count"]


# ---------------------------------------------------------------------------------------- CLI and benchmark
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(model_dir, *flags, env=None):
    """``megrez serve`` as a real subprocess on a free port; yields (url, process), then Ctrl-C."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "megrez.cli", "serve", "--model", str(model_dir), "--port", str(port),
                             "--threads", "1", "--log-level", "warning", *flags], env=env, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc=proc)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timing.Deadline(20).remaining())
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@pytest.mark.slow
def test_megrez_serve_command(tiny_dir):
    with serve_process(tiny_dir, "--served-model-name", "tiny", "--max-model-len", "256", "--max-num-seqs", "2",
                       env={"MEGREZ_API_KEY": "sk-from-env"}) as (url, proc):
        c = openai.OpenAI(base_url=url + "/v1", api_key="sk-from-env", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.model == "tiny" and r.usage.completion_tokens >= 1
        assert httpx.get(url + "/v1/models").status_code == 401
    # uvicorn shuts down gracefully, then re-raises the signal: Ctrl-C's conventional status.
    assert proc.returncode == 130
    err = proc.stderr.read()
    assert f"on {url}/v1" in err and "Traceback" not in err


@pytest.mark.slow
def test_serve_with_expert_offload_exposes_cache_metrics(tiny_dir):
    with serve_process(tiny_dir, "--max-model-len", "256", "--max-num-seqs", "2", "--kv-cache-memory", "1MiB",
                       "--gpu-memory-budget", "2.5MiB") as (url, proc):
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = c.completions.create(model=str(tiny_dir), prompt="hello", max_tokens=8, temperature=0)
        solo = LLM(tiny_dir).generate("hello", SamplingParams(temperature=0, max_tokens=8))
        assert r.choices[0].text == solo.text  # offloading changes where experts live, not the answer
        text = httpx.get(url + "/metrics").text
        m = {k: float(v) for k, v in re.findall(r"^(\S+) (\S+)$", text, re.M)}
        assert m["megrez_expert_cache_slots"] > 0
        uses = sum(m[f'megrez_expert_uses_total{{source="{k}"}}'] for k in ("hits", "prefetched", "misses"))
        assert uses > 0 and 0 <= m["megrez_expert_cache_hit_ratio"] <= 1


def test_serve_rejects_bad_flags(tiny_dir, capsys):
    from megrez.cli import main

    assert main(["serve", "--model", str(tiny_dir), "--max-num-seqs", "0"]) == 2
    assert "--max-num-seqs must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(tiny_dir), "--max-request-bytes", "lots"])


def test_load_benchmark_runs_against_the_server(live):
    proc = timing.run([sys.executable, str(REPO / "benchmarks" / "load.py"), "--url", live.url, "--api-key", KEY,
                       "--concurrency", "4", "--duration", "1.5", "--max-tokens", "8"], timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["errors"] == 0 and summary["requests"] >= 4
    assert summary["output_tokens"] == 8 * summary["requests"]
    assert 0 < summary["ttft_s"]["p50"] <= summary["latency_s"]["p50"]
    assert "TTFT" in proc.stdout


def test_load_benchmark_without_the_key_says_so(live):
    env = {k: v for k, v in os.environ.items() if k != "MEGREZ_API_KEY"}
    proc = timing.run([sys.executable, str(REPO / "benchmarks" / "load.py"), "--url", live.url, "--duration", "1"],
                      timeout=60, env=env)
    assert proc.returncode == 2 and "requires an API key" in proc.stderr and "--api-key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_reports_a_port_in_use_before_loading_the_model():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The model does not exist: the port is checked first, so that is the error reported.
        r = timing.run([sys.executable, "-m", "megrez.cli", "serve", "--model", "/no/such/model", "--port", str(port)],
                       timeout=60)
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in r.stderr
