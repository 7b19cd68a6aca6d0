"""Where answers come from: the project's engine (continuous batching, in this process) or any
OpenAI-compatible server (``--url``; megrez serve, vLLM, SGLang, llama.cpp's server, ...).

Both take a list of :class:`GenRequest` and return one :class:`Generation` per request, in
order. The engine backend also returns token ids and the sampled tokens' log-probabilities,
which RL needs; a server returns text only.
"""
from __future__ import annotations

import itertools
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..engine import SamplingParams


@dataclass
class GenRequest:
    messages: list[dict] | None = None    # chat rendering
    text: str | None = None               # raw prompt (no template)
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Generation:
    text: str
    finish_reason: str | None
    token_ids: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    completion_tokens: int = 0


def progress_bar(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="answer", dynamic_ncols=True, mininterval=1.0, disable=not enabled)


class BackendError(ValueError):
    """The server cannot be reached or refused a request; the message names the URL."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class EngineBackend:
    """Generation on an :class:`~megrez.engine.Engine`: every request is queued (as many as the
    engine's waiting queue allows) and the engine's continuous batching runs them."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self.name = "engine"

    @classmethod
    def from_llm(cls, llm) -> "EngineBackend":
        return cls(llm.engine, llm.tokenizer)

    def encode(self, req: GenRequest) -> list[int]:
        if req.messages is not None:
            return self.tokenizer.encode_chat(req.messages)
        return self.tokenizer.encode(req.text)

    def generate(self, requests: list[GenRequest], progress: bool = True, desc: str = "generating",
                 prompt_ids: list[list[int]] | None = None) -> list[Generation]:
        engine = self.engine
        ids = prompt_ids if prompt_ids is not None else [self.encode(r) for r in requests]
        results: list[Generation | None] = [None] * len(requests)
        by_id: dict[str, int] = {}
        acc: dict[str, tuple[list[int], list[str], list[float]]] = {}  # tokens, text pieces, logprobs
        queued = 0
        bar = progress_bar(len(requests), desc, progress)
        window = max(engine.max_num_seqs * 2, 1)  # keep the batch full without flooding the queue
        tag = f"gen{id(self):x}-{next(_calls)}"
        try:
            while queued < len(requests) or by_id:
                while queued < len(requests) and len(engine.waiting) < window:
                    try:
                        req = engine.add_request(ids[queued], requests[queued].params, request_id=f"{tag}-{queued}")
                    except ValueError as e:  # e.g. a prompt longer than the context: this answer fails alone
                        results[queued] = Generation("", f"error: {e}", [], ids[queued])
                        bar.update(1)
                    else:
                        by_id[req.request_id] = queued
                        acc[req.request_id] = ([], [], [])
                    queued += 1
                for out in engine.step():
                    i = by_id.get(out.request_id)
                    if i is None:
                        continue
                    tokens, text, lps = acc[out.request_id]
                    tokens += out.new_token_ids
                    text.append(out.new_text)
                    lps += [s.logprob for s in out.new_logprobs]
                    if out.finished:
                        del by_id[out.request_id], acc[out.request_id]
                        results[i] = Generation("".join(text), out.finish_reason, tokens, ids[i],
                                                lps if requests[i].params.logprobs is not None else None,
                                                len(tokens))
                        bar.update(1)
        finally:
            for rid in list(by_id):  # interrupted: leave the engine clean
                engine.abort(rid)
            if by_id:
                engine.step()
            bar.close()
        return results  # type: ignore[return-value]


_calls = itertools.count()


class OpenAIBackend:
    """An OpenAI-compatible server: ``/v1/chat/completions`` for chat prompts, ``/v1/completions``
    for raw ones, ``concurrency`` requests in flight."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 600.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.concurrency, self.timeout = concurrency, timeout
        self.model = model or self._first_model()
        self.name = f"openai:{self.url}"

    def _post(self, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:500]
            raise BackendError(f"{self.url}{path}: HTTP {e.code}: {detail}", e.code) from None
        except urllib.error.URLError as e:
            raise BackendError(f"{self.url}{path}: cannot connect ({e.reason})") from None

    def _first_model(self) -> str:
        models = self._post("/models").get("data") or []
        if not models:
            raise BackendError(f"{self.url}/models lists no model; pass --served-model")
        return models[0]["id"]

    def _one(self, req: GenRequest) -> Generation:
        p = req.params
        body = {"model": self.model, "max_tokens": p.max_tokens, "temperature": p.temperature,
                "top_p": p.top_p if p.top_p is not None else 1.0}
        if p.seed is not None:
            body["seed"] = p.seed % (2 ** 63)
        if p.stop:
            body["stop"] = p.stop
        try:
            return self._request(req, body)
        except BackendError as e:
            if e.status is not None and 400 <= e.status < 500:  # refused this request only: it fails alone
                return Generation("", f"error: {e}")
            raise

    def _request(self, req: GenRequest, body: dict) -> Generation:
        if req.messages is not None:
            r = self._post("/chat/completions", {**body, "messages": req.messages})
            choice = r["choices"][0]
            text = choice["message"].get("content") or ""
        else:
            r = self._post("/completions", {**body, "prompt": req.text})
            choice = r["choices"][0]
            text = choice.get("text") or ""
        usage = r.get("usage") or {}
        return Generation(text, choice.get("finish_reason"), completion_tokens=int(usage.get("completion_tokens", 0)))

    def generate(self, requests: list[GenRequest], progress: bool = True, desc: str = "generating",
                 prompt_ids=None) -> list[Generation]:
        bar = progress_bar(len(requests), desc, progress)
        results: list[Generation | None] = [None] * len(requests)
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            try:
                from concurrent.futures import as_completed

                for f in as_completed(futures):
                    results[futures[f]] = f.result()
                    bar.update(1)
            finally:
                for f in futures:
                    f.cancel()
                bar.close()
        return results  # type: ignore[return-value]
