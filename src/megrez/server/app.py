"""The OpenAI-compatible HTTP API over one engine (FastAPI).

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /health``, ``GET /metrics``. Bodies are read and validated by hand (see
``protocol``) so that every client mistake becomes a 400-class OpenAI error body that
names the field, never a framework-shaped 422 or a 500.

    from megrez.server.app import ServerConfig, create_app
    app = create_app(engine, ServerConfig(served_model_names=["megrez"]))
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, QueueFull
from ..structured import Plan, Structured, StructuredError
from . import metrics, protocol
from .engine_loop import EngineFailed, EngineLoop
from .protocol import APIError, GenerationRequest, Limits, TokenText

log = logging.getLogger("megrez.server")


@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_key: str | None = None
    max_request_bytes: int = 4 << 20
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], datetime] = datetime.now  # the time line of the Megrez tool prompt
    search_backend: object = None  # a megrez.search backend: enables the web_search tool
    search_pages: int = 5


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
        self.created = int(time.time())
        self._key_digest = hashlib.sha256(config.api_key.encode()).digest() if config.api_key else None

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

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"request body is larger than the limit of {limit} bytes",
                           code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def model_name(self, requested: str | None) -> str:
        names = self.config.served_model_names
        if requested is None:
            return names[0]
        if requested not in names:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                                f"{', '.join(map(repr, names))}", param="model", code="model_not_found")
        return requested

    def encode(self, req: GenerationRequest) -> tuple[list[list[int]], Plan]:
        """Runs in a worker thread: templates and tokenizers on long inputs take a while, and
        so can compiling a schema."""
        try:
            plan = self.structured.plan(req.tools, req.response_format)
        except StructuredError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_schema") from None
        out = []
        for prompt in req.prompts:
            if req.kind == "chat":
                try:
                    out.append(self.structured.chat_prompt(prompt, req.tools))
                except (ValueError, jinja2.TemplateError) as e:
                    raise protocol.invalid("messages", f"the chat template cannot render these messages: {e}") \
                        from None
            elif isinstance(prompt, str):
                out.append(self.tokenizer.encode(prompt))
            else:
                bad = [t for t in prompt if not 0 <= t < self.vocab_size]
                if bad:
                    raise protocol.invalid("prompt", f"token ids must be in [0, {self.vocab_size}) (got {bad[0]})")
                out.append(list(prompt))
        return out, plan

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
        body = protocol.parse_body(await self.read_body(request))
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
        prompt_ids, plan = await asyncio.to_thread(self.encode, req)
        for ids in prompt_ids:
            self.check_length(ids, "messages" if kind == "chat" else "prompt")
        sink: asyncio.Queue = asyncio.Queue()
        rids = self.submit(req, prompt_ids, sink, plan)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        run = Run(self, req, model, rid, rids, sink, sum(map(len, prompt_ids)), plan)
        if req.stream:
            return EventStream(run.events(), on_close=lambda: self.abort(rids),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.collect(request)

    def submit(self, req: GenerationRequest, prompt_ids: list[list[int]], sink: asyncio.Queue,
               plan: Plan | None = None) -> dict[int, str]:
        """All choices of one request enter the engine together, or none does."""
        engine = self.engine
        wanted = len(prompt_ids) * req.n
        busy = APIError(429, f"the server is busy: its queue holds {engine.max_waiting} waiting requests; "
                             f"retry later", type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        if len(engine.waiting) + wanted > engine.max_waiting:
            raise busy
        rids: dict[int, str] = {}
        try:
            for p, ids in enumerate(prompt_ids):
                for i in range(req.n):
                    params = req.choice_params(i, len(ids), engine.max_model_len)
                    processors = []
                    if plan is not None:
                        params = plan.params(params)
                        processors = plan.processors()
                    rids[p * req.n + i] = self.loop.add(ids, params, sink, p * req.n + i, processors)
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


class Run:
    """One HTTP generation request: its engine requests (one per choice) and their answer."""

    def __init__(self, server: OpenAIServer, req: GenerationRequest, model: str, rid: str, rids: dict[int, str],
                 sink: asyncio.Queue, prompt_tokens: int, plan: Plan | None = None):
        self.server, self.req, self.model, self.id, self.rids, self.sink = server, req, model, rid, rids, sink
        # Tool calls are read out of each choice's text by its own adapter.
        self.adapters = {i: plan.reader() for i in rids} if plan is not None and req.kind == "chat" else {}
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.completion_tokens: dict[int, int] = {}
        self.offsets = {i: protocol.TextOffsets() for i in rids}  # legacy logprobs text_offset per choice

    def logprobs(self, index: int, out) -> dict | None:
        if self.req.logprobs is None:
            return None
        samples = out.new_logprobs
        # The stop token ends the answer but is not part of it, as its text is not.
        if samples and out.finish_reason == "stop" and self.server.is_stop_token(samples[-1].token, self.req.params):
            samples = samples[:-1]
        if self.req.kind == "chat":
            return protocol.chat_logprobs(samples, self.server.token_text)
        return protocol.completion_logprobs(samples, self.server.token_text, self.offsets[index])

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, sum(self.completion_tokens.values()))

    async def _next(self):
        index, out = await self.sink.get()
        if isinstance(out, EngineFailed):
            raise APIError(500, str(out), type="internal_server_error", code="engine_error")
        self.completion_tokens[index] = out.completion_tokens
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
                texts[index].append(out.new_text)
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
            adapter = self.adapters.get(i)
            if adapter is not None:
                message, reason = adapter.message(text, finish[i], last_token.get(i))
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
                lp = self.logprobs(index, out)
                reason = protocol.public_finish_reason(out.finish_reason)
                if out.finished:
                    pending.discard(index)
                elif not out.new_text and not (lp and (lp.get("content") or lp.get("tokens"))):
                    continue  # text held back (a partial character or a possible stop string)
                adapter = self.adapters.get(index)
                if adapter is not None:
                    deltas = adapter.feed(out.new_text)
                    if out.finished:
                        more, reason = adapter.finish(reason, out.new_token_ids[-1] if out.new_token_ids else None)
                        deltas += more
                    deltas = deltas or ([{}] if out.finished or lp else [])
                    for k, delta in enumerate(deltas):
                        last = k == len(deltas) - 1
                        yield self.chunk([protocol.chat_delta(index, delta, reason if last else None,
                                                              lp if k == 0 else None)])
                elif chat:
                    delta = {"content": out.new_text} if out.new_text else {}
                    yield self.chunk([protocol.chat_delta(index, delta, reason, lp)])
                else:
                    yield self.chunk([protocol.completion_choice(index, out.new_text, reason, lp)])
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

    app = FastAPI(title="megrez", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def error_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        server.errors[status] += 1
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return error_response(e.status, e.body(), e.headers)

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

    @app.get("/health")
    async def health():
        if not server.loop.healthy:
            state = "failing" if server.loop.alive else "not running"
            return error_response(503, protocol.error_body(f"the engine is {state}", "service_unavailable"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        text = metrics.render(server.loop, server.errors, config.served_model_names[0])
        return PlainTextResponse(text, media_type=metrics.CONTENT_TYPE)

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

    return app
