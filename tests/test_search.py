"""Web search: the protocol strings, the local index, history truncation, citation links, the
loop with a scripted model (every error path) and with the bundled model, and the web backend
against a fake search API on a loopback port.

    PYTHONPATH=src python -m pytest -q tests/test_search.py
"""
from __future__ import annotations

import json
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from megrez.search import (
    LocalIndex,
    SearchConfig,
    SearchModel,
    SearchResult,
    WebSearchAgent,
    prompts,
    truncate_messages,
)
from megrez.search.citations import CitationStream, render
from megrez.tokenizer import Tokenizer
from megrez.tools import megrez_format as mf

BUNDLED = Path(__file__).resolve().parents[1] / "src/megrez/assets/megrez2-tiny-chat"
DEMO = Path(__file__).resolve().parents[1] / "src/megrez/assets/search-demo"
NOW = datetime(2025, 1, 6, 9, 30, 5)


def test_observation_and_summary_prompts_are_byte_exact():
    expected = (
        "You will be given a set of related contexts to the question, each starting with a reference number like "
        "[[citation:x]], where x is a number. Please use the context and cite the context at the end of each sentence "
        "if applicable.\n\nPlease cite the contexts with the reference numbers, in the format [citation:x]. If a "
        "sentence comes from multiple contexts, please list all applicable citations, like [citation:3][citation:5]. "
        "If the context does not provide relevant information to answer the question, inform the user that there is "
        "no relevant information in the search results and that the question cannot be answered.\n\nOther than code "
        "and specific names and citations, your answer must be written in Chinese.\n\nEnsure that your response is "
        "concise and clearly formatted. Group related content together and use Markdown points or lists where "
        "appropriate.\n\nRemember, summarize and don't blindly repeat the contexts verbatim. And here is the user "
        "question:\n北京天气\nHere is the keywords of the question:\n北京 天气\n\nHere are the set of contexts:\n\n"
        "[[citation:1]]\n晴\n[[citation:2]]\n无相关内容")
    assert prompts.observation("北京天气", "北京 天气", ["晴", "无相关内容"]) == expected
    assert prompts.SUMMARY_PROMPT.format(question="q", context="c") == (
        '从信息中总结能够回答问题的相关内容，要求简明扼要不能完全照搬原文。直接返回总结不要说其他话，如果没有相关内容则返回"无相关内容", '
        "返回内容为中文。\n\n<问题>q</问题>\n<信息>c</信息>")
    system = mf.system_prompt([prompts.SEARCH_FUNCTION], NOW)
    assert system.startswith("你是Megrez-3B-Instruct, 将针对用户的问题给出详细的、积极的回答.\n"
                             "The current time is 2025-01-06 09:30:05, Monday.\n"
                             "You have access to the following functions. Use them if required -\n{\n"
                             '    "name": "googleWebSearch",\n')
    assert "current events.Never ever use this tool when user want to translate" in system
    assert "etc.If special characters such as '\\n' appear in the search" in system  # a real newline, escaped


# ---------------------------------------------------------------------------------------- local index
@pytest.fixture
def index(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# 北京天气\n北京今天晴，气温 5 度。", encoding="utf-8")
    (docs / "b.txt").write_text("Shanghai weather: rain all day.\n", encoding="utf-8")
    (docs / "sub" / "c.html").write_text("<html><title>茶</title><script>var x=1;</script><p>龙井茶产于杭州。</p></html>",
                                         encoding="utf-8")
    (docs / "skip.bin").write_bytes(b"\x00\x01")
    idx = LocalIndex(tmp_path / "i.sqlite")
    assert idx.add(docs) == {"added": 3, "updated": 0, "unchanged": 0, "documents": 3}
    return idx, docs


def test_local_index_finds_chinese_and_english(index):
    idx, docs = index
    assert [r.title for r in idx.search("北京今天天气", 5)] == ["北京天气"]
    assert [r.title for r in idx.search("天气", 5)] == ["北京天气"]        # two characters: substring match
    assert [r.title for r in idx.search("weather rain", 5)] == ["b"]       # no heading: the file name
    (hit,) = idx.search("龙井", 5)
    assert hit.title == "茶" and hit.link == (docs / "sub" / "c.html").resolve().as_uri()
    assert idx.fetch(hit) == "龙井茶产于杭州。" and "var x" not in idx.fetch(hit)
    assert idx.search("nothing-like-this", 5) == [] and idx.search("", 5) == []
    both = idx.search("北京 weather", 5)
    assert len(both) == 2 and both == idx.search("北京 weather", 5)       # a stable order


def test_local_index_updates_changed_files(index, tmp_path):
    idx, docs = index
    (docs / "b.txt").write_text("Shanghai: sunny now.\n", encoding="utf-8")
    import os
    os.utime(docs / "b.txt", (1, 1))
    assert idx.add(docs)["updated"] == 1
    assert idx.search("rain", 5) == [] and [r.title for r in idx.search("sunny", 5)] == ["b"]
    with pytest.raises(ValueError, match="megrez index add"):
        LocalIndex(tmp_path / "missing.sqlite", create=False)


def test_index_cli(tmp_path, capsys):
    from megrez.cli import main

    path = str(tmp_path / "demo.sqlite")
    assert main(["index", "add", str(DEMO), "--index", path]) == 0
    assert "5 added" in capsys.readouterr().out
    assert main(["index", "search", "静夜思", "--index", path]) == 0
    assert "静夜思（李白）" in capsys.readouterr().out.splitlines()[0]
    assert main(["index", "add", str(tmp_path / "nope"), "--index", path]) == 2


# ---------------------------------------------------------------------------------------- history, citations
def test_truncation_keeps_the_window_and_the_budget():
    def turn(i, n):
        return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "x" * n}]
    history = turn(0, 10) + turn(1, 10) + turn(2, 10) + [{"role": "observation", "content": "o"}]
    count = lambda msgs: sum(len(m["content"]) for m in msgs)  # noqa: E731
    assert truncate_messages(history, count, "s", 2, 1000) == history[2:]      # the last two turns
    assert truncate_messages(history, count, "s", 2, 20) == history[4:]        # only the newest fits
    huge = turn(3, 5000)
    assert truncate_messages(history + huge, count, "s", 2, 20) == huge        # the newest is always kept


def test_citations_become_links_clamped_and_never_split():
    sources = [SearchResult("A", "file:///a"), SearchResult("B", "file:///b")]
    text = "晴[citation:1][citation:2]，风[ citation:9]。[citation:0] [cit] [1]"
    whole = render(text, sources)
    assert whole == ("晴 [1](file:///a) [2](file:///b)，风 [9](file:///b)。 [0](file:///a) [cit] [1]")
    assert ' <a href="file:///a" class="circle-link">1</a>' in render(text, sources, "html")
    assert render(text, []) == text
    for cut in range(len(text) + 1):
        for step in (1, 3):
            s = CitationStream(sources)
            out = "".join(s.feed(text[i:min(i + step, cut)]) for i in range(0, cut, step))
            out += s.feed(text[cut:]) + s.flush()
            assert out == whole


# ---------------------------------------------------------------------------------------- the loop
class Scripted(SearchModel):
    def __init__(self, outputs, summaries=None):
        self.tokenizer = Tokenizer(BUNDLED)
        self.outputs, self.summaries, self.prompts, self.batches = list(outputs), summaries, [], []

    def stream(self, messages, max_tokens, temperature, forced_call=False):
        self.prompts.append(messages)
        text = self.outputs.pop(0)
        for i in range(0, len(text), 4):
            yield text[i:i + 4]

    def batch(self, conversations, max_tokens, temperature):
        self.batches.append(conversations)
        return self.summaries or [f"summary {i}" for i in range(len(conversations))]


def search_call(query):
    return mf.call_text("googleWebSearch", {"query": query})


class FakeBackend:
    def __init__(self, results, pages=None, fail=False):
        self.results, self.pages, self.fail, self.queries = results, pages, fail, []

    def search(self, query, k):
        self.queries.append((query, k))
        if self.fail:
            raise ConnectionError("no route to host")
        return self.results[:k]

    def fetch(self, r):
        return (self.pages or {}).get(r.link, f"text of {r.title}")


SOURCES = [SearchResult("Weather", "https://w.example/1"), SearchResult("News", "https://n.example/2"),
           SearchResult("Tea", "https://t.example/3")]


def run(agent, question):
    events = list(agent.ask(question))
    return events, "".join(e.value for e in events if e.kind == "text")


def test_search_turn_end_to_end_with_a_scripted_model():
    model = Scripted([search_call("北京 天气"), "北京今天晴[citation:1][citation:3]。"])
    backend = FakeBackend(SOURCES, pages={"https://n.example/2": ""})
    agent = WebSearchAgent(model, backend, SearchConfig(pages=2), clock=lambda: NOW)
    events, text = run(agent, "北京今天天气怎么样")
    assert [e.kind for e in events if e.kind != "text"] == ["call", "sources", "summaries", "done"]
    assert backend.queries == [("北京 天气", 2)]
    assert text == "北京今天晴 [1](https://w.example/1) [3](https://n.example/2)。"  # 3 is clamped to the last
    assert len(model.batches) == 1 and len(model.batches[0]) == 2     # every page in one batched call
    first = model.batches[0][0]
    assert first[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert first[1]["content"] == prompts.SUMMARY_PROMPT.format(question="北京 天气", context="text of Weather")
    assert model.batches[0][1][1]["content"].endswith("<信息></信息>")  # an empty page is still numbered
    assert [m["role"] for m in agent.history] == ["user", "assistant", "observation", "assistant"]
    assert agent.history[1]["content"] == search_call("北京 天气")
    assert agent.history[2]["content"] == prompts.observation("北京今天天气怎么样", "北京 天气", ["summary 0", "summary 1"])
    assert agent.history[3]["content"] == "北京今天晴[citation:1][citation:3]。"  # raw, as the model wrote it
    # The answer's prompt: fresh system prompt, then the turn with its call and observation.
    assert model.prompts[1][0] == {"role": "system", "content": mf.system_prompt([prompts.SEARCH_FUNCTION], NOW)}
    assert model.prompts[1][1:] == agent.history[:3]
    # A follow-up keeps the earlier call and observation in the replayed history.
    model.outputs.append("还是晴[citation:2]。")
    _, text = run(agent, "明天呢")
    assert model.prompts[2][1:] == agent.history[:5] and text == "还是晴 [2](https://n.example/2)。"


@pytest.mark.parametrize("call,observation", [
    (mf.call_text("calculator", {"x": 1}), prompts.UNKNOWN_TOOL.format(name="calculator")),
    (mf.call_text("googleWebSearch", {"q": "x"}), prompts.MISSING_QUERY),
])
def test_bad_calls_get_the_canned_observations(call, observation):
    model = Scripted([call, "抱歉。"])
    agent = WebSearchAgent(model, FakeBackend(SOURCES), clock=lambda: NOW)
    events, text = run(agent, "q")
    assert agent.history[2] == {"role": "observation", "content": observation} and text == "抱歉。"
    assert not model.batches


def test_backend_failures_and_empty_results():
    for backend, observation in ((FakeBackend(SOURCES, fail=True), prompts.SEARCH_FAILED),
                                 (FakeBackend([]), prompts.PAGES_TIMED_OUT),
                                 (FakeBackend(SOURCES[:1], pages={SOURCES[0].link: prompts.PAGES_TIMED_OUT}),
                                  prompts.PAGES_TIMED_OUT)):
        model = Scripted([search_call("x"), "无法回答。"])
        events, _ = run(WebSearchAgent(model, backend, clock=lambda: NOW), "q")
        assert [m["content"] for m in model.prompts[1] if m["role"] == "observation"] == [observation]
        assert not model.batches
        assert ("error" in [e.kind for e in events]) == backend.fail


def test_malformed_call_is_the_answer_and_one_search_per_turn():
    bad = '<|function_start|>{"name": "googleWebSearch", "arguments": <|function_end|>'
    model = Scripted([bad])
    agent = WebSearchAgent(model, FakeBackend(SOURCES), clock=lambda: NOW)
    events, text = run(agent, "q")
    assert text == bad and [m["role"] for m in agent.history] == ["user", "assistant"]
    # A second call in the same turn is not run (one search per turn): it is shown as it is.
    model = Scripted([search_call("a"), search_call("b")])
    backend = FakeBackend(SOURCES)
    events, text = run(WebSearchAgent(model, backend, clock=lambda: NOW), "q")
    assert backend.queries == [("a", 5)] and text == search_call("b")


def test_budgets_fit_a_short_context():
    c = SearchConfig().fitted(1024)
    assert c.summary_input_tokens + c.summary_output_tokens <= 1024 - 256
    assert c.answer_max_tokens <= 256 and SearchConfig().fitted(32768) == SearchConfig()


def test_the_loop_on_the_bundled_model_with_the_local_index(tmp_path):
    from megrez.llm import LLM
    from megrez.search import LLMSearchModel

    idx = LocalIndex(tmp_path / "demo.sqlite")
    idx.add(DEMO)
    llm = LLM(BUNDLED, max_num_seqs=4)
    config = SearchConfig(pages=3).fitted(llm.engine.max_model_len)
    agent = WebSearchAgent(LLMSearchModel(llm), idx, config, clock=lambda: NOW, force_search=True)
    events = list(agent.ask("北京今天天气怎么样？"))
    query = next(e.value for e in events if e.kind == "call")
    sources = next(e.value for e in events if e.kind == "sources")
    assert 0 < len(query) <= 64 and sources == idx.search(query, 3)  # the model's own query, on the index
    assert json.loads(agent.history[1]["content"][len(mf.FUNCTION_START):-len(mf.FUNCTION_END)]) == \
        {"name": "googleWebSearch", "arguments": {"query": query}}
    assert [m["role"] for m in agent.history] == ["user", "assistant", "observation", "assistant"]
    kinds = [e.kind for e in events if e.kind != "text"]
    if sources:
        assert kinds == ["call", "sources", "summaries", "done"]
        summaries = next(e.value for e in events if e.kind == "summaries")
        assert len(summaries) == len(sources)
        assert agent.history[2]["content"] == prompts.observation("北京今天天气怎么样？", query, summaries)
    else:
        assert kinds == ["call", "sources", "done"] and agent.history[2]["content"] == prompts.PAGES_TIMED_OUT
    # A query that finds the demo documents goes through the summaries.
    model = agent.model
    agent.reset()
    real_stream = model.stream
    model.stream = lambda messages, max_tokens, temperature, forced_call=False: (
        iter([mf.call_text("googleWebSearch", {"query": "北京 天气"})]) if forced_call
        else real_stream(messages, max_tokens, temperature))
    events = list(agent.ask("北京今天天气怎么样？"))
    assert [e.kind for e in events if e.kind != "text"] == ["call", "sources", "summaries", "done"]
    assert next(e.value for e in events if e.kind == "sources")[0].title == "北京天气（演示数据）"
    assert agent.history[2]["content"].startswith(prompts.OBSERVATION_PROMPT.split("{question}")[0])


# ---------------------------------------------------------------------------------------- web backend
def test_serper_backend_against_a_fake_api_on_loopback():
    from megrez.search.web import SerperBackend

    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            seen["path"], seen["key"] = self.path, self.headers["X-API-KEY"]
            page = f"http://127.0.0.1:{self.server.server_port}/page"
            body = json.dumps({"organic": [{"title": "Page", "link": page, "snippet": "s"},
                                           {"title": "Gone", "link": page + "/404"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/page":
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write("<html><style>p{}</style><p>北京 晴</p></html>".encode())

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = SerperBackend("k-123", url=f"http://127.0.0.1:{server.server_port}/search", timeout=5)
        results = backend.search("北京 天气", 5)
        assert [r.title for r in results] == ["Page", "Gone"] and seen["key"] == "k-123"
        assert "q=%E5%8C%97%E4%BA%AC" in seen["path"] and "gl=cn" in seen["path"] and "hl=zh-CN" in seen["path"]
        assert backend.fetch_all(results) == ["北京 晴", ""]
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------- server
def test_web_search_tool_on_the_server(tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    import httpx
    from test_server import KEY, MODEL, LiveServer

    idx = LocalIndex(tmp_path / "demo.sqlite")
    idx.add(DEMO)
    s = LiveServer(BUNDLED)
    server = s.app.state.server
    server.config.clock = lambda: NOW
    try:
        c = s.client()
        messages = [{"role": "user", "content": "北京今天天气怎么样？"}]
        tool = [{"type": "web_search", "web_search": {"mode": "always", "max_results": 2}}]
        with pytest.raises(openai.BadRequestError, match="not enabled"):
            c.chat.completions.create(model=MODEL, messages=messages, tools=tool)
        server.search_backend = idx
        r = c.chat.completions.create(model=MODEL, messages=messages, tools=tool)
        search = r.choices[0].message.model_extra["search"]
        assert 0 < len(search["query"]) <= 64
        assert [x["link"] for x in search["sources"]] == [x.link for x in idx.search(search["query"], 2)]
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0
        chunks = list(c.chat.completions.create(model=MODEL, messages=messages, tools=tool, stream=True))
        searched = [ch.choices[0].delta.model_extra.get("search") for ch in chunks if ch.choices]
        assert [x for x in searched if x] == [search]  # the same loop, deterministic: one search chunk
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == r.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "stop"
        headers = {"Authorization": f"Bearer {KEY}"}
        for body, param in (({"tools": tool + [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                            ({"tools": tool, "n": 2}, "tools"),
                            ({"tools": [{"type": "web_search", "web_search": {"mode": "never"}}]},
                             "tools[0].web_search.mode")):
            resp = httpx.post(s.url + "/v1/chat/completions", json={"messages": messages, **body}, headers=headers)
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
        assert not s.engine.running and s.loop.active == 0
    finally:
        s.close()
