"""What a request needs to honour ``tools`` and ``response_format``, for the server and the
Python API alike: the prompt with the tools in it, the grammar that constrains the answer
(a JSON schema, any JSON object, or a forced tool call whose arguments follow the function's
schema), the sampling changes that keep calls readable, and the reader that turns one
answer's text into content and tool calls (whole, or as deltas while it streams)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from .engine.sampling import SamplingParams
from .tools import FUNCTION_END, FUNCTION_START, ToolCallParser, ToolSpec, render_messages


class StructuredError(ValueError):
    """A response_format or tool schema that cannot be used; ``param`` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message if message.startswith(param) else f"{param}: {message}")
        self.param = param


def parse_response_format(rf) -> dict | None:
    """OpenAI's response_format: None for plain text; else {"type": "json_object"} or
    {"type": "json_schema", "name": ..., "schema": ...}."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise StructuredError("response_format", "expected an object")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise StructuredError("response_format.json_schema", "required: an object with name and schema")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise StructuredError("response_format.json_schema.name", "expected a string")
        if "schema" not in js:
            raise StructuredError("response_format.json_schema.schema", "required: a JSON schema")
        if not isinstance(js["schema"], (dict, bool)):
            raise StructuredError("response_format.json_schema.schema", "expected a JSON schema object")
        return {"type": "json_schema", "name": name, "schema": js["schema"]}
    raise StructuredError("response_format.type", f"expected 'text', 'json_object' or 'json_schema' (got {kind!r})")


@dataclass
class Plan:
    """One request's grammar and how to read its answers."""
    grammar: str | None = None
    tools: ToolSpec | None = None
    function_end_id: int | None = None
    compiler: object = field(default=None, repr=False)

    def processors(self) -> list:
        """Fresh per answer: a matcher keeps the state of one answer."""
        return [self.compiler.processor(self.grammar)] if self.grammar else []

    def reader(self) -> "CallReader | None":
        if self.tools is None or self.tools.choice == "none":
            return None
        return CallReader(self.tools, self.function_end_id)

    def params(self, params: SamplingParams) -> SamplingParams:
        """The call markers are special tokens: keep them in the text. With one call allowed
        (and no grammar to end it), stop at the end of the first call."""
        if self.tools is None or self.tools.choice == "none":
            return params
        stop_ids = list(params.stop_token_ids)
        if not self.tools.parallel and self.function_end_id is not None and not self.grammar:
            stop_ids.append(self.function_end_id)
        return replace(params, skip_special_tokens=False, stop_token_ids=stop_ids)


class Structured:
    """One per model. The grammar compiler (llguidance's view of the vocabulary) is built on
    first use; ``clock`` stamps the time line of the Megrez tool prompt."""

    def __init__(self, tokenizer, vocab_size: int, clock=datetime.now):
        self.tokenizer, self.vocab_size, self.clock = tokenizer, vocab_size, clock
        self._compiler = None

    @property
    def compiler(self):
        if self._compiler is None:
            from .grammar import GrammarCompiler

            self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size)
        return self._compiler

    def chat_messages(self, messages: list[dict], tools: ToolSpec | None) -> tuple[list[dict], dict]:
        """(messages, chat-template keyword arguments) with the tools and the calls and results
        in the model's format (ValueError for a call whose arguments are not JSON)."""
        return render_messages(self.tokenizer, messages, tools.offered if tools else [], self.clock())

    def chat_prompt(self, messages: list[dict], tools: ToolSpec | None) -> list[int]:
        """Token ids of a conversation, tools included (ValueError if it cannot be rendered)."""
        msgs, kwargs = self.chat_messages(messages, tools)
        return self.tokenizer.encode_chat(msgs, **kwargs)

    def plan(self, tools: ToolSpec | None = None, response_format: dict | None = None,
             grammar: str | None = None, grammar_source: str = "grammar") -> Plan:
        """``grammar``: an llguidance grammar made by ``megrez.grammar`` (wins over the rest).
        Raises StructuredError for a schema that is invalid or can match nothing."""
        from .grammar import GrammarError, json_object_grammar, json_schema_grammar, tool_call_grammar

        plan = Plan(tools=tools, function_end_id=self.tokenizer.token_to_id(FUNCTION_END))
        if response_format and tools and tools.forced:
            raise StructuredError("response_format", "cannot be combined with a tool_choice that forces a call "
                                                     "(the call's arguments already follow the function's schema)")
        where = grammar_source
        try:
            if grammar is not None:
                plan.grammar = grammar
            elif response_format is not None:
                if response_format["type"] == "json_object":
                    where, plan.grammar = "response_format", json_object_grammar()
                else:
                    where = "response_format.json_schema.schema"
                    plan.grammar = json_schema_grammar(response_format["schema"], where)
            elif tools and tools.forced:
                if self.tokenizer.template_takes_tools:
                    raise StructuredError("tool_choice", "forcing a call needs the Megrez tool format; this "
                                                         "checkpoint's chat template has its own")
                index = {f["name"]: i for i, f in enumerate(tools.functions)}
                for fn in tools.forced:  # each schema on its own first, for an error that names it
                    where = f"tools[{index[fn['name']]}].function.parameters"
                    self.compiler.check(json_schema_grammar(fn.get("parameters", {"type": "object"}), where), where)
                special = self.compiler.has_token(FUNCTION_START) and self.compiler.has_token(FUNCTION_END)
                where, plan.grammar = "tool_choice", tool_call_grammar(tools.forced, tools.parallel, special)
            if plan.grammar is not None:
                self.compiler.check(plan.grammar, where)
        except GrammarError as e:
            raise StructuredError(where, str(e)) from None
        plan.compiler = self.compiler if plan.grammar else None
        return plan


class CallReader:
    """One answer's text -> content and tool calls. ``feed`` and ``finish`` give OpenAI stream
    deltas; ``message`` reads a whole answer."""

    def __init__(self, tools: ToolSpec, function_end_id: int | None):
        names = {f["name"] for f in tools.functions}
        self.parser = ToolCallParser(names, None if tools.parallel else 1)
        self.function_end_id = function_end_id

    @property
    def calls(self):
        return self.parser.calls

    @property
    def content(self) -> str:
        return "".join(self.parser.content)

    def feed(self, text: str) -> list[dict]:
        return self._deltas(self.parser.feed(text)) if text else []

    def finish(self, reason: str | None, last_token: int | None) -> tuple[list[dict], str | None]:
        """The answer ended (``last_token``: its final token, a stop token included)."""
        events = []
        if reason == "stop" and last_token is not None and last_token == self.function_end_id:
            events += self.parser.feed(FUNCTION_END)  # a stop token's text is not in the output
        events += self.parser.finish()
        if self.parser.calls and reason == "stop":
            reason = "tool_calls"
        return self._deltas(events), reason

    def message(self, text: str, reason: str | None, last_token: int | None) -> tuple[dict, str | None]:
        self.feed(text)
        _, reason = self.finish(reason, last_token)
        content, calls = self.content, self.parser.calls
        msg = {"role": "assistant", "content": None if calls and not content.strip() else content}
        if calls:
            msg["tool_calls"] = [c.to_openai() for c in calls]
        return msg, reason

    def _deltas(self, events) -> list[dict]:
        out = []
        for kind, value in events:
            if kind == "content":
                if out and "content" in out[-1]:
                    out[-1]["content"] += value
                else:
                    out.append({"content": value})
            else:
                out.append({"tool_calls": [{"index": self.parser.calls.index(value), **value.to_openai()}]})
        return out
