"""What evaluation tools and API clients need beyond chat: echo with prompt logprobs (as
lm-evaluation-harness's local-completions sends it), logit_bias, /v1/tokenize and
/v1/detokenize, /openapi.json, and prefix caching under concurrency.

    PYTHONPATH=src python -m pytest -q tests/test_server_scoring.py
"""
from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_server import IGNORE_EOS, KEY, MAX_LEN, MODEL, LiveServer, crowd_streams  # noqa: E402

from megrez.engine import SamplingParams  # noqa: E402
from megrez.llm import LLM  # noqa: E402
from megrez.server.protocol import Limits  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def live(tiny_moe):
    s = LiveServer(tiny_moe)
    yield s
    s.close()


def post(live, path, body):
    r = httpx.post(live.url + path, json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The engine's model, run plainly over the whole sequence, in float64 log-softmax."""
    ids = context + continuation
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double()
    lp = logits.log_softmax(-1)
    positions = range(len(context) - 1, len(ids) - 1)
    total = sum(float(lp[p, ids[p + 1]]) for p in positions)
    greedy = all(int(lp[p].argmax()) == ids[p + 1] for p in positions)
    return total, greedy


def test_echo_logprobs_as_lm_eval_sends_them(live):
    """local-completions' loglikelihood request: token-id prompts, max_tokens 1, echo, logprobs 1;
    it sums token_logprobs[ctxlen:-1] and compares each with max(top_logprobs)."""
    tok = live.tokenizer
    pairs = [("The capital of France is", " Paris"), ("2 + 2 =", " 4"), ("你好，", "世界")]
    prompts, ctxlens = [], []
    for context, continuation in pairs:
        c, w = tok.encode(context), tok.encode(context + continuation)[len(tok.encode(context)):]
        prompts.append(c + w)
        ctxlens.append(len(c))
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
            "seed": 1234}
    out = post(live, "/v1/completions", body)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for choice, ids, ctxlen in zip(out["choices"], prompts, ctxlens):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert choice["text"].startswith(tok.decode(ids, skip_special_tokens=False))
        ours = sum(lp["token_logprobs"][ctxlen:-1])
        ref, greedy = loglikelihood(live.engine.model, ids[:ctxlen], ids[ctxlen:])
        # float32 logits vs a float64 log-softmax over the same logits, summed over a few tokens.
        assert ours == pytest.approx(ref, abs=1e-4 * (len(ids) - ctxlen))
        is_greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                                 lp["top_logprobs"][ctxlen:-1]))
        assert is_greedy == greedy
        offsets = lp["text_offset"]
        assert offsets[0] == 0 and offsets == sorted(offsets)


def test_max_tokens_zero_scores_the_prompt_only(live):
    ids = live.tokenizer.encode("Score this sentence, please.")
    out = post(live, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3})
    choice = out["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == len(ids) and out["usage"]["completion_tokens"] == 0
    assert choice["finish_reason"] == "length" and choice["text"] == live.tokenizer.decode(ids, skip_special_tokens=False)
    assert all(len(top) <= 4 for top in choice["logprobs"]["top_logprobs"][1:])
    ref, _ = loglikelihood(live.engine.model, ids[:1], ids[1:])
    assert sum(choice["logprobs"]["token_logprobs"][1:]) == pytest.approx(ref, abs=1e-4 * len(ids))
    # Without echo, max_tokens 0 is an empty answer; without logprobs, echo is just the text.
    plain = post(live, "/v1/completions", {"prompt": "abc", "max_tokens": 0})
    assert plain["choices"][0]["text"] == "" and plain["usage"]["completion_tokens"] == 0
    echoed = post(live, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "echo": True, "temperature": 0,
                                            "ignore_eos": True})
    alone = post(live, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert echoed["choices"][0]["text"] == "abc" + alone["choices"][0]["text"]


def test_echo_streams_the_prompt_first(live):
    body = {"prompt": "Once upon a time", "max_tokens": 4, "echo": True, "logprobs": 0, "temperature": 0,
            "ignore_eos": True, "stream": True}
    r = httpx.post(live.url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert chunks[0]["choices"][0]["text"].startswith("Once upon a time")
    whole = post(live, "/v1/completions", {**body, "stream": False})["choices"][0]
    assert text == whole["text"] and tokens == whole["logprobs"]["tokens"]


def test_logit_bias_forces_and_bans(live):
    base = post(live, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                          "logprobs": 0})
    with torch.no_grad():
        first = int(live.engine.model(torch.tensor([live.tokenizer.encode("Hello")]))[0, -1].argmax())
    forced_id = 123
    forced = post(live, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                            "logit_bias": {str(forced_id): 100}})
    assert forced["choices"][0]["text"] == live.tokenizer.decode([forced_id] * 4)
    banned = post(live, "/v1/completions", {"prompt": "Hello", "max_tokens": 1, "temperature": 0, "ignore_eos": True,
                                            "logit_bias": {str(first): -100}, "logprobs": 0})
    assert banned["choices"][0]["logprobs"]["tokens"][0] != base["choices"][0]["logprobs"]["tokens"][0]
    chat = live.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, temperature=0, logit_bias={str(forced_id): 100},
                                                 **IGNORE_EOS)
    assert chat.choices[0].message.content == live.tokenizer.decode([forced_id] * 3)


def test_suffix_and_best_of_are_refused_clearly(live):
    for body, param in (({"prompt": "def f(", "suffix": "return x"}, "suffix"),
                        ({"prompt": "x", "best_of": 3, "n": 1}, "best_of")):
        r = httpx.post(live.url + "/v1/completions", json=body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert r.json()["error"]["code"] == "unsupported_parameter"
    assert post(live, "/v1/completions", {"prompt": "x", "best_of": 2, "n": 2, "max_tokens": 1})["choices"]


def test_tokenize_and_detokenize(live):
    tok = live.tokenizer
    text = "Hello, world! 你好 <|turn_end|>"
    out = post(live, "/v1/tokenize", {"model": MODEL, "prompt": text})
    assert out["tokens"] == tok.encode(text) and out["count"] == len(out["tokens"]) and out["max_model_len"] == MAX_LEN
    assert post(live, "/v1/tokenize", {"content": text, "add_special_tokens": False})["tokens"] == \
        tok.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "hi"}]
    assert post(live, "/v1/tokenize", {"messages": messages})["tokens"] == tok.encode_chat(messages)
    assert post(live, "/v1/tokenize", {"messages": messages, "add_generation_prompt": False})["tokens"] == \
        tok.encode_chat(messages, add_generation_prompt=False)
    back = post(live, "/v1/detokenize", {"tokens": out["tokens"]})["prompt"]
    assert back == tok.decode(out["tokens"], skip_special_tokens=False) and "<|turn_end|>" in back
    assert httpx.post(live.url + "/v1/tokenize", json={"prompt": "x"}).status_code == 401


def test_openapi_describes_the_real_request_schema(live):
    doc = httpx.get(live.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/tokenize", "/v1/detokenize", "/v1/models"):
        assert path in doc["paths"]
    schemas = doc["components"]["schemas"]
    chat, completion = schemas["ChatCompletionRequest"], schemas["CompletionRequest"]
    limits, vocab = Limits(), live.engine.model.args.vocab_size
    assert chat["required"] == ["messages"] and completion["required"] == ["prompt"]
    assert chat["properties"]["n"]["maximum"] == limits.max_n
    assert chat["properties"]["messages"]["maxItems"] == limits.max_messages
    assert chat["properties"]["top_logprobs"]["maximum"] == limits.max_logprobs
    assert completion["properties"]["max_tokens"]["minimum"] == 0 and chat["properties"]["max_tokens"]["minimum"] == 1
    assert completion["properties"]["stop_token_ids"]["items"]["maximum"] == vocab - 1
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # Bodies at the schema's bounds are accepted; one step past them is refused naming the field.
    ok = {"prompt": "hi", "max_tokens": 1, "temperature": 2, "top_p": 1, "n": limits.max_n, "top_k": -1,
          "presence_penalty": -2, "frequency_penalty": 2, "logprobs": limits.max_logprobs, "seed": -(2 ** 63)}
    assert post(live, "/v1/completions", ok)["choices"]
    for field, bad in (("temperature", 2.0001), ("n", limits.max_n + 1), ("logprobs", limits.max_logprobs + 1),
                       ("top_k", -2), ("seed", 2 ** 64)):
        r = httpx.post(live.url + "/v1/completions", json={**ok, field: bad}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == field


@pytest.mark.slow
def test_32_streams_with_shared_prefixes_equal_uncached_solo_runs(live, tiny_moe):
    systems = ["You answer in one sentence. " * 12, "Always be concise and correct, please. " * 9]
    requests = [dict(messages=[{"role": "system", "content": systems[i % 2]},
                               {"role": "user", "content": f"Question {i}: " + "why " * (i % 5)}],
                     seed=500 + i, temperature=[0.0, 0.8][i % 2], max_tokens=12 + i % 4)
                for i in range(32)]

    hits_before = live.engine.stats["cached_prompt_tokens"]
    together = crowd_streams(live, requests)
    assert live.engine.stats["cached_prompt_tokens"] - hits_before >= 30 * 64  # the system prompts were shared
    solo = LLM(tiny_moe, device="cpu", max_num_seqs=1, max_model_len=MAX_LEN, enable_prefix_caching=False)
    for req, (text, reason) in zip(requests, together, strict=True):
        assert reason == "length"
        params = SamplingParams(seed=req["seed"], temperature=req["temperature"], max_tokens=req["max_tokens"],
                                ignore_eos=True)
        assert text == solo.chat(req["messages"], params).text, f"request with seed {req['seed']} differs"
    assert not math.isnan(live.metrics()["megrez_prefix_cache_hit_ratio"])


def test_root_tokenizer_routes_as_vllm_serves_them(live):
    """lm-evaluation-harness's remote tokenizer uses /tokenizer_info, /tokenize and /detokenize."""
    info = httpx.get(live.url + "/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] == live.tokenizer.eos_token and info["model_max_length"] == MAX_LEN
    assert info["chat_template"] == live.tokenizer.chat_template and info["vocab_size"] == live.tokenizer.vocab_size
    assert sorted(live.tokenizer.stop_token_ids) == info["stop_token_ids"]
    body = {"prompt": "test", "add_special_tokens": False}
    assert post(live, "/tokenize", body) == post(live, "/v1/tokenize", body)
    ids = post(live, "/tokenize", body)["tokens"]
    assert post(live, "/detokenize", {"tokens": ids}) == {"prompt": "test"}
    assert httpx.get(live.url + "/tokenizer_info").status_code == 401
