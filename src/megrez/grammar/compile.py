"""Grammars for constrained decoding, in llguidance's serialised form: from a JSON schema, any
JSON object, a Lark (or GBNF) grammar, a regex, or the Megrez tool-call format.

Nothing here needs a tokenizer; :class:`megrez.grammar.GrammarCompiler` checks a grammar
against one and makes the per-request matchers.
"""
from __future__ import annotations

import json

import llguidance as llg

# JSON is written with fixed separators and no free whitespace: a model cannot wander into
# endless blank space, and the output is exactly what json.dumps() writes (what models see
# most). A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FUNCTION_START, FUNCTION_END = "<|function_start|>", "<|function_end|>"


class GrammarError(ValueError):
    """A schema or grammar that cannot constrain generation; the message says why."""


def json_schema_grammar(schema, where: str = "schema") -> str:
    if schema is True:
        schema = {}
    if schema is False:
        raise GrammarError(f"{where}: the schema `false` accepts no value at all")
    if not isinstance(schema, dict):
        raise GrammarError(f"{where}: a JSON schema is an object (got {type(schema).__name__})")
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"{where}: {e}") from None


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return json_schema_grammar({"type": "object"})


def lark_grammar(text: str) -> str:
    """A Lark grammar as llguidance reads it (``%json {...}`` embeds a JSON schema,
    ``<|name|>`` a special token); GBNF (llama.cpp's format, ``root ::= ...``) is converted."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("grammar: expected the text of a Lark or GBNF grammar")
    if "::=" in text:
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # the converter raises plain exceptions on syntax errors
            raise GrammarError(f"grammar: not a valid GBNF grammar ({e})") from None
    return llg.LLMatcher.grammar_from_lark(text)


def regex_grammar(pattern: str) -> str:
    return llg.LLMatcher.grammar_from_regex(pattern)


def tool_call_grammar(functions: list[dict], parallel: bool, start_token: bool = True) -> str:
    """One (or, with ``parallel``, one or more) Megrez tool calls and nothing else:
    ``<|function_start|>{"name": N, "arguments": {...}}<|function_end|>``, where N is one of
    ``functions`` and the arguments follow that function's ``parameters`` schema.
    ``start_token=False`` writes the markers as text, for a vocabulary without those tokens."""
    if not functions:
        raise GrammarError("tools: no function to call")
    alternatives = []
    for fn in functions:
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object"}
        alternatives.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                             "required": ["name", "arguments"], "additionalProperties": False})
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    begin, end = (FUNCTION_START, FUNCTION_END) if start_token else (json.dumps(FUNCTION_START),
                                                                     json.dumps(FUNCTION_END))
    return lark_grammar(f"start: call{'+' if parallel else ''}\n"
                        f"call: {begin} body {end}\n"
                        f"body: %json {json.dumps(schema, ensure_ascii=False)}\n")
