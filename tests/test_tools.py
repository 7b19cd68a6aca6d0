"""Tool calling without a server: the OpenAI fields, the Megrez prompt byte for byte, and the
calls read back from the model's text (whole and split at every character).

    PYTHONPATH=src python -m pytest -q tests/test_tools.py
"""
import json
from datetime import datetime

import pytest

from megrez.tools import ToolCallParser, ToolError, parse_tool_calls, parse_tools
from megrez.tools import megrez_format as mf
from megrez.tools.render import megrez_messages

NOW = datetime(2025, 1, 6, 9, 30, 5)  # a Monday
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": {**WEATHER, "strict": True}}]
CALL = '<|function_start|>{"name": "get_weather", "arguments": {"city": "北京"}}<|function_end|>'


def test_spec_checks_fields_and_names_the_culprit():
    spec = parse_tools(TOOLS, None, None)
    assert spec.functions == [WEATHER] and spec.choice == "auto" and spec.parallel  # "strict" is not shown
    assert parse_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, False).forced == [WEATHER]
    assert parse_tools(TOOLS, "none").offered == [] and parse_tools(None, "auto") is None
    for tools, choice, param in (
            ([{"type": "retrieval"}], None, "tools[0].type"),
            ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
            (TOOLS + TOOLS, None, "tools[1].function.name"),
            ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools[0].function.parameters"),
            (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
            (TOOLS, "always", "tool_choice"), (None, "required", "tool_choice")):
        with pytest.raises(ToolError) as e:
            parse_tools(tools, choice)
        assert e.value.param == param


def test_megrez_system_prompt_and_turns_are_byte_exact():
    # The strings of the protocol, as InfiniWebSearch writes them.
    assert mf.time_line(NOW) == "The current time is 2025-01-06 09:30:05, Monday."
    assert mf.ROLE_PROMPT == "你是Megrez-3B-Instruct, 将针对用户的问题给出详细的、积极的回答."
    second = {"name": "f", "parameters": {}}
    text = mf.system_prompt([WEATHER, second], NOW)
    assert text == (mf.ROLE_PROMPT + "\nThe current time is 2025-01-06 09:30:05, Monday.\n"
                    "You have access to the following functions. Use them if required -\n"
                    + json.dumps(WEATHER, ensure_ascii=False, indent=4) + "\n\n" + json.dumps(second, indent=4))
    assert mf.system_prompt(None, NOW) == mf.ROLE_PROMPT + "\nThe current time is 2025-01-06 09:30:05, Monday."
    msgs = megrez_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "晴"}], [WEATHER], NOW)
    assert msgs[0] == {"role": "system", "content": mf.system_prompt([WEATHER], NOW, role="Be brief.")}
    assert msgs[2] == {"role": "assistant", "content": CALL}
    assert msgs[3] == {"role": "observation", "content": "晴"}


def test_whole_answers():
    names = {"get_weather"}
    content, calls = parse_tool_calls("Let me look. " + CALL, names)
    assert content == "Let me look. " and [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"city": "北京"})]
    assert calls[0].id.startswith("call_")
    assert parse_tool_calls(CALL + CALL, names)[0] is None and len(parse_tool_calls(CALL + CALL, names)[1]) == 2
    assert len(parse_tool_calls(CALL + CALL, names, max_calls=1)[1]) == 1
    # arguments given as a JSON string holding an object
    s = '<|function_start|>{"name": "get_weather", "arguments": "{\\"city\\": \\"x\\"}"}<|function_end|>'
    assert json.loads(parse_tool_calls(s, names)[1][0].arguments) == {"city": "x"}
    # bare object fallback (a detokenizer that dropped the markers)
    assert parse_tool_calls(' {"name": "get_weather", "arguments": {}}', names)[1][0].arguments == "{}"


@pytest.mark.parametrize("text", [
    '<|function_start|>{"name": "get_weather", "arguments": {"city": <|function_end|>',   # bad JSON
    '<|function_start|>{"name": "launch_missiles", "arguments": {}}<|function_end|>',     # not offered
    '<|function_start|>{"name": "get_weather", "arguments": [1]}<|function_end|>',        # not an object
    '<|function_start|>{"name": "get_weather", "arguments": {"city": "x"}}',              # never closed
    'Use <|function_start|> wisely',
    '{"name": "get_weather"}',                                                            # bare, no arguments
    "plain answer <|funct",
])
def test_malformed_calls_stay_text(text):
    content, calls = parse_tool_calls(text, {"get_weather"})
    assert calls == [] and content == text


@pytest.mark.parametrize("text", ["Let me look. " + CALL + " done", CALL + CALL, "no call at all <|x|>",
                                  CALL[:-3], '{"name": "get_weather", "arguments": {}}'])
def test_streaming_equals_whole_at_every_split(text):
    whole_content, whole_calls = parse_tool_calls(text, {"get_weather"})
    for cut in range(len(text) + 1):
        p = ToolCallParser({"get_weather"})
        events = p.feed(text[:cut]) + p.feed(text[cut:]) + p.finish()
        content = "".join(v for k, v in events if k == "content")
        assert content == (whole_content or "")
        assert [(c.name, c.arguments) for k, c in events if k == "call"] == \
            [(c.name, c.arguments) for c in whole_calls]
    # one character at a time, nothing that could still be a marker is ever let out
    p = ToolCallParser({"get_weather"})
    out = []
    for ch in text:
        out += [v for k, v in p.feed(ch) if k == "content"]
        assert "<|function_start|>" not in "".join(out) or "<|function_start|>" in (whole_content or "")
