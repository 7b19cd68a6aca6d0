"""A tool-using conversation in OpenAI's shape turned into the messages a checkpoint's chat
template renders.

When the template itself takes ``tools`` (Hugging Face's convention), it gets the function
list and the calls as objects, and renders them its own way. Otherwise the conversation is
written in the Megrez format: the functions go into the system prompt (the client's system
message replaces the role line), an assistant turn's calls become the call text after its
content, and a ``tool`` message becomes an ``observation`` turn.
"""
from __future__ import annotations

import json
from datetime import datetime

from . import megrez_format as mf


def _arguments(call: dict, where: str):
    args = call.get("function", {}).get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments: not valid JSON ({e})") from None
    return {} if args is None else args


def tool_calls_of(message: dict, where: str) -> list[tuple[str, object]]:
    """(name, arguments object) of each call in an assistant message."""
    out = []
    for j, call in enumerate(message.get("tool_calls") or []):
        w = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{w}.function.name: required")
        out.append((fn["name"], _arguments(call, w)))
    return out


def megrez_messages(messages: list[dict], functions: list[dict], now: datetime) -> list[dict]:
    out = []
    if functions:
        role = mf.ROLE_PROMPT
        if messages and messages[0]["role"] == "system":
            role, messages = messages[0]["content"], messages[1:]
        out.append({"role": "system", "content": mf.system_prompt(functions, now, role)})
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content += "".join(mf.call_text(name, args) for name, args in tool_calls_of(m, f"messages[{i}]"))
        elif role == "tool":
            role = mf.OBSERVATION_ROLE
        out.append({"role": role, "content": content})
    return out


def template_messages(messages: list[dict]) -> list[dict]:
    """Hugging Face's tool-message convention: call arguments as objects."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"type": "function", "function": {"name": n, "arguments": a}}
                     for n, a in tool_calls_of(m, f"messages[{i}]")]
            m = {**m, "tool_calls": calls, "content": m.get("content") or ""}
        out.append(m)
    return out


def render_messages(tokenizer, messages: list[dict], functions: list[dict], now: datetime | None = None):
    """(messages, template kwargs) for ``tokenizer.apply_chat_template``."""
    if tokenizer.template_takes_tools:
        tools = [{"type": "function", "function": f} for f in functions]
        return template_messages(messages), ({"tools": tools} if tools else {})
    return megrez_messages(messages, functions, now or datetime.now()), {}
