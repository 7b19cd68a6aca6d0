"""The model's tool calls read back out of its text, whole or while it streams.

A call is ``<|function_start|>{"name": ..., "arguments": {...}}<|function_end|>``; ``arguments``
may also be a JSON string holding an object. A block that does not parse, names a function
that was not offered, or is never closed stays in the content as the model wrote it: a bad
call degrades to text, never to an error. As a fallback for detokenizers that drop the
markers, an answer that is nothing but such an object counts as one call.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .megrez_format import FUNCTION_END, FUNCTION_START


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_call(body: str, names: set[str] | None) -> ToolCall | None:
    """The call in the JSON between the markers, or None if it is not a valid call."""
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Feed text deltas; get back events ``("content", text)`` and ``("call", ToolCall)`` in
    order. Text that could still be the start of a call marker is held back until it is
    decided; so is an answer that opens with ``{`` (it may be a bare call), until the end."""

    def __init__(self, names: set[str] | None = None, max_calls: int | None = None):
        self.names, self.max_calls = names, max_calls
        self.buffer = ""
        self.in_call = False
        self.calls: list[ToolCall] = []
        self.started = False   # any non-blank text seen
        self.bare = False      # the answer opened with "{": held whole for the fallback
        self.content: list[str] = []

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buffer += text
        events = []
        while True:
            if self.bare:
                return events
            if not self.in_call:
                if not self.started and self.buffer.strip():
                    self.started = True
                    if self.buffer.lstrip().startswith("{") and not self.calls:
                        self.bare = True
                        return events
                at = self.buffer.find(FUNCTION_START)
                if at < 0:
                    keep = _partial_suffix(self.buffer, FUNCTION_START)
                    self._content(events, self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return events
                self._content(events, self.buffer[:at])
                self.buffer = self.buffer[at:]
                self.in_call = True
            end = self.buffer.find(FUNCTION_END)
            if end < 0:
                return events
            block = self.buffer[: end + len(FUNCTION_END)]
            self.buffer = self.buffer[end + len(FUNCTION_END):]
            self.in_call = False
            call = None
            if self.max_calls is None or len(self.calls) < self.max_calls:
                call = parse_call(block[len(FUNCTION_START):-len(FUNCTION_END)], self.names)
            if call is None:
                self._content(events, block)
            else:
                self.calls.append(call)
                events.append(("call", call))

    def finish(self) -> list[tuple[str, object]]:
        """The end of the answer: whatever is held back is decided."""
        events = []
        if self.bare:
            call = parse_call(self.buffer, self.names)
            if call is not None:
                self.calls.append(call)
                events.append(("call", call))
            else:
                self._content(events, self.buffer)
        else:
            self._content(events, self.buffer)  # an unclosed call, or a partial marker
        self.buffer = ""
        return events

    def _content(self, events: list, text: str) -> None:
        if text:
            self.content.append(text)
            events.append(("content", text))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def parse_tool_calls(text: str, names: set[str] | None = None,
                     max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer; content is None when the answer is only calls."""
    p = ToolCallParser(names, max_calls)
    p.feed(text)
    p.finish()
    content = "".join(p.content)
    return (None if p.calls and not content.strip() else content), p.calls
