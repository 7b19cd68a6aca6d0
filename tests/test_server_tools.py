"""Tool calls and structured output through the real server and the official ``openai`` client.

Where the model's answer must be a particular call (tool_choice "auto"), the test forces the
token sequence: a logits processor added to each engine request lets only the scripted
tokens through, so everything after the model (detokenising, parsing, ids, streaming,
finish_reason) runs exactly as for a trained model. Where the server constrains the answer
(response_format, a forced tool_choice), the checkpoint is random and samples at temperature 1:
every answer must still parse and validate, which only the grammar can make true.

    PYTHONPATH=src python -m pytest -q tests/test_server_tools.py
"""
from __future__ import annotations

import json
from datetime import datetime

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("uvicorn")

from test_server import KEY, MODEL, LiveServer  # noqa: E402

from megrez.engine import SamplingParams  # noqa: E402
from megrez.engine.sampling import LogitsProcessor  # noqa: E402
from megrez.llm import LLM  # noqa: E402
from megrez.tiny import create_tiny  # noqa: E402
from megrez.tools import megrez_format as mf  # noqa: E402

NOW = datetime(2025, 1, 6, 9, 30, 5)
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                           "unit": {"enum": ["C", "F"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "Local time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string", "pattern": "^[A-Z][a-z]{1,10}/[A-Z][a-z]{1,10}$"}},
                       "required": ["tz"], "additionalProperties": False}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
CALL = '<|function_start|>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}<|function_end|>'
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "email": {"type": "string", "format": "email", "maxLength": 40},
    "role": {"enum": ["admin", "user", "guest"]},
    "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 10}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "nickname": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]}},
    "required": ["name", "age", "role", "scores", "address", "nickname"], "additionalProperties": False}


class Script(LogitsProcessor):
    """Lets only the scripted tokens through, then the end-of-turn token."""

    def __init__(self, ids: list[int], stop: int):
        self.ids, self.stop, self.at = ids, stop, 0

    def __call__(self, logits):
        token = self.ids[self.at] if self.at < len(self.ids) else self.stop
        logits.fill_(float("-inf"))
        logits[token] = 0.0

    def accept(self, token):
        self.at += 1


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    model_dir = create_tiny(tmp_path_factory.mktemp("tools") / "tiny", arch="moe", seed=1)
    s = LiveServer(model_dir, max_model_len=2048)  # the tools prompt is long in a 1K-token vocabulary
    s.model_dir = model_dir
    s.app.state.server.structured.clock = lambda: NOW
    s.prompts, s.script = [], None
    real_add = s.engine.add_request

    def add_request(prompt_ids, params=None, request_id=None, logits_processors=None, **kw):
        s.prompts.append(prompt_ids)
        if s.script is not None:
            stop = s.tokenizer.token_to_id("<|turn_end|>")
            logits_processors = [*(logits_processors or []), Script(s.script, stop)]
        return real_add(prompt_ids, params, request_id, logits_processors=logits_processors, **kw)

    s.engine.add_request = add_request
    yield s
    s.close()


@pytest.fixture
def scripted(live):
    def use(text):
        live.script = live.tokenizer.encode(text, add_special_tokens=False)
    yield use
    live.script = None


def create(live, **kw):
    kw.setdefault("messages", USER)
    kw.setdefault("max_tokens", 200)
    return live.client().chat.completions.create(model=MODEL, **kw)


def streamed(live, **kw):
    """(content, tool calls as dicts, finish reasons) assembled from a stream."""
    content, calls, reasons = [], {}, []
    for chunk in create(live, stream=True, **kw):
        for ch in chunk.choices:
            content.append(ch.delta.content or "")
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    return "".join(content), [calls[i] for i in sorted(calls)], reasons


def rendered(live, i=-1) -> str:
    return live.tokenizer.decode(live.prompts[i], skip_special_tokens=False)


SYSTEM = mf.system_prompt([WEATHER, TIME], NOW)


# ---------------------------------------------------------------------------------------- auto
def test_auto_tool_call_whole_and_streamed(live, scripted):
    scripted("Let me check. " + CALL)
    r = create(live, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check. "
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    # The definitions went into the system prompt the way the model was trained.
    assert rendered(live) == (f"<|role_start|>system<|role_end|>{SYSTEM}<|turn_end|>"
                              "<|role_start|>user<|role_end|>What is the weather in Paris?<|turn_end|>"
                              "<|role_start|>assistant<|role_end|>")
    content, calls, reasons = streamed(live, tools=TOOLS, temperature=0)
    assert content == "Let me check. " and reasons == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris", "unit": "C"})]
    assert calls[0]["id"].startswith("call_")


def test_follow_up_with_the_tool_result_renders_the_observation_turn(live, scripted):
    scripted(CALL)
    first = create(live, tools=TOOLS, temperature=0).choices[0].message
    assert first.content is None
    scripted("巴黎今天晴。")
    messages = USER + [first.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny, 21 C"}]
    r = create(live, messages=messages, tools=TOOLS, temperature=0)
    assert r.choices[0].message.content == "巴黎今天晴。" and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls
    assert rendered(live) == (
        f"<|role_start|>system<|role_end|>{SYSTEM}<|turn_end|>"
        "<|role_start|>user<|role_end|>What is the weather in Paris?<|turn_end|>"
        '<|role_start|>assistant<|role_end|><|function_start|>{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "C"}}<|function_end|><|turn_end|>'
        "<|role_start|>observation<|role_end|>sunny, 21 C<|turn_end|>"
        "<|role_start|>assistant<|role_end|>")


@pytest.mark.parametrize("text", [
    '<|function_start|>{"name": "get_weather", "arguments": {"city": <|function_end|>',
    '<|function_start|>{"name": "launch", "arguments": {}}<|function_end|>',
    'Half a call <|function_start|>{"name": "get_weather"',
])
def test_malformed_calls_come_back_as_text(live, scripted, text):
    scripted(text)
    r = create(live, tools=TOOLS, temperature=0)
    assert r.choices[0].message.content == text and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    content, calls, reasons = streamed(live, tools=TOOLS, temperature=0)
    assert (content, calls, reasons) == (text, [], ["stop"])


def test_parallel_calls_and_one_call_only(live, scripted):
    second = CALL.replace("Paris", "Rome")
    scripted(CALL + second)
    r = create(live, tools=TOOLS, temperature=0)
    assert [json.loads(c.function.arguments)["city"] for c in r.choices[0].message.tool_calls] == ["Paris", "Rome"]
    assert len({c.id for c in r.choices[0].message.tool_calls}) == 2
    _, calls, _ = streamed(live, tools=TOOLS, temperature=0)
    assert [json.loads(c["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    # parallel_tool_calls=false: generation stops at the end of the first call.
    r = create(live, tools=TOOLS, temperature=0, parallel_tool_calls=False)
    assert [json.loads(c.function.arguments)["city"] for c in r.choices[0].message.tool_calls] == ["Paris"]
    assert r.usage.completion_tokens == len(live.tokenizer.encode(CALL, add_special_tokens=False))
    _, calls, reasons = streamed(live, tools=TOOLS, temperature=0, parallel_tool_calls=False)
    assert len(calls) == 1 and reasons == ["tool_calls"]


def test_tool_choice_none_shows_no_functions(live, scripted):
    scripted("Hello.")
    r = create(live, tools=TOOLS, tool_choice="none", temperature=0)
    assert r.choices[0].message.content == "Hello." and r.choices[0].finish_reason == "stop"
    assert "You have access to the following functions" not in rendered(live)


# ---------------------------------------------------------------------------------------- constrained
def _validate_call(name, arguments):
    fn = {"get_weather": WEATHER, "get_time": TIME}[name]
    jsonschema.validate(json.loads(arguments), fn["parameters"])


@pytest.mark.slow
def test_forced_calls_follow_the_function_schema_at_temperature_1(live):
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, parallel in (("required", True), (named, False)):
        r = create(live, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel, temperature=1.0, n=8,
                   seed=7, max_tokens=1000)
        for c in r.choices:
            assert c.finish_reason == "tool_calls", c.message
            calls = c.message.tool_calls
            assert calls and (parallel or len(calls) == 1)
            for call in calls:
                assert choice == "required" or call.function.name == "get_time"
                _validate_call(call.function.name, call.function.arguments)
    _, calls, reasons = streamed(live, tools=TOOLS, tool_choice=named, temperature=1.0, seed=3, max_tokens=400)
    assert reasons == ["tool_calls"] and len(calls) == 1 and calls[0]["name"] == "get_time"
    _validate_call("get_time", calls[0]["arguments"])


@pytest.mark.slow
def test_json_schema_output_always_validates(live):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    answers = []
    for seed in (1, 2, 3):
        r = create(live, response_format=rf, temperature=1.0, n=16, seed=seed * 100, max_tokens=400)
        answers += [(c.finish_reason, c.message.content) for c in r.choices]
    for reason, text in answers:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert len({text for _, text in answers}) > 40  # sampled, not one forced answer
    content, _, reasons = streamed(live, response_format=rf, temperature=1.0, seed=5, max_tokens=400)
    assert reasons == ["stop"]
    jsonschema.validate(json.loads(content), PERSON)


def test_json_object_and_completions_response_format(live):
    r = create(live, response_format={"type": "json_object"}, temperature=0.0, max_tokens=40)
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert text.startswith("{")
    c = live.client().completions.create(model=MODEL, prompt="Answer:", max_tokens=60, temperature=1.0, seed=4,
                                         extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                             "name": "yn", "schema": {"enum": ["yes", "no"]}}}})
    assert json.loads(c.choices[0].text) in ("yes", "no")


IMPOSSIBLE = [
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "incompatible types"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"], "additionalProperties": False},
     "'b'"),
    ({"enum": []}, "Unsatisfiable"),
    (False, "accepts no value"),
    ({"type": "string", "pattern": "[a-"}, "regex"),
    ({"$ref": "#/definitions/missing"}, "missing"),
]


@pytest.mark.parametrize("schema,words", IMPOSSIBLE)
def test_impossible_schema_is_a_clear_400(live, schema, words):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and error["code"] == "invalid_schema"
    assert words in error["message"]
    tools = [TOOLS[0], {"type": "function", "function": {"name": "bad", "parameters": schema}}]
    if isinstance(schema, dict):
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": USER, "tools": tools,
                                                                "tool_choice": "required"}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools[1].function.parameters", r.text
    assert live.app.state.server.errors[500] == 0
    assert create(live, max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tool_fields_are_400(live, body, param):
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": USER, **body},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---------------------------------------------------------------------------------------- Python API, CLI
def test_python_api_tools_and_schema(live):
    llm = LLM(live.model_dir, max_num_seqs=4, max_model_len=2048)
    r = llm.chat(USER, SamplingParams(temperature=1.0, seed=2, max_tokens=300), tools=TOOLS, tool_choice="required")
    assert r.finish_reason == "tool_calls" and r.tool_calls
    for call in r.tool_calls:
        _validate_call(call.name, call.arguments)
    out = llm.generate(["a", "b"], SamplingParams(temperature=1.0, seed=3, max_tokens=300), json_schema=PERSON)
    for o in out:
        jsonschema.validate(json.loads(o.text), PERSON)
    assert "".join(llm.stream("c", SamplingParams(temperature=1.0, seed=1, max_tokens=20),
                              grammar='start: "yes" | "no"')) in ("yes", "no")


def test_generate_cli_json_schema_and_grammar(live, tmp_path, capsys):
    from megrez.cli import main

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(PERSON))
    assert main(["generate", "hi", "--model", str(live.model_dir), "--json-schema", str(schema), "--json",
                 "-t", "1", "--seed", "9", "--max-tokens", "300"]) == 0
    jsonschema.validate(json.loads(json.loads(capsys.readouterr().out)["text"]), PERSON)
    gbnf = tmp_path / "yn.gbnf"
    gbnf.write_text('root ::= "yes" | "no"\n')
    assert main(["generate", "hi", "--model", str(live.model_dir), "--grammar", str(gbnf), "-t", "1"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    assert main(["generate", "hi", "--model", str(live.model_dir), "--json-schema", '{"enum": []}']) == 2
    assert "json_schema: Unsatisfiable schema" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_json_schema_on_cuda(live):
    llm = LLM(live.model_dir, device="cuda", max_num_seqs=4, max_model_len=2048)
    out = llm.generate(["a", "b", "c"], SamplingParams(temperature=1.0, seed=5, max_tokens=300), json_schema=PERSON)
    for o in out:
        jsonschema.validate(json.loads(o.text), PERSON)
