"""The OpenAI-compatible HTTP API over one engine (FastAPI).

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/tokenize``, ``POST /v1/detokenize``, ``GET|HEAD /health``, ``GET /metrics``,
``GET /openapi.json``. Bodies are read and validated by hand (see ``protocol``) so that
every client mistake becomes a 400-class OpenAI error body that names the field, never a
framework-shaped 422 or a 500. Templates and tokenizers run in worker threads (the
tokenizer releases the GIL), after a size check that costs nothing, so a huge prompt
never stalls the event loop or the engine.

    from megrez.server.app import ServerConfig, create_app
    app = create_app(engine, ServerConfig(served_model_names=["megrez"]))
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine import Engine, QueueFull
from ..engine.sampling import SampleResult
from ..structured import Plan, Structured, StructuredError
from . import metrics, openapi, protocol
from .engine_loop import EngineFailed, EngineLoop
from .protocol import APIError, GenerationRequest, Limits, TokenText

PARSE_IN_THREAD_BYTES = 1 << 20  # bodies larger than this are parsed off the event loop

log = logging.getLogger("megrez.server")


@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_key: str | None = None
    max_request_bytes: int = 4 << 20
    body_timeout: float = 60.0  # seconds to receive a whole request body
    # Local image/audio paths in content parts are read only under these directories
    # (none: data: URLs and base64 only). Remote URLs are never fetched.
    allowed_media_dirs: tuple = ()
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], datetime] = datetime.now  # the time line of the Megrez tool prompt
    search_backend: object = None  # a megrez.search backend: enables the web_search tool
    search_pages: int = 5


class ClientGone(Exception):
    """The client hung up before its request was read: nobody is left to answer."""


class EventStream(StreamingResponse):
    """Server-sent events that always run ``on_close`` when the response ends, however it
    ends: a client that hangs up mid-stream is reported either by cancelling the response or
    by failing ``send``, and one that hangs up before the first event leaves the generator
    unstarted, so its own ``finally`` would never run."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            await self.body_iterator.aclose()


class OpenAIServer:
    def __init__(self, engine: Engine, config: ServerConfig):
        if not config.served_model_names:
            raise ValueError("at least one served model name is needed")
        self.engine, self.config = engine, config
        self.loop = EngineLoop(engine)
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(engine.tokenizer)
        self.vocab_size = engine.model.args.vocab_size
        self.structured = Structured(engine.tokenizer, self.vocab_size, config.clock)
        self.search_backend, self.search_pages = config.search_backend, config.search_pages
        self.errors: Counter = Counter()  # HTTP status -> error responses sent
        self.limits_hit: Counter = Counter()  # limit name -> requests refused or capped by it
        self.created = int(time.time())
        self.draining = False
        self._key_digest = hashlib.sha256(config.api_key.encode()).digest() if config.api_key else None
        # Tokenizing and rendering run here, never on the event loop.
        self.workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="megrez-tokenize")
        self.token_text.entry_bytes(None)  # scans the vocabulary once, now rather than mid-request
        # A text of C characters has at least C / longest tokens (a normalizer may shorten it: x2).
        self._chars_per_token = self.token_text.longest_token_bytes * (2 if engine.tokenizer.hf.normalizer else 1)

    # ------------------------------------------------------------------------------ checks
    def check_auth(self, request: Request) -> None:
        if self._key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Compare digests: equal lengths, and compare_digest takes the same time wherever they differ.
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        if not (hmac.compare_digest(given, self._key_digest) and scheme.lower() == "bearer"):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_json(self, request: Request) -> None:
        """Bodies must be declared JSON: a web page can only make a browser send text/plain or
        form bodies to this server without asking it first (CORS), and those are refused."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' "
                                f"(got {media or 'no Content-Type'!r})", code="unsupported_media_type")

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"request body is larger than the limit of {limit} bytes",
                           code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.config.body_timeout
        stream = request.stream().__aiter__()
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), max(left, 0))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise APIError(408, f"request body not received within {self.config.body_timeout:g} s",
                                   code="request_timeout", headers={"Connection": "close"}) from None
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone() from None
        return b"".join(chunks)

    async def read_json(self, request: Request) -> dict:
        self.check_json(request)
        raw = await self.read_body(request)
        if len(raw) > PARSE_IN_THREAD_BYTES:
            return await self.in_worker(protocol.parse_body, raw)
        return protocol.parse_body(raw)

    async def in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    def check_open(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable",
                           code="server_shutting_down", headers={"Connection": "close"})

    def model_name(self, requested: str | None) -> str:
        names = self.config.served_model_names
        if requested is None:
            return names[0]
        if requested not in names:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                                f"{', '.join(map(repr, names))}", param="model", code="model_not_found")
        return requested

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        except (ValueError, jinja2.TemplateError) as e:
            raise protocol.invalid("messages", f"the chat template cannot render these messages: {e}") from None

    def encode_text(self, text: str, param: str, add_special_tokens: bool = True, check: bool = True) -> list[int]:
        """Refuses a text that cannot fit the context before tokenizing it: counting its
        characters bounds its tokens from below at no cost."""
        least = math.ceil(len(text) / self._chars_per_token)
        if check and least >= self.engine.max_model_len:
            raise protocol.invalid(
                param, f"this model's context is {self.engine.max_model_len} tokens, and a prompt of {len(text)} "
                       f"characters has at least {least} tokens", code="context_length_exceeded")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def plan(self, req: GenerationRequest) -> Plan:
        """The grammar and the tool-call reading of a request (compiling a schema can take a
        moment: runs in a worker thread)."""
        try:
            return self.structured.plan(req.tools, req.response_format)
        except StructuredError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_schema") from None

    def encode(self, req: GenerationRequest) -> list[list[int]]:
        return self.encode_with_media(req)[0]

    def encode_with_media(self, req: GenerationRequest) -> tuple[list[list[int]], dict]:
        """Token ids of every prompt, and the image/audio embeddings of those that have media
        (prompt index -> [(position, vectors)]). Runs in a worker thread: templates and
        tokenizers on long inputs take a while, and image/audio encoders longer (they run
        here, once per request, whatever ``n`` is)."""
        from ..multimodal import MediaError
        from ..multimodal.prompt import EncoderCache, MediaPolicy, has_media, prepare_chat

        if getattr(self, "encoder_cache", None) is None:
            self.encoder_cache = EncoderCache()

        out = []
        media_embeddings = {}
        for prompt in req.prompts:
            if req.kind == "chat" and has_media(prompt):
                policy = MediaPolicy(allow_paths=bool(self.config.allowed_media_dirs),
                                     allowed_dirs=tuple(self.config.allowed_media_dirs))
                try:
                    ids, embeddings, _ = prepare_chat(self.engine.model, self.tokenizer, prompt, policy,
                                                      max_len=self.engine.max_model_len, cache=self.encoder_cache)
                except MediaError as e:
                    param = str(e).split(":", 1)[0] if str(e).startswith("messages[") else "messages"
                    code = "context_length_exceeded" if "context holds" in str(e) else None
                    raise APIError(400, str(e), param=param.split(" ")[0], code=code) from None
                media_embeddings[len(out)] = embeddings
                out.append(ids)
            elif req.kind == "chat":
                try:  # tools in the prompt, tool calls and results in the model's format
                    messages, template_kwargs = self.structured.chat_messages(prompt, req.tools)
                except ValueError as e:
                    raise protocol.invalid("messages", str(e)) from None
                # The template already wrote any special tokens it wants (as transformers does).
                out.append(self.encode_text(self.render(messages, **template_kwargs), "messages",
                                            add_special_tokens=False))
            elif isinstance(prompt, str):
                out.append(self.encode_text(prompt, "prompt"))
            else:
                bad = [t for t in prompt if not 0 <= t < self.vocab_size]
                if bad:
                    raise protocol.invalid("prompt", f"token ids must be in [0, {self.vocab_size}) (got {bad[0]})")
                out.append(list(prompt))
        return out, media_embeddings

    def echo_text(self, prompt, ids: list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=False)

    def check_length(self, ids: list[int], param: str) -> None:
        limit = self.engine.max_model_len
        if not ids:
            raise protocol.invalid(param, "the prompt is empty (it encodes to no tokens)")
        if len(ids) >= limit:
            raise protocol.invalid(
                param, f"this model's context is {limit} tokens and at least one is needed for the completion, "
                       f"but the prompt has {len(ids)} tokens: {len(ids) - limit + 1} too many",
                code="context_length_exceeded")

    # ------------------------------------------------------------------------------ generation
    async def handle(self, request: Request, kind: str) -> Response:
        self.check_auth(request)
        self.check_open()
        body = await self.read_json(request)
        parse = protocol.parse_chat if kind == "chat" else protocol.parse_completion
        req = parse(body, self.config.limits, self.vocab_size)
        model = self.model_name(req.model)
        if req.web_search is not None:
            from . import search_route

            answer = await search_route.handle(self, req, model)
            if isinstance(answer, dict):
                return JSONResponse(answer)
            return EventStream(answer, on_close=lambda: None,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        plan = await self.in_worker(self.plan, req)
        prompt_ids, embeddings = await self.in_worker(self.encode_with_media, req)
        for ids in prompt_ids:
            self.check_length(ids, "messages" if kind == "chat" else "prompt")
        try:
            cap, limit = req.token_budget([len(ids) for ids in prompt_ids], self.engine.max_model_len,
                                          self.config.limits, self.token_text.entry_bytes(req.logprobs))
        except APIError as e:
            self.limits_hit[getattr(e, "limit", "other")] += 1
            raise
        if limit is not None:
            self.limits_hit[limit] += 1
        sink: asyncio.Queue = asyncio.Queue()
        rids = self.submit(req, prompt_ids, sink, cap, embeddings, plan)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        run = Run(self, req, model, rid, rids, sink, prompt_ids, plan)
        if req.stream:
            return EventStream(run.events(), on_close=lambda: self.abort(rids),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.collect(request)

    def submit(self, req: GenerationRequest, prompt_ids: list[list[int]], sink: asyncio.Queue,
               cap: int | None = None, embeddings: dict | None = None,
               plan: Plan | None = None) -> dict[int, str]:
        """All choices of one request enter the engine together, or none does."""
        engine = self.engine
        wanted = len(prompt_ids) * req.n
        if wanted > engine.max_waiting:  # waiting would not help: it can never fit
            self.limits_hit["max_waiting"] += 1
            raise protocol.invalid("n", f"this request needs {wanted} places in the queue, more than the "
                                        f"{engine.max_waiting} it has (--max-waiting)", code="request_too_large")
        busy = APIError(429, f"the server is busy: its queue holds {engine.max_waiting} waiting requests; "
                             f"retry later", type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        if len(engine.waiting) + wanted > engine.max_waiting:
            raise busy
        rids: dict[int, str] = {}
        try:
            for p, ids in enumerate(prompt_ids):
                for i in range(req.n):
                    params = req.choice_params(i, len(ids), engine.max_model_len, cap)
                    processors = []
                    if plan is not None:  # each choice gets its own grammar matcher
                        params = plan.params(params)
                        processors = plan.processors()
                    rids[p * req.n + i] = self.loop.add(ids, params, sink, p * req.n + i,
                                                        embeddings=(embeddings or {}).get(p),
                                                        logits_processors=processors)
        except QueueFull:
            self.abort(rids)
            raise busy from None
        except ValueError as e:
            self.abort(rids)
            raise protocol.invalid(None, str(e)) from None
        return rids

    def abort(self, rids: dict[int, str]) -> None:
        for rid in rids.values():
            self.loop.abort(rid)

    def is_stop_token(self, token: int, params) -> bool:
        return token in params.stop_token_ids or (not params.ignore_eos and token in self.tokenizer.stop_token_ids)

    def drain(self) -> None:
        """Shutdown, once the grace period is over: refuse new requests, end those still running
        (streams get an error event and [DONE], whole answers a 503)."""
        self.draining = True
        self.loop.fail_all(EngineFailed("the server is shutting down", status=503, code="server_shutting_down"))

    # ------------------------------------------------------------------------------ tokenizer routes
    def tokenizer_info(self) -> dict:
        """What a client needs to tokenize as the server does (vLLM's /tokenizer_info)."""
        tok = self.tokenizer
        return {"tokenizer_class": "megrez", "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": tok.chat_template,
                "model_max_length": self.engine.max_model_len, "vocab_size": self.vocab_size,
                "stop_token_ids": sorted(tok.stop_token_ids)}

    async def tokenize(self, request: Request) -> dict:
        self.check_auth(request)
        body = await self.read_json(request)
        model, prompt, flag = protocol.parse_tokenize(body, self.config.limits)
        self.model_name(model)

        def run():
            if isinstance(prompt, list):  # messages
                return self.tokenizer.encode(self.render(prompt, flag), add_special_tokens=False)
            return self.encode_text(prompt, "prompt", add_special_tokens=flag, check=False)

        ids = await self.in_worker(run)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len}

    async def detokenize(self, request: Request) -> dict:
        self.check_auth(request)
        body = await self.read_json(request)
        model, ids = protocol.parse_detokenize(body, self.config.limits, self.vocab_size)
        self.model_name(model)
        return {"prompt": await self.in_worker(lambda: self.tokenizer.decode(ids, skip_special_tokens=False))}


class Run:
    """One HTTP generation request: its engine requests (one per choice) and their answer."""

    def __init__(self, server: OpenAIServer, req: GenerationRequest, model: str, rid: str, rids: dict[int, str],
                 sink: asyncio.Queue, prompt_ids: list[list[int]], plan: Plan | None = None):
        self.server, self.req, self.model, self.id, self.rids, self.sink = server, req, model, rid, rids, sink
        # Tool calls are read out of each choice's text by its own reader.
        self.readers = {i: plan.reader() for i in rids} if plan is not None and req.kind == "chat" else {}
        self.created = int(time.time())
        self.prompt_ids = prompt_ids
        self.prompt_tokens = sum(map(len, prompt_ids))
        self.completion_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}
        self.offsets = {i: protocol.TextOffsets() for i in rids}  # legacy logprobs text_offset per choice
        self.echoed: set[int] = set()

    def prompt_of(self, index: int) -> int:
        return index // self.req.n

    def text(self, index: int, out) -> str:
        """The output's new text; with echo, a choice's first text starts with its prompt."""
        if not self.req.echo or index in self.echoed:
            return out.new_text
        self.echoed.add(index)
        p = self.prompt_of(index)
        return self.server.echo_text(self.req.prompts[p], self.prompt_ids[p]) + out.new_text

    def logprobs(self, index: int, out) -> dict | None:
        if self.req.logprobs is None:
            return None
        samples = out.new_logprobs
        # The stop token ends the answer but is not part of it, as its text is not. Scoring
        # (echo) lists every token: lm-evaluation-harness expects one entry per generated token.
        if samples and out.finish_reason == "stop" and not self.req.echo \
                and self.server.is_stop_token(samples[-1].token, self.req.params):
            samples = samples[:-1]
        if out.prompt_logprobs is not None:
            first = self.prompt_ids[self.prompt_of(index)][0]
            samples = [SampleResult(first)] + out.prompt_logprobs[1:] + samples
        if self.req.kind == "chat":
            return protocol.chat_logprobs(samples, self.server.token_text)
        return protocol.completion_logprobs(samples, self.server.token_text, self.offsets[index])

    def usage(self) -> dict:
        u = protocol.usage(self.prompt_tokens, sum(self.completion_tokens.values()))
        # Cached tokens of each prompt, as its best-served choice saw them.
        per_prompt: dict[int, int] = {}
        for index, n in self.cached_tokens.items():
            per_prompt[self.prompt_of(index)] = max(per_prompt.get(self.prompt_of(index), 0), n)
        u["prompt_tokens_details"] = {"cached_tokens": sum(per_prompt.values())}
        return u

    async def _next(self):
        index, out = await self.sink.get()
        if isinstance(out, EngineFailed):
            kind = "service_unavailable" if out.status == 503 else "internal_server_error"
            raise APIError(out.status, str(out), type=kind, code=out.code)
        if out.finish_reason == "error":
            raise APIError(500, f"generation failed for this request: {out.error}", type="internal_server_error",
                           code="request_failed")
        self.completion_tokens[index] = out.completion_tokens
        self.cached_tokens[index] = out.cached_tokens
        return index, out

    # ------------------------------------------------------------------------------ whole answers
    async def collect(self, request: Request) -> Response:
        texts = {i: [] for i in self.rids}
        logprobs = {i: [] for i in self.rids}
        finish: dict[int, str] = {}
        last_token: dict[int, int | None] = {}

        async def consume():
            while len(finish) < len(self.rids):
                index, out = await self._next()
                texts[index].append(self.text(index, out))
                lp = self.logprobs(index, out)
                if lp is not None:
                    logprobs[index].append(lp)
                if out.finished:
                    finish[index] = protocol.public_finish_reason(out.finish_reason)
                    last_token[index] = out.new_token_ids[-1] if out.new_token_ids else None

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not consumer.done():  # the client hung up: nobody will read an answer
                return Response(status_code=499)
            consumer.result()
        finally:
            consumer.cancel()
            watcher.cancel()
            self.server.abort(self.rids)
        choices = []
        for i in sorted(self.rids):
            text = "".join(texts[i])
            lp = _merge_logprobs(logprobs[i], self.req.kind) if self.req.logprobs is not None else None
            reader = self.readers.get(i)
            if reader is not None:
                message, reason = reader.message(text, finish[i], last_token.get(i))
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
                continue
            make = protocol.chat_choice if self.req.kind == "chat" else protocol.completion_choice
            choices.append(make(i, text, finish[i], lp))
        return JSONResponse(protocol.envelope(self.req.kind, self.id, self.created, self.model, choices,
                                              usage=self.usage()))

    # ------------------------------------------------------------------------------ streams
    def chunk(self, choices: list) -> bytes:
        extra = {"usage": None} if self.req.include_usage else {}
        return protocol.sse(protocol.envelope(self.req.kind, self.id, self.created, self.model, choices,
                                              chunk=True, **extra))

    async def events(self):
        chat = self.req.kind == "chat"
        try:
            if chat:  # OpenAI opens every choice with the assistant role
                for i in sorted(self.rids):
                    yield self.chunk([protocol.chat_delta(i, {"role": "assistant", "content": ""})])
            pending, failed = set(self.rids), False
            while pending:
                try:
                    index, out = await self._next()
                except APIError as e:  # the status line is long gone: report in the stream
                    yield protocol.sse(e.body())
                    failed = True
                    break
                text = self.text(index, out)
                lp = self.logprobs(index, out)
                reason = protocol.public_finish_reason(out.finish_reason)
                if out.finished:
                    pending.discard(index)
                elif not text and not (lp and (lp.get("content") or lp.get("tokens"))):
                    continue  # text held back (a partial character or a possible stop string)
                reader = self.readers.get(index)
                if reader is not None:
                    deltas = reader.feed(text)
                    if out.finished:
                        more, reason = reader.finish(reason, out.new_token_ids[-1] if out.new_token_ids else None)
                        deltas += more
                    deltas = deltas or ([{}] if out.finished or lp else [])
                    for k, delta in enumerate(deltas):
                        last = k == len(deltas) - 1
                        yield self.chunk([protocol.chat_delta(index, delta, reason if last else None,
                                                              lp if k == 0 else None)])
                elif chat:
                    delta = {"content": text} if text else {}
                    yield self.chunk([protocol.chat_delta(index, delta, reason, lp)])
                else:
                    yield self.chunk([protocol.completion_choice(index, text, reason, lp)])
            if self.req.include_usage and not failed:
                yield protocol.sse(protocol.envelope(self.req.kind, self.id, self.created, self.model, [],
                                                     chunk=True, usage=self.usage()))
            yield protocol.sse("[DONE]")
        finally:
            self.server.abort(self.rids)


def _merge_logprobs(blocks: list[dict], kind: str) -> dict:
    if kind == "chat":
        return {"content": [entry for b in blocks for entry in b["content"]]}
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for b in blocks:
        for k in merged:
            merged[k] += b[k]
    return merged


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------------------- the app
def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    server = OpenAIServer(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            server.loop.stop()
            server.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="megrez", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    spec = openapi.document(config.served_model_names, config.limits, engine.model.args.vocab_size,
                            engine.max_model_len, auth=config.api_key is not None)

    def error_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        server.errors[status] += 1
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return error_response(e.status, e.body(), e.headers)

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, e: ClientGone):
        # Hung up mid-upload (or sent a body the HTTP layer already answered 400): not our error.
        server.errors[499] += 1
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(e.status_code, protocol.error_body(message, kind), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        return error_response(400, protocol.error_body(f"invalid request: {e.errors()}", "invalid_request_error"))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, protocol.error_body(f"internal server error ({type(e).__name__})",
                                                       "internal_server_error"))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if server.draining or not server.loop.healthy:
            state = "shutting down" if server.draining else "failing" if server.loop.alive else "not running"
            return error_response(503, protocol.error_body(f"the engine is {state}", "service_unavailable"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        text = metrics.render(server.loop, server.errors, config.served_model_names[0], server.limits_hit)
        return PlainTextResponse(text, media_type=metrics.CONTENT_TYPE)

    @app.get("/openapi.json")
    async def get_openapi():
        return spec

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": server.created, "owned_by": "megrez",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [model_card(n) for n in config.served_model_names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str):
        server.check_auth(request)
        return model_card(server.model_name(model))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.handle(request, "completion")

    # Also at the root, where vLLM and llama.cpp serve them (lm-evaluation-harness looks there).
    @app.post("/v1/tokenize")
    @app.post("/tokenize", include_in_schema=False)
    async def tokenize(request: Request):
        return await server.tokenize(request)

    @app.post("/v1/detokenize")
    @app.post("/detokenize", include_in_schema=False)
    async def detokenize(request: Request):
        return await server.detokenize(request)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        server.check_auth(request)
        return server.tokenizer_info()

    return app
