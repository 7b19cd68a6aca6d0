"""The OpenAI wire format: request bodies validated into engine inputs, and response,
stream-chunk and error bodies built from engine outputs.

Everything a client sends is checked here, with an error that names the offending field,
before any of it reaches the tokenizer or the engine. Fields the OpenAI API defines but
this server cannot honour are rejected unless they carry their no-op default; fields it
does not know are ignored, as vLLM does, so clients that send extras keep working.
"""
from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from .. import structured
from ..engine.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, SampleResult, SamplingParams
from ..tokenizer import text_content
from ..tools.spec import ToolError, ToolSpec, parse_tools

# "observation" is Megrez's own role for tool results, for clients that build the model's
# tool prompt themselves (tools given as "tool" messages are mapped onto it).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "observation")
SEED_RANGE = (-(2 ** 63), 2 ** 64)


@dataclass(frozen=True)
class Limits:
    """Per-request bounds that keep one client from monopolising the server."""
    max_n: int = 16
    max_prompts: int = 16         # prompts in one /v1/completions batch
    max_choices: int = 64         # prompts x n
    max_messages: int = 2048
    max_stop: int = 16
    max_stop_chars: int = 1024
    max_stop_token_ids: int = 1024
    max_logit_bias: int = 300     # entries, as in the OpenAI API
    max_logprobs: int = MAX_LOGPROBS
    max_request_tokens: int = 65536     # tokens one request may generate, over all its choices
    max_response_bytes: int = 16 << 20  # worst-case size of a whole (non-streamed) answer
    max_tokenize_tokens: int = 1 << 20  # tokens /v1/detokenize takes


class APIError(Exception):
    """An error answered to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


# ----------------------------------------------------------------------------------- body
def parse_body(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(None, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise invalid(None, "malformed JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints longer than Python's digit limit
        raise invalid(None, f"malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, got {_json_type(body)}")
    _check_strings(body)
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_strings(obj) -> None:
    """JSON escapes can encode lone UTF-16 surrogates, which are not text and which the
    tokenizer cannot take; reject them here. Iterative: nesting depth is up to the client."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            items = (x,)
        elif isinstance(x, dict):
            items = tuple(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
            continue
        else:
            continue
        for s in items:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise invalid(None, "request body contains an invalid Unicode escape (a lone surrogate)") from None


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


# ----------------------------------------------------------------------------------- fields
def get_int(body: dict, name: str, default=None, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # some clients serialise every number as a float
    if not isinstance(v, int) or isinstance(v, bool):
        raise invalid(name, f"expected an integer, got {_json_type(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise invalid(name, f"must be {_range(lo, hi)} (got {v})")
    return v


def get_number(body: dict, name: str, default=None, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise invalid(name, f"expected a finite number, got {_json_type(v)}")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        bounds = f"in ({lo}, {hi}]" if lo_open else _range(lo, hi)
        raise invalid(name, f"must be {bounds} (got {v})")
    return float(v)


def _integral(v) -> bool:
    """An integer as JSON Schema counts them: 3 or 3.0, not true."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def int_list(v) -> list[int] | None:
    """A JSON array of integers as Python ints (None if it is not one)."""
    if not isinstance(v, list) or not all(_integral(t) for t in v):
        return None
    return [int(t) for t in v]


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, f"expected true or false, got {_json_type(v)}")
    return v


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _reject_unsupported(body: dict) -> None:
    """Fields whose non-default values would change the answer in ways this server cannot do."""
    checks = {
        "functions": lambda v: v == [], "function_call": lambda v: v in ("none", "auto"),
        "audio": lambda v: False, "prediction": lambda v: False,
    }
    for name, ok in checks.items():
        v = body.get(name)
        if v is not None and not ok(v):
            raise invalid(name, "is not supported by this server", code="unsupported_parameter")
    suffix = body.get("suffix")
    if suffix is not None and suffix != "":
        raise invalid("suffix", "is not supported: Megrez models have no fill-in-the-middle format; put the text "
                                "after the gap in the prompt instead", code="unsupported_parameter")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise invalid("modalities", "only [\"text\"] is supported", code="unsupported_parameter")


# ----------------------------------------------------------------------------------- requests
@dataclass
class GenerationRequest:
    """What the routes need: the model asked for, the prompts (text, token ids or chat
    messages), the sampling parameters of choice 0, and how to answer."""
    kind: str                                  # "chat" | "completion"
    model: str | None
    prompts: list                              # chat: [messages]; completion: [str | list[int]]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None                # None: none; k: sampled token plus top k
    echo: bool = False                         # completions: the prompt is part of the answer
    max_tokens_given: bool = False             # by the client (else a default, which limits may lower)
    extra: dict = field(default_factory=dict)
    tools: ToolSpec | None = None              # chat: the functions offered, tool_choice
    web_search: dict | None = None             # chat: the built-in web_search tool's options ({} = defaults)
    response_format: dict | None = None        # {"type": "json_object"} or {"type": "json_schema", "schema": ...}

    def choice_params(self, i: int, prompt_len: int, max_model_len: int, cap: int | None = None) -> SamplingParams:
        """Choice i samples with ``seed + i`` (as vLLM does), so n choices differ yet every
        one is reproducible; max_tokens is capped by what the context leaves, and by ``cap``
        (from the per-request limits) when the client left it unset."""
        p = self.params
        seed = p.seed if p.seed is None else _wrap_seed(p.seed + i)
        room = max_model_len - prompt_len
        if p.max_tokens is None and cap is None:
            max_tokens = None  # until a stop or a full context
        else:
            max_tokens = min(room if p.max_tokens is None else p.max_tokens, room, cap if cap is not None else room)
        return replace(p, seed=seed, max_tokens=max_tokens)

    def token_budget(self, prompt_lens: list[int], max_model_len: int, limits: "Limits",
                     per_token_bytes: int) -> tuple[int | None, str | None]:
        """Applies the per-request limits to the tokens the choices may generate. Returns a cap
        on each choice's max_tokens (None: no cap) and the limit that set it (for metrics).
        An explicit max_tokens over a limit is refused; an unset one is lowered to fit."""
        choices = len(prompt_lens) * self.n
        rooms = [max_model_len - n for n in prompt_lens for _ in range(self.n)]
        asked = [r if self.params.max_tokens is None else min(self.params.max_tokens, r) for r in rooms]
        caps = {}
        if sum(asked) > limits.max_request_tokens:
            caps["max_request_tokens"] = limits.max_request_tokens // choices
        if not self.stream:
            # Worst case of a whole answer: every token as long as the longest in the vocabulary.
            echoed = sum(prompt_lens) * self.n if self.echo else 0
            room = limits.max_response_bytes - echoed * per_token_bytes - 1024 * choices
            if sum(asked) * per_token_bytes > room:
                caps["max_response_bytes"] = max(room, 0) // per_token_bytes // choices
        if not caps:
            return None, None
        limit = min(caps, key=caps.get)
        cap = caps[limit]
        what = {"max_request_tokens": f"{limits.max_request_tokens} generated tokens per request "
                                      f"(--max-request-tokens)",
                "max_response_bytes": f"a worst-case answer of {limits.max_response_bytes} bytes "
                                      f"(--max-response-bytes; streams are not limited)"}[limit]
        if self.max_tokens_given or cap < 1:
            param = "max_tokens" if self.max_tokens_given and cap >= 1 else "n"
            error = invalid(param, f"{choices} choice(s) of up to {max(asked)} tokens exceed this server's limit of "
                                   f"{what}; ask for fewer tokens or choices", code="request_too_large")
            error.limit = limit
            raise error
        return cap, limit


def _wrap_seed(seed: int) -> int:
    return seed - 2 ** 64 if seed >= SEED_RANGE[1] else seed


def _model(body: dict) -> str | None:
    m = body.get("model")
    if m is not None and not isinstance(m, str):
        raise invalid("model", f"expected a string, got {_json_type(m)}")
    return m


def _stop(body: dict, limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("stop", "expected a string or an array of strings")
    if len(stop) > limits.max_stop:
        raise invalid("stop", f"at most {limits.max_stop} stop strings are allowed (got {len(stop)})")
    for s in stop:
        if not s:
            raise invalid("stop", "stop strings must not be empty")
        if len(s) > limits.max_stop_chars:
            raise invalid("stop", f"a stop string may have at most {limits.max_stop_chars} characters")
    return stop


def _stop_token_ids(body: dict, limits: Limits, vocab_size: int) -> list[int]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return []
    ids = int_list(ids)
    if ids is None or len(ids) > limits.max_stop_token_ids or not all(0 <= t < vocab_size for t in ids):
        raise invalid("stop_token_ids", f"expected at most {limits.max_stop_token_ids} integers in [0, {vocab_size})")
    return ids


def _logit_bias(body: dict, limits: Limits, vocab_size: int) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise invalid("logit_bias", f"expected an object of token id -> bias, got {_json_type(bias)}")
    if len(bias) > limits.max_logit_bias:
        raise invalid("logit_bias", f"at most {limits.max_logit_bias} entries are allowed (got {len(bias)})")
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise invalid("logit_bias", f"keys are token ids in [0, {vocab_size}) written as strings (got {key!r})")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or abs(value) > MAX_LOGIT_BIAS:
            raise invalid("logit_bias", f"values are numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] "
                                        f"(got {value!r} for {key!r})")
        out[int(key)] = float(value)
    return out or None


def _sampling(body: dict, limits: Limits, vocab_size: int, max_tokens_names: tuple[str, ...],
              default_max_tokens: int | None, min_tokens: int = 1) -> tuple[SamplingParams, int, bool, bool, bool]:
    max_tokens, given = default_max_tokens, False
    for name in max_tokens_names:  # the first one given wins (max_completion_tokens over max_tokens)
        v = get_int(body, name, lo=min_tokens)  # the others are still checked
        if v is not None and not given:
            max_tokens, given = v, True
    n = get_int(body, "n", 1, lo=1, hi=limits.max_n)
    best_of = get_int(body, "best_of", None, lo=1)
    if best_of is not None and best_of != n:
        raise invalid("best_of", "is only supported equal to n: this server does not rank hidden samples; ask "
                                 "for n choices with logprobs and pick among them", code="unsupported_parameter")
    stream = get_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options", f"expected an object, got {_json_type(options)}")
        if not stream:
            raise invalid("stream_options", "is only allowed when stream is true")
        include_usage = get_bool(options, "include_usage")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=get_number(body, "temperature", lo=0, hi=2),
        top_p=get_number(body, "top_p", lo=0, hi=1, lo_open=True),
        top_k=get_int(body, "top_k", lo=-1),
        repetition_penalty=get_number(body, "repetition_penalty", lo=0, hi=10, lo_open=True),
        presence_penalty=get_number(body, "presence_penalty", 0.0, lo=-2, hi=2),
        frequency_penalty=get_number(body, "frequency_penalty", 0.0, lo=-2, hi=2),
        seed=get_int(body, "seed", lo=SEED_RANGE[0], hi=SEED_RANGE[1] - 1),
        stop=_stop(body, limits),
        stop_token_ids=_stop_token_ids(body, limits, vocab_size),
        ignore_eos=get_bool(body, "ignore_eos"),
        logit_bias=_logit_bias(body, limits, vocab_size),
        skip_special_tokens=get_bool(body, "skip_special_tokens", True),
    )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", f"expected a string, got {_json_type(user)}")
    _reject_unsupported(body)
    return params, n, stream, include_usage, given


def parse_chat(body: dict, limits: Limits, vocab_size: int) -> GenerationRequest:
    model = _model(body)
    messages = parse_messages(body.get("messages"), limits)
    params, n, stream, include_usage, given = _sampling(body, limits, vocab_size,
                                                        ("max_completion_tokens", "max_tokens"), None)
    logprobs = None
    if get_bool(body, "logprobs"):
        logprobs = get_int(body, "top_logprobs", 0, lo=0, hi=limits.max_logprobs)
    elif get_int(body, "top_logprobs", 0, lo=0, hi=limits.max_logprobs) > 0:
        raise invalid("top_logprobs", "requires logprobs to be true")
    params.logprobs = logprobs
    tools, web_search = body.get("tools"), None
    if isinstance(tools, list) and any(isinstance(t, dict) and t.get("type") == "web_search" for t in tools):
        web_search = _web_search(tools, body, n)
        tools = None
    try:
        tools = parse_tools(tools, None if web_search is not None else body.get("tool_choice"),
                            body.get("parallel_tool_calls"))
    except ToolError as e:
        raise invalid(e.param, str(e).split(": ", 1)[1]) from None
    response_format = parse_response_format(body.get("response_format"))
    return GenerationRequest("chat", model, [messages], params, n, stream, include_usage, logprobs,
                             max_tokens_given=given, tools=tools, response_format=response_format,
                             web_search=web_search)


def _web_search(tools: list, body: dict, n: int) -> dict:
    """The built-in tool: {"type": "web_search", "web_search": {"max_results": 1-10, "mode": "auto"|"always"}}."""
    if len(tools) != 1:
        raise invalid("tools", "the web_search tool cannot be combined with other tools")
    if n != 1 or body.get("response_format") not in (None, {"type": "text"}) or body.get("logprobs"):
        raise invalid("tools", "the web_search tool answers with one plain-text choice (n=1, no response_format, "
                               "no logprobs)")
    options = tools[0].get("web_search") or {}
    if not isinstance(options, dict):
        raise invalid("tools[0].web_search", "expected an object")
    out = {}
    if "max_results" in options:
        out["max_results"] = get_int(options, "max_results", lo=1, hi=10)
    mode = options.get("mode", "auto")
    if mode not in ("auto", "always"):
        raise invalid("tools[0].web_search.mode", "expected 'auto' (the model decides) or 'always'")
    out["mode"] = mode
    return out


def parse_response_format(rf) -> dict | None:
    try:
        return structured.parse_response_format(rf)
    except structured.StructuredError as e:
        raise invalid(e.param, str(e).split(": ", 1)[1]) from None


def parse_messages(messages, limits: Limits) -> list[dict]:
    if not isinstance(messages, list):
        raise invalid("messages", "required: an array of {role, content} objects" if messages is None
                      else f"expected an array, got {_json_type(messages)}")
    if not messages:
        raise invalid("messages", "must contain at least one message")
    if len(messages) > limits.max_messages:
        raise invalid("messages", f"at most {limits.max_messages} messages are allowed (got {len(messages)})")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"expected an object, got {_json_type(m)}")
        role = m.get("role")
        if not isinstance(role, str):
            raise invalid(f"{where}.role", "required: a string")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
        content = m.get("content")
        if content is None and role not in ("assistant",):
            raise invalid(f"{where}.content", "required for this role")
        tool_calls = m.get("tool_calls")
        if tool_calls is not None and (role != "assistant" or not isinstance(tool_calls, list)):
            raise invalid(f"{where}.tool_calls", "only an assistant message has tool_calls, an array of calls")
        for j, call in enumerate(tool_calls or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                    not isinstance(fn.get("arguments", "{}"), (str, dict)):
                raise invalid(f"{where}.tool_calls[{j}]", "expected {id, type: 'function', "
                                                          "function: {name, arguments: a JSON string}}")
            if isinstance(fn.get("arguments"), str):
                try:
                    json.loads(fn["arguments"] or "{}")
                except ValueError as e:
                    raise invalid(f"{where}.tool_calls[{j}].function.arguments", f"not valid JSON ({e})") from None
        try:
            text = _media_parts(content, f"{where}.content") or text_content(content, f"{where}.content")
        except ValueError as e:  # the message already names the part
            raise APIError(400, str(e), param=f"{where}.content") from None
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise invalid(f"{where}.name", f"expected a string, got {_json_type(name)}")
        # The OpenAI "developer" role is the system role of newer models.
        msg = {"role": "system" if role == "developer" else role, "content": text}
        if name is not None:
            msg["name"] = name
        if tool_calls:
            msg["tool_calls"] = tool_calls
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


MEDIA_PART_TYPES = ("image_url", "input_audio")


def _media_parts(content, where: str) -> list | None:
    """Content with image_url / input_audio parts stays a list of parts (read and checked by
    ``megrez.multimodal.prompt`` when the prompt is built); None for text-only content."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") in MEDIA_PART_TYPES
                                                 for p in content):
        return None
    for n, part in enumerate(content):
        if not isinstance(part, dict):
            raise ValueError(f"{where}[{n}]: expected an object, got {_json_type(part)}")
        kind = part.get("type")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{n}].text: expected a string")
        if kind not in ("text",) + MEDIA_PART_TYPES:
            raise ValueError(f"{where}[{n}]: unsupported content part type {kind!r} "
                             f"(expected text, image_url or input_audio)")
    return content


def parse_completion(body: dict, limits: Limits, vocab_size: int) -> GenerationRequest:
    model = _model(body)
    prompts = parse_prompt(body.get("prompt"), limits)
    # The OpenAI completions API answers 16 tokens unless asked for more; 0 with echo scores a prompt.
    params, n, stream, include_usage, given = _sampling(body, limits, vocab_size, ("max_tokens",), 16,
                                                        min_tokens=0)
    if len(prompts) * n > limits.max_choices:
        raise invalid("n", f"prompts x n may be at most {limits.max_choices} (got {len(prompts)} x {n})")
    logprobs = get_int(body, "logprobs", None, lo=0, hi=limits.max_logprobs)
    echo = get_bool(body, "echo")
    params.logprobs = logprobs
    if echo and logprobs is not None:
        params.prompt_logprobs = logprobs
    return GenerationRequest("completion", model, prompts, params, n, stream, include_usage, logprobs, echo,
                             max_tokens_given=given,
                             response_format=parse_response_format(body.get("response_format")))


def parse_tokenize(body: dict, limits: Limits) -> tuple[str | None, object, bool]:
    """/v1/tokenize: ``prompt`` (text, or llama.cpp's ``content``) with ``add_special_tokens``
    (default true), or chat ``messages`` with ``add_generation_prompt`` (default true).
    Returns (model, prompt or messages, flag); messages come back as a list."""
    model = _model(body)
    if body.get("messages") is not None:
        if body.get("prompt") is not None:
            raise invalid("messages", "give either prompt or messages, not both")
        return model, parse_messages(body["messages"], limits), get_bool(body, "add_generation_prompt", True)
    key = "prompt" if body.get("prompt") is not None else "content"
    prompt = body.get(key)
    if not isinstance(prompt, str):
        raise invalid("prompt", "required: a string (or messages)" if prompt is None
                      else f"expected a string, got {_json_type(prompt)}")
    add_special = get_bool(body, "add_special_tokens", get_bool(body, "add_special", True))
    return model, prompt, add_special


def parse_detokenize(body: dict, limits: Limits, vocab_size: int) -> tuple[str | None, list[int]]:
    model = _model(body)
    tokens = int_list(body.get("tokens"))
    if tokens is None:
        raise invalid("tokens", "required: an array of token ids")
    if len(tokens) > limits.max_tokenize_tokens:
        raise invalid("tokens", f"at most {limits.max_tokenize_tokens} tokens are allowed (got {len(tokens)})")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise invalid("tokens", f"token ids must be in [0, {vocab_size}) (got {bad[0]})")
    return model, tokens


def parse_prompt(prompt, limits: Limits) -> list:
    """A string, an array of strings, an array of token ids, or an array of those arrays."""
    def token_list(x) -> bool:
        return bool(x) and int_list(x) is not None

    if isinstance(prompt, str):
        return [prompt]
    if token_list(prompt):
        return [int_list(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or token_list(p) for p in prompt):
        if len(prompt) > limits.max_prompts:
            raise invalid("prompt", f"at most {limits.max_prompts} prompts per request (got {len(prompt)})")
        return [p if isinstance(p, str) else int_list(p) for p in prompt]
    if prompt is None:
        raise invalid("prompt", "required: a string, an array of strings, or an array of token ids")
    raise invalid("prompt", "expected a string, an array of strings, an array of token ids, "
                            "or an array of token-id arrays")


# ----------------------------------------------------------------------------------- token text
class TokenText:
    """The text and exact bytes of single tokens, for logprobs. A byte-level BPE token can
    hold part of a UTF-8 character, so its bytes come from the vocabulary, not from decode();
    such a token is shown as ``bytes:\\xe4\\xbd`` (OpenAI's convention), which keeps the
    texts of different tokens different."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.added = {i: t.content for i, t in tokenizer.hf.get_added_tokens_decoder().items()}
        decoder = json.loads(tokenizer.hf.to_str()).get("decoder") or {}
        self.byte_level = decoder.get("type") == "ByteLevel"
        self._byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._longest: tuple[int, int] | None = None

    def entry_bytes(self, logprobs: int | None) -> int:
        """The most bytes one token can add to a JSON answer: its text, and with logprobs its
        entry and ``logprobs`` alternatives, each as long as the longest token's."""
        if self._longest is None:
            text = raw = size = 0
            for i in range(self.tokenizer.vocab_size):
                t, b = self._lookup(i)
                text = max(text, len(json.dumps(t, ensure_ascii=False).encode()))
                raw = max(raw, len(json.dumps(b)))
                size = max(size, len(b))
            self._longest = (text, raw)
            self.longest_token_bytes = max(size, 1)
        text, raw = self._longest
        return text + (0 if logprobs is None else (logprobs + 1) * (text + raw + 64))

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        if token_id in self.added:
            raw = self.added[token_id].encode("utf-8")
        else:
            piece = self.tokenizer.hf.id_to_token(token_id) or ""
            if self.byte_level and all(c in self._byte_of for c in piece):
                raw = bytes(self._byte_of[c] for c in piece)
            else:
                raw = self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)


class TextOffsets:
    """Where each token of one answer starts in its text, in characters. A token holding
    part of a UTF-8 character starts where that character will: offsets count the
    characters completed by the tokens before it."""

    def __init__(self):
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, raw: list[int]) -> int:
        start = self.offset
        self.offset += len(self._decoder.decode(bytes(raw)))
        return start


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ----------------------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(samples: list[SampleResult], token_text: TokenText) -> dict:
    content = []
    for s in samples:
        text, raw = token_text(s.token)
        top = []
        for tid, lp in s.top_logprobs or []:
            t, b = token_text(tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        content.append({"token": text, "logprob": s.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(samples: list[SampleResult], token_text: TokenText, offsets: TextOffsets) -> dict:
    """The legacy format, for the next tokens of one choice (``offsets`` carries on from the
    tokens before them)."""
    tokens, lps, tops, starts = [], [], [], []
    for s in samples:
        text, raw = token_text(s.token)
        tokens.append(text)
        lps.append(s.logprob)
        starts.append(offsets.advance(raw))
        if s.logprob is None:  # an echoed prompt's first token: nothing predicts it
            tops.append(None)
            continue
        top = {}
        for tid, lp in s.top_logprobs or []:
            top.setdefault(token_text(tid)[0], lp)
        top[text] = s.logprob  # as vLLM, the sampled token is always listed, with its own value
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": starts}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish_reason}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def envelope(kind: str, rid: str, created: int, model: str, choices: list, chunk: bool = False, **extra) -> dict:
    obj = "chat.completion" if kind == "chat" else "text_completion"
    if chunk and kind == "chat":
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra}


def public_finish_reason(reason: str | None) -> str | None:
    # An aborted request has no OpenAI equivalent; it only reaches a client at shutdown.
    return "stop" if reason == "abort" else reason


# Characters that str.splitlines-style readers (httpx's aiter_lines among them) take for line
# breaks; generated text can contain them, and raw inside an event they would cut it in two.
_LINE_BREAKERS = {c: f"\\u{ord(c):04x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}
_ESCAPE_BREAKERS = str.maketrans(_LINE_BREAKERS)


def sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # Inside JSON these characters only occur in strings, where the \u escape means the same.
    return f"data: {text.translate(_ESCAPE_BREAKERS)}\n\n".encode("utf-8")
