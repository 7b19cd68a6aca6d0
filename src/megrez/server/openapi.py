"""``GET /openapi.json``: the API as the server really validates it.

Request bodies are checked by hand in ``protocol`` (to name the field at fault), so the
schema is written here from the same limits and constants rather than generated from
framework models: every bound below is the one ``protocol`` enforces, and a body the schema
allows is one the server accepts unless it breaks a rule JSON Schema cannot say (a prompt
longer than the context, a per-request limit over all choices). ``best_of`` is left out: it
is accepted only equal to ``n``, for clients that always send it.
"""
from __future__ import annotations

from ..engine.sampling import MAX_LOGIT_BIAS
from .protocol import CHAT_ROLES, SEED_RANGE, Limits


def _nullable(schema: dict) -> dict:
    t = schema.get("type")
    return {**schema, "type": [t, "null"]} if isinstance(t, str) else {"anyOf": [schema, {"type": "null"}]}


def _sampling_fields(limits: Limits, vocab: int) -> dict:
    number = {"type": "number"}
    return {
        "model": {"type": ["string", "null"], "description": "a served model name (default: the first)"},
        "temperature": _nullable({**number, "minimum": 0, "maximum": 2}),
        "top_p": _nullable({**number, "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": _nullable({"type": "integer", "minimum": -1, "description": "0 or -1: off"}),
        "repetition_penalty": _nullable({**number, "exclusiveMinimum": 0, "maximum": 10}),
        "presence_penalty": _nullable({**number, "minimum": -2, "maximum": 2}),
        "frequency_penalty": _nullable({**number, "minimum": -2, "maximum": 2}),
        "seed": _nullable({"type": "integer", "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1] - 1}),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": limits.max_n}),
        "stop": _nullable({"oneOf": [
            {"type": "string", "minLength": 1, "maxLength": limits.max_stop_chars},
            {"type": "array", "maxItems": limits.max_stop,
             "items": {"type": "string", "minLength": 1, "maxLength": limits.max_stop_chars}}]}),
        "stop_token_ids": _nullable({"type": "array", "maxItems": limits.max_stop_token_ids,
                                     "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}),
        "ignore_eos": _nullable({"type": "boolean"}),
        "logit_bias": _nullable({"type": "object", "maxProperties": limits.max_logit_bias,
                                 "propertyNames": {"pattern": integers_below(vocab)},
                                 "additionalProperties": {**number, "minimum": -MAX_LOGIT_BIAS,
                                                          "maximum": MAX_LOGIT_BIAS},
                                 "description": f"token id (as a string, below {vocab}) -> bias added to its logit"}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                                     "description": "only with stream: true"}),
        "user": _nullable({"type": "string"}),
    }


def _text_parts() -> dict:
    return {"type": "array", "items": {"oneOf": [
        {"type": "string"},
        {"type": "object", "required": ["text"],
         "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}]}}


def _messages(limits: Limits) -> dict:
    content = [{"type": "string"}, _text_parts()]

    def message(roles: list[str], content_required: bool) -> dict:
        return {"type": "object", "required": ["role", "content"] if content_required else ["role"],
                "properties": {"role": {"enum": roles},
                               "content": {"oneOf": content if content_required else [*content, {"type": "null"}]},
                               "name": {"type": ["string", "null"]}}}

    # Only an assistant message may leave its content out.
    others = [r for r in CHAT_ROLES if r != "assistant"]
    return {"type": "array", "minItems": 1, "maxItems": limits.max_messages,
            "items": {"oneOf": [message(others, True), message(["assistant"], False)]}}


def integers_below(n: int) -> str:
    """A regular expression for the decimal integers 0..n-1 (token ids written as strings)."""
    digits = str(n - 1)
    parts = ["[0-9]"] if len(digits) > 1 else [f"[0-{digits}]"]
    parts += [f"[1-9][0-9]{{{k - 1}}}" for k in range(2, len(digits))]
    if len(digits) > 1:
        # Numbers with as many digits as n - 1: a common prefix, then one smaller digit, then anything.
        for i, d in enumerate(digits):
            last = i == len(digits) - 1
            lo = "1" if i == 0 else "0"
            top = int(d) if last else int(d) - 1
            if top >= int(lo):
                rest = "" if last else f"[0-9]{{{len(digits) - i - 1}}}"
                parts.append(f"{digits[:i]}[{lo}-{top}]{rest}")
    return "^(" + "|".join(parts) + ")$"


def _only_with(field: str, condition: dict, needs: str, value) -> dict:
    """``field`` (when it matches ``condition``) requires ``needs`` to be ``value``."""
    return {"if": {"required": [field], "properties": {field: condition}},
            "then": {"required": [needs], "properties": {needs: {"const": value}}}}


def request_schemas(limits: Limits, vocab: int) -> dict:
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}
    stream_rule = _only_with("stream_options", {"type": "object"}, "stream", True)
    chat = {"type": "object", "required": ["messages"], "additionalProperties": True,
            "allOf": [stream_rule, _only_with("top_logprobs", {"type": "integer", "minimum": 1}, "logprobs", True)],
            "properties": {
        **_sampling_fields(limits, vocab),
        "messages": _messages(limits),
        "max_tokens": _nullable({"type": "integer", "minimum": 1}),
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
        "logprobs": _nullable({"type": "boolean"}),
        "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": limits.max_logprobs,
                                   "description": "above 0 only with logprobs: true"}),
        "tools": _nullable({"type": "array", "maxItems": 0, "description": "not supported (empty only)"}),
        "tool_choice": {"enum": ["none", "auto", None]},
        "response_format": _nullable({"type": "object", "properties": {"type": {"const": "text"}},
                                      "required": ["type"]}),
    }}
    completion = {"type": "object", "required": ["prompt"], "additionalProperties": True, "allOf": [stream_rule],
                  "properties": {
        **_sampling_fields(limits, vocab),
        "prompt": {"oneOf": [
            {"type": "string", "minLength": 1}, token_ids,
            {"type": "array", "minItems": 1, "maxItems": limits.max_prompts,
             "items": {"oneOf": [{"type": "string", "minLength": 1}, token_ids]}}]},
        "max_tokens": _nullable({"type": "integer", "minimum": 0,
                                 "description": "default 16; 0: with echo, score the prompt only"}),
        "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": limits.max_logprobs}),
        "echo": _nullable({"type": "boolean", "description": "answer with the prompt first; with logprobs, "
                                                             "the prompt tokens' logprobs too"}),
        "suffix": {"type": ["string", "null"], "maxLength": 0, "description": "not supported (empty only)"},
    }}
    tokenize = {"oneOf": [
        {"type": "object", "required": ["prompt"], "properties": {
            "model": {"type": ["string", "null"]}, "prompt": {"type": "string"}, "messages": {"type": "null"},
            "add_special_tokens": {"type": ["boolean", "null"]}}},
        {"type": "object", "required": ["messages"], "properties": {
            "model": {"type": ["string", "null"]}, "messages": _messages(limits), "prompt": {"type": "null"},
            "add_generation_prompt": {"type": ["boolean", "null"]}}}]}
    detokenize = {"type": "object", "required": ["tokens"], "properties": {
        "model": {"type": ["string", "null"]},
        "tokens": {"type": "array", "maxItems": limits.max_tokenize_tokens,
                   "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}}}
    return {"ChatCompletionRequest": chat, "CompletionRequest": completion, "TokenizeRequest": tokenize,
            "DetokenizeRequest": detokenize}


def _response_schemas() -> dict:
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
        "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}}}}
    finish = {"enum": ["stop", "length", None]}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
        "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                           "properties": {
                               "id": {"type": "string"}, "object": {"const": "chat.completion"},
                               "created": {"type": "integer"}, "model": {"type": "string"}, "usage": usage,
                               "choices": {"type": "array", "items": {"type": "object", "properties": {
                                   "index": {"type": "integer"}, "finish_reason": finish,
                                   "message": {"type": "object", "properties": {
                                       "role": {"const": "assistant"}, "content": {"type": "string"}}},
                                   "logprobs": {"type": ["object", "null"]}}}}}},
        "Completion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                       "properties": {
                           "id": {"type": "string"}, "object": {"const": "text_completion"},
                           "created": {"type": "integer"}, "model": {"type": "string"}, "usage": usage,
                           "choices": {"type": "array", "items": {"type": "object", "properties": {
                               "index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": finish,
                               "logprobs": {"type": ["object", "null"]}}}}}},
        "TokenizeResponse": {"type": "object", "required": ["tokens", "count", "max_model_len"], "properties": {
            "tokens": {"type": "array", "items": {"type": "integer"}}, "count": {"type": "integer"},
            "max_model_len": {"type": "integer"}}},
        "DetokenizeResponse": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        "TokenizerInfo": {"type": "object", "required": ["eos_token", "chat_template", "model_max_length"],
                          "properties": {"eos_token": {"type": ["string", "null"]},
                                         "bos_token": {"type": ["string", "null"]},
                                         "pad_token": {"type": ["string", "null"]},
                                         "chat_template": {"type": "string"}, "model_max_length": {"type": "integer"},
                                         "vocab_size": {"type": "integer"},
                                         "stop_token_ids": {"type": "array", "items": {"type": "integer"}}}},
        "Model": {"type": "object", "required": ["id", "object"], "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}}},
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}},
    }


ERRORS = {"400": "invalid request (the message names the field)", "401": "missing or wrong API key",
          "404": "unknown model", "408": "request body not received in time", "413": "request body too large",
          "415": "body not sent as application/json", "429": "queue full (Retry-After)",
          "500": "generation failed", "503": "shutting down"}


def _json(ref: str) -> dict:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _post(summary: str, request: str, response: str, streams: bool, auth: bool) -> dict:
    ok = {"description": "the answer", "content": _json(response)}
    if streams:
        ok["content"]["text/event-stream"] = {
            "schema": {"type": "object", "properties": {"data": {"type": "string"}}},
            "description": "with stream: true: data: {chunk} events, then data: [DONE]"}
    op = {"summary": summary, "requestBody": {"required": True, "content": _json(request)},
          "responses": {"200": ok, **{code: {"description": why, "content": _json("Error")}
                                      for code, why in ERRORS.items()}}}
    if auth:
        op["security"] = [{"bearer": []}]
    return {"post": op}


def document(model_names: list[str], limits: Limits, vocab: int, max_model_len: int, auth: bool) -> dict:
    from .. import __version__

    def get(summary, ref=None, content_type="application/json", secured=False):
        ok = {"description": summary}
        ok["content"] = _json(ref) if ref else {content_type: {"schema": {"type": "string"}}}
        op = {"summary": summary, "responses": {"200": ok}}
        if secured and auth:
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = {"description": ERRORS["401"], "content": _json("Error")}
        return op

    paths = {
        "/v1/chat/completions": _post("Chat completion", "ChatCompletionRequest", "ChatCompletion", True, auth),
        "/v1/completions": _post("Text completion", "CompletionRequest", "Completion", True, auth),
        "/v1/tokenize": _post("Token ids of a text or a rendered chat", "TokenizeRequest", "TokenizeResponse",
                              False, auth),
        "/v1/detokenize": _post("Text of token ids", "DetokenizeRequest", "DetokenizeResponse", False, auth),
        "/tokenizer_info": {"get": get("The tokenizer's special tokens, chat template and context",
                                       "TokenizerInfo", secured=True)},
        "/v1/models": {"get": get("The served models", "ModelList", secured=True)},
        "/v1/models/{model}": {"get": {**get("One served model", "Model", secured=True), "parameters": [
            {"name": "model", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]+$"}}]}},
        "/health": {"get": {**get("ok, or 503 when the engine is not serving", content_type="application/json"),
                            "responses": {"200": {"description": "serving"}, "503": {"description": "not serving"}}},
                    "head": {"summary": "as GET, without a body", "responses": {"200": {"description": "serving"}}}},
        "/metrics": {"get": get("Prometheus metrics", content_type="text/plain")},
        "/openapi.json": {"get": get("This document")},
    }
    paths["/v1/models/{model}"]["get"]["responses"]["404"] = {"description": ERRORS["404"],
                                                              "content": _json("Error")}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "megrez", "version": __version__,
                 "description": f"OpenAI-compatible API serving {', '.join(model_names)} "
                                f"(context {max_model_len} tokens, vocabulary {vocab})."},
        "paths": paths,
        "components": {"schemas": {**request_schemas(limits, vocab), **_response_schemas()}},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
