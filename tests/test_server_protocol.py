"""Request validation, response shapes and metrics of the server, without a server.

    PYTHONPATH=src python -m pytest -q tests/test_server_protocol.py
"""
import argparse
import json

import pytest

from megrez.server import protocol
from megrez.server.cli import parse_size
from megrez.server.metrics import Exposition, Histogram
from megrez.server.protocol import APIError, Limits, parse_body, parse_chat, parse_completion

LIMITS = Limits()
VOCAB = 1000
USER = [{"role": "user", "content": "hi"}]


def error_of(fn, *args) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args)
    return e.value


def test_parse_body_rejects_what_is_not_a_json_object():
    assert parse_body(b'{"a": [1, "\\u00e9"]}') == {"a": [1, "é"]}
    for raw, words in ((b"\xc3\x28", "UTF-8"), (b"{", "malformed JSON"), (b"[]", "an array"),
                       (b'{"t": Infinity}', "Infinity"), (b'{"s": "\\udfff"}', "surrogate"),
                       (b"[" * 100000, "malformed JSON")):
        e = error_of(parse_body, raw)
        assert e.status == 400 and words in e.message


def test_chat_fields_map_onto_sampling_params():
    req = parse_chat({"messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}] + USER,
                      "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.8, "top_k": 40,
                      "seed": 3, "n": 2, "stop": "END", "presence_penalty": 0.5, "frequency_penalty": -0.5,
                      "logprobs": True, "top_logprobs": 4, "stream": True, "stream_options": {"include_usage": True},
                      "ignore_eos": True, "stop_token_ids": [7], "user": "u1", "unknown_extra": {"x": 1}},
                     LIMITS, VOCAB)
    p = req.params
    assert req.prompts == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (7, 0.5, 0.8, 40, 3)
    assert (p.stop, p.presence_penalty, p.frequency_penalty, p.logprobs) == (["END"], 0.5, -0.5, 4)
    assert (p.ignore_eos, p.stop_token_ids) == (True, [7])
    assert (req.n, req.stream, req.include_usage, req.logprobs) == (2, True, True, 4)


def test_top_logprobs_zero_needs_no_logprobs():
    assert parse_chat({"messages": USER, "top_logprobs": 0}, LIMITS, VOCAB).logprobs is None
    assert error_of(parse_chat, {"messages": USER, "top_logprobs": 1}, LIMITS, VOCAB).param == "top_logprobs"


def test_integral_floats_are_integers():
    assert parse_chat({"messages": USER, "max_tokens": 12.0}, LIMITS, VOCAB).params.max_tokens == 12
    assert error_of(parse_chat, {"messages": USER, "max_tokens": 12.5}, LIMITS, VOCAB).param == "max_tokens"


def test_choice_params_seed_plus_index_and_context_cap():
    req = parse_chat({"messages": USER, "max_tokens": 500, "seed": 2 ** 64 - 1}, LIMITS, VOCAB)
    assert req.choice_params(0, 100, 256).max_tokens == 156  # what the context leaves
    assert req.choice_params(0, 10, 256).seed == 2 ** 64 - 1
    assert req.choice_params(1, 10, 256).seed == 0  # wraps instead of leaving the seed range
    unseeded = parse_chat({"messages": USER}, LIMITS, VOCAB)
    assert unseeded.choice_params(3, 10, 256).seed is None and unseeded.choice_params(3, 10, 256).max_tokens is None


def test_completion_prompts_and_defaults():
    assert parse_completion({"prompt": "a"}, LIMITS, VOCAB).params.max_tokens == 16
    assert parse_completion({"prompt": [1, 2]}, LIMITS, VOCAB).prompts == [[1, 2]]
    assert parse_completion({"prompt": ["a", [3]]}, LIMITS, VOCAB).prompts == ["a", [3]]
    assert parse_completion({"prompt": "a", "logprobs": 0}, LIMITS, VOCAB).logprobs == 0
    e = error_of(parse_completion, {"prompt": ["a"] * (LIMITS.max_prompts + 1)}, LIMITS, VOCAB)
    assert e.param == "prompt"


def test_unsupported_fields_pass_only_with_their_default():
    body = {"messages": USER, "tools": [], "tool_choice": "none", "logit_bias": {}, "response_format": {"type": "text"}}
    parse_chat(body, LIMITS, VOCAB)
    for field, value in (("functions", [{"name": "f"}]), ("prediction", {"type": "content"}),
                         ("modalities", ["text", "audio"])):
        e = error_of(parse_chat, {"messages": USER, field: value}, LIMITS, VOCAB)
        assert e.param == field and e.code == "unsupported_parameter"


def test_text_offsets_count_completed_characters():
    offsets = protocol.TextOffsets()
    pieces = [b"a", b"\xe4\xbd", b"\xa0", b"b", b"\xff", b"c"]  # "a你b", then an invalid byte
    assert [offsets.advance(list(p)) for p in pieces] == [0, 1, 1, 2, 3, 4]


def test_error_body_shape():
    e = protocol.invalid("temperature", "must be in [0, 2] (got 3)")
    assert e.body() == {"error": {"message": "temperature: must be in [0, 2] (got 3)",
                                  "type": "invalid_request_error", "param": "temperature", "code": None}}


def test_sse_framing():
    assert protocol.sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(protocol.sse({"t": "你好"})[6:]) == {"t": "你好"}


def test_histogram_buckets_are_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    e = Exposition()
    e.histogram("x_seconds", "help", h)
    lines = e.text().splitlines()
    assert lines[2:] == ['x_seconds_bucket{le="0.1"} 2', 'x_seconds_bucket{le="1.0"} 3',
                         'x_seconds_bucket{le="+Inf"} 4', "x_seconds_sum 3.65", "x_seconds_count 4"]


def test_metric_labels_are_escaped():
    e = Exposition()
    e.metric("m", "gauge", "help", [({"model": 'a"b\\c'}, 1)])
    assert e.text().splitlines()[-1] == 'm{model="a\\"b\\\\c"} 1'


def test_parse_size():
    assert parse_size("4MiB") == 4 << 20
    assert parse_size("512k") == 512 << 10
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("123") == 123
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_sse_events_survive_splitlines_readers():
    """Generated text may hold U+2028, U+0085 and the like; str.splitlines-style readers
    (httpx's aiter_lines) must still see one event per line, decoding to the same text."""
    from megrez.server.protocol import sse

    text = "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\x1dh\x1ei 你好"
    event = sse({"choices": [{"delta": {"content": text}}]}).decode("utf-8")
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == text
    assert "你好" in event  # everything else stays readable UTF-8


def test_token_id_pattern_matches_exactly_the_ids_below_the_vocabulary():
    import re

    from megrez.server.openapi import integers_below

    for n in (1, 7, 10, 11, 99, 100, 935, 8192, 151936):
        pattern = re.compile(integers_below(n))
        assert all(bool(pattern.match(str(i))) == (i < n) for i in range(n + 1200)), n
        assert not pattern.match("-1") and not pattern.match("") and not pattern.match("1.0")


def test_max_tokens_fields_are_all_checked_and_the_first_given_wins():
    e = error_of(parse_chat, {"messages": USER, "max_completion_tokens": 5, "max_tokens": 0}, LIMITS, VOCAB)
    assert e.param == "max_tokens"
    req = parse_chat({"messages": USER, "max_completion_tokens": 5, "max_tokens": 9}, LIMITS, VOCAB)
    assert req.params.max_tokens == 5 and req.max_tokens_given


def test_token_budget_caps_defaults_and_refuses_explicit_excess():
    limits = Limits(max_request_tokens=100)
    req = parse_completion({"prompt": ["a", "b"], "n": 2}, limits, VOCAB)  # the default 16 x 4 fits
    assert req.token_budget([3, 3], 1024, limits, 10) == (None, None)
    req = parse_completion({"prompt": ["a", "b"], "n": 4}, limits, VOCAB)  # 16 x 8 > 100: lowered
    assert req.token_budget([3, 3], 1024, limits, 10) == (12, "max_request_tokens")
    assert req.choice_params(0, 3, 1024, 12).max_tokens == 12
    req = parse_completion({"prompt": "a", "n": 4, "max_tokens": 30}, limits, VOCAB)
    e = error_of(req.token_budget, [3], 1024, limits, 10)
    assert e.param == "max_tokens" and e.code == "request_too_large" and e.limit == "max_request_tokens"
    # Whole answers are bounded in bytes (streams are not).
    small = Limits(max_response_bytes=20_000)
    req = parse_chat({"messages": USER, "logprobs": True, "top_logprobs": 5}, small, VOCAB)
    cap, limit = req.token_budget([10], 1024, small, 500)
    assert limit == "max_response_bytes" and 0 < cap * 500 <= 20_000
    req = parse_chat({"messages": USER, "logprobs": True, "top_logprobs": 5, "stream": True}, small, VOCAB)
    assert req.token_budget([10], 1024, small, 500) == (None, None)


def test_echo_asks_for_prompt_logprobs():
    req = parse_completion({"prompt": [1, 2, 3], "echo": True, "logprobs": 2, "max_tokens": 0}, LIMITS, VOCAB)
    assert req.echo and req.params.prompt_logprobs == 2 and req.params.max_tokens == 0
    assert parse_completion({"prompt": "a", "echo": True}, LIMITS, VOCAB).params.prompt_logprobs is None
    assert parse_completion({"prompt": [1.0, 2.0]}, LIMITS, VOCAB).prompts == [[1, 2]]
